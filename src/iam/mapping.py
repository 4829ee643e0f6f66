"""Establishing the head mapping: window extraction, attention on the window, best-match search (paper §3)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .cache import read_keys
from .similarity import SimilarityMetric


@dataclass(frozen=True)
class Window:
    """The establishing window of every sequence in a left-padded batch.

    Parameters
    ----------
    starts : ``[B]`` index of each sequence's first real token.
    lengths : ``[B]`` tokens compared per sequence: ``min(real length, truncation_threshold)``.
    """

    starts: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, truncation: int) -> Window:
        real = attention_mask.sum(-1)
        return cls(starts=attention_mask.shape[1] - real, lengths=real.clamp(max=truncation))

    @property
    def size(self) -> int:
        return int(self.lengths.max())

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows ``starts .. starts + size`` of ``x`` along its time axis ``dim`` (batch is axis 0)."""
        steps = torch.arange(self.size, device=x.device)
        idx = (self.starts.to(x.device)[:, None] + steps).clamp(max=x.shape[dim] - 1)
        batch = torch.arange(x.shape[0], device=x.device)[:, None]
        return x.movedim(dim, 1)[batch, idx].movedim(1, dim)


def window_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal softmax(QK^T) on the window, in float32: ``q`` ``[B, H, W, d]``, ``k`` ``[B, Hkv, W, d]`` -> ``[B, H, W, W]``."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    w = q.shape[-2]
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def tril_flat(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Flattened lower triangle of the first ``n`` tokens: ``[..., W, W]`` -> ``[..., n(n+1)/2]``."""
    rows, cols = torch.tril_indices(n, n, device=probs.device)
    return probs[..., rows, cols]


@dataclass
class HeadMap:
    """The mapping of one LLM layer's mapped heads.

    Parameters
    ----------
    heads : ``[H_m]`` the mapped LLM head indices.
    slm_layer, slm_head : ``[B, H_m, k]`` the SLM heads each LLM head borrows, most similar first (``k = 1``: the
        paper's single best match).
    weight : ``[B, H_m, k]`` their mixing weights (non-negative, summing to one).
    score : ``[B, H_m]`` the similarity of the borrowed (mixed) attention to the LLM head's own, on the window.
    """

    heads: torch.Tensor
    slm_layer: torch.Tensor
    slm_head: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor


def slm_window_flats(
    queries: dict[int, torch.Tensor], keys: list[torch.Tensor], scaling: float, window: Window
) -> list[torch.Tensor]:
    """Flattened window attention of every SLM (layer, head): one ``[L_s * H_s, N_b]`` tensor per sequence."""
    probs = torch.stack(
        [window_attention(window.take(queries[i], 2), window.take(keys[i], 2), scaling) for i in range(len(keys))],
        dim=1,
    )  # [B, L_s, H_s, W, W]
    return [tril_flat(probs[b].flatten(0, 1), int(n)) for b, n in enumerate(window.lengths)]


def similarity_matrix(
    probs: torch.Tensor, window: Window, slm_flats: list[torch.Tensor], metric: SimilarityMetric
) -> torch.Tensor:
    """Similarity ``[B, H, L_s * H_s]`` of an LLM layer's heads (window attention ``probs`` ``[B, H, W, W]``) to every
    SLM (layer, head)."""
    return torch.stack([metric.score(tril_flat(probs[b], n), slm_flats[b]) for b, n in enumerate(window.lengths.tolist())])


def match_heads(
    heads: torch.Tensor,
    probs: torch.Tensor,
    window: Window,
    slm_flats: list[torch.Tensor],
    slm_heads: int,
    metric: SimilarityMetric,
    blend: int = 1,
) -> HeadMap:
    """Map each LLM head to its ``blend`` most similar SLM (layer, head)s, mixed by ``simplex_weights``.

    Parameters
    ----------
    heads : ``[H_m]`` the LLM heads being mapped.
    probs : ``[B, H_m, W, W]`` their window attention.
    window : the establishing window.
    slm_flats : per sequence, ``[L_s * H_s, N_b]`` flattened SLM window attention.
    slm_heads : ``H_s``, heads per SLM layer.
    metric : similarity metric (ranks the candidates and scores the result).
    blend : SLM heads mixed per LLM head; 1 is the paper's best match.

    Returns
    -------
    The layer's ``HeadMap``.
    """
    picks, weights, scores = [], [], []
    for b, n in enumerate(window.lengths.tolist()):
        llm = tril_flat(probs[b], n)
        best = metric.score(llm, slm_flats[b]).topk(blend, -1).indices  # [H_m, k], most similar first
        candidates = slm_flats[b][best]  # [H_m, k, N]
        w = simplex_weights(llm, candidates)
        picks.append(best)
        weights.append(w)
        scores.append(metric.score(llm, (w[..., None] * candidates).sum(1)).diagonal())
    best = torch.stack(picks)
    return HeadMap(heads, best // slm_heads, best % slm_heads, torch.stack(weights), torch.stack(scores))


def simplex_weights(target: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Least-squares mixing weights on the simplex (non-negative, summing to one, so a mix of attention rows is
    still a distribution): ``target`` ``[H, N]``, ``candidates`` ``[H, k, N]`` -> ``[H, k]``.

    Exact: the optimum has some support, and on its support it solves the equality-constrained problem (KKT:
    ``G w + lam 1 = c``, ``1^T w = 1``). Every support is solved at once (``2^k - 1`` small systems; ``k`` is a
    handful) and the best one with non-negative weights is kept. A single candidate is one of them, so the mix is
    never further from the target than any candidate alone."""
    h, k, _ = candidates.shape
    c, t = candidates.double(), target.double()
    gram = c @ c.transpose(-1, -2)  # [H, k, k]
    corr = (c @ t[..., None]).squeeze(-1)  # [H, k]
    on = torch.tensor(list(itertools.product((False, True), repeat=k))[1:], device=c.device)[:, None]  # [S, 1, k]
    system = c.new_zeros(len(on), h, k + 1, k + 1)
    # off the support a weight is pinned to 0; on it, the KKT rows
    system[..., :k, :k] = torch.where(on[..., :, None] & on[..., None, :], gram, torch.diag_embed((~on).double()))
    system[..., :k, k] = system[..., k, :k] = on.double()
    rhs = torch.cat([corr * on, c.new_ones(len(on), h, 1)], -1)
    solution, info = torch.linalg.solve_ex(system, rhs)
    w = solution[..., :k]  # [S, H, k]
    error = ((w[..., None, :] @ gram).squeeze(-2) * w).sum(-1) - 2 * (w * corr).sum(-1)  # + |t|^2, the same for all
    error = error.masked_fill((info != 0) | (w < -1e-9).any(-1), torch.inf)
    w = w[error.argmin(0), torch.arange(h, device=c.device)].clamp_min(0)
    return (w / w.sum(-1, keepdim=True)).to(target.dtype)


@dataclass
class MappingState:
    """What the mapped LLM layers read during one paired run; filled by the session, shared by the layers."""

    window: Window
    slm_flats: list[torch.Tensor]
    slm_heads: int
    slm_kv_groups: int
    slm_scaling: float
    metric: SimilarityMetric
    blend: int = 1
    slm_cache_layers: list = field(default_factory=list)  # the SLM's cache layers (K read through ``cache.read_keys``)
    slm_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: dict[int, HeadMap] = field(default_factory=dict)
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def new_step(self, queries: dict[int, torch.Tensor]) -> None:
        """The SLM has run one more step: these are its new queries."""
        self.slm_queries = queries
        self._rows = {}

    def decode_rows(self, layer: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities ``[B, H_s, T]`` of SLM ``layer`` for the single new token, computed once a step."""
        if layer not in self._rows:
            q = self.slm_queries[layer]  # [B, H_s, 1, d_s]
            k = read_keys(self.slm_cache_layers[layer])  # [B, H_kv_s, T, d_s]
            b, heads = q.shape[:2]
            scores = q.view(b, k.shape[1], heads // k.shape[1], -1).float() @ k.float().transpose(-1, -2)
            scores = scores.view(b, heads, -1) * self.slm_scaling
            if attention_mask is not None:
                mask = attention_mask[:, :, -1]  # [B, 1, T]
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            self._rows[layer] = scores.softmax(-1)
        return self._rows[layer]
