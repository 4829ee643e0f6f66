"""Establishing the head mapping (paper §3): the window, attention on it, best-match search and blend weights; and
``Mapping``, the result, which a call returns on its cache.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from .kernels import Kernels
from .selection import Plan, format_plan
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

    def rows(self, index: torch.Tensor) -> Window:
        """The window of the sequences ``index`` (a batch reordered, repeated or narrowed)."""
        return Window(self.starts[index.to(self.starts.device)], self.lengths[index.to(self.lengths.device)])

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows ``starts .. starts + size`` of ``x`` along its time axis ``dim`` (batch is axis 0)."""
        steps = torch.arange(self.size, device=x.device)
        idx = (self.starts.to(x.device)[:, None] + steps).clamp(max=x.shape[dim] - 1)
        batch = torch.arange(x.shape[0], device=x.device)[:, None]
        return x.movedim(dim, 1)[batch, idx].movedim(1, dim)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None = None, local: int | None = None
) -> torch.Tensor:
    """Causal softmax(QK^T) on the window, in float32: ``q`` ``[B, H, W, d]``, ``k`` ``[B, Hkv, W, d]`` -> ``[B, H, W, W]``;
    logits soft-capped by ``softcap`` and each query reading its ``local`` latest tokens only, where given (as a
    Gemma layer attends)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = cap((q.float() @ k.float().transpose(-1, -2)) * scaling, softcap)
    w = q.shape[-2]
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).tril()
    if local is not None:
        causal = causal.triu(1 - local)
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logits soft-capped as Gemma 2 does, ``softcap * tanh(scores / softcap)`` (unchanged for ``None``)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


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
        paper's single best match); a candidate the fit gives weight 0 names the head of the largest weight instead,
        so that no SLM layer is read (or run) for nothing.
    weight : ``[B, H_m, k]`` their mixing weights (non-negative, summing to one).
    score : ``[B, H_m]`` the similarity of the borrowed (mixed) attention to the LLM head's own, on the window.
    """

    heads: torch.Tensor
    slm_layer: torch.Tensor
    slm_head: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor

    def rows(self, index: torch.Tensor) -> HeadMap:
        """The map of the sequences ``index``."""
        i = index.to(self.slm_layer.device)
        return replace(self, slm_layer=self.slm_layer[i], slm_head=self.slm_head[i], weight=self.weight[i], score=self.score[i])


@torch.no_grad()
def slm_window_flats(
    queries: dict[int, torch.Tensor],
    keys: list[torch.Tensor],
    scaling: float,
    window: Window,
    softcap: float | None = None,
    local: list[int | None] | None = None,
) -> list[torch.Tensor]:
    """Flattened window attention of every SLM (layer, head), as the SLM attends (``softcap``, and each layer's
    ``local`` window): one ``[L_s * H_s, N_b]`` tensor per sequence. Outside autograd: the mapping it sets (argmax
    and blend weights) is a constant of the forward, also when tuning."""
    local = local or [None] * len(keys)
    probs = torch.stack(
        [
            window_attention(window.take(queries[i], 2), window.take(keys[i], 2), scaling, softcap, local[i])
            for i in range(len(keys))
        ],
        dim=1,
    )  # [B, L_s, H_s, W, W]
    return [tril_flat(probs[b].flatten(0, 1), int(n)) for b, n in enumerate(window.lengths)]


@dataclass(frozen=True)
class SLMWindow:
    """What the SLM provides to establish a mapping: its attention on the window, and how to match against it.

    Parameters
    ----------
    window : the establishing window.
    flats : per sequence, ``[L_s * H_s, N_b]`` flattened window attention of every SLM (layer, head).
    heads : ``H_s``, heads per SLM layer.
    metric : similarity metric (ranks the candidates and scores the result).
    blend : SLM heads mixed per LLM head; 1 is the paper's best match.
    kinds : each SLM layer's kind (``iam.core.families.layer_kinds``) where an LLM head borrows from SLM layers of its
        own layer's kind only (Gemma's local and global layers); ``None``: from any.
    """

    window: Window
    flats: list[torch.Tensor]
    heads: int
    metric: SimilarityMetric
    blend: int = 1
    kinds: tuple[str, ...] | None = None

    def _of_kind(self, scores: torch.Tensor, kind: str | None) -> torch.Tensor:
        """``scores`` ``[..., L_s * H_s]`` with the SLM heads of layers of another kind than ``kind`` at ``-inf``."""
        if kind is None or self.kinds is None:
            return scores
        other = torch.tensor([k != kind for k in self.kinds for _ in range(self.heads)], device=scores.device)
        return scores.masked_fill(other, float("-inf"))

    @functools.cached_property
    def scorers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Per sequence, the metric against its SLM candidates (``SimilarityMetric.against``), prepared once."""
        return [self.metric.against(flat) for flat in self.flats]

    def similarity(self, probs: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Similarity ``[B, H, L_s * H_s]`` of LLM heads (window attention ``probs`` ``[B, H, W, W]``) to every SLM head
        (``-inf`` for heads of SLM layers of another ``kind`` than the LLM layer's, see ``kinds``)."""
        n = self.window.lengths.tolist()
        return self._of_kind(torch.stack([self.scorers[b](tril_flat(probs[b], n[b])) for b in range(len(n))]), kind)

    def match(self, heads: torch.Tensor, probs: torch.Tensor, kind: str | None = None) -> HeadMap:
        """Map each LLM head to its ``blend`` most similar SLM (layer, head)s, mixed by ``simplex_weights``.

        Parameters
        ----------
        heads : ``[H_m]`` the LLM heads being mapped.
        probs : ``[B, H_m, W, W]`` their window attention.
        kind : their layer's kind: they borrow from SLM layers of that kind only (see ``kinds``).

        Returns
        -------
        The layer's ``HeadMap``.
        """
        picks, weights, scores = [], [], []
        for b, n in enumerate(self.window.lengths.tolist()):
            llm = tril_flat(probs[b], n)
            best = self._of_kind(self.scorers[b](llm), kind).topk(self.blend, -1).indices  # [H_m, k], most similar first
            candidates = self.flats[b][best]  # [H_m, k, N]
            with record_function("iam.blend_fit"):
                w = simplex_weights(llm, candidates)
            picks.append(torch.where(w > 0, best, best.gather(-1, w.argmax(-1, keepdim=True))))
            weights.append(w)
            scores.append(self.metric.score(llm, (w[..., None] * candidates).sum(1)).diagonal())
        best = torch.stack(picks)
        return HeadMap(heads, best // self.heads, best % self.heads, torch.stack(weights), torch.stack(scores))


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
class Mapping:
    """Where a batch's mapped LLM heads take their attention from. It is set in the forward where the context
    reaches ``establish_threshold`` and travels on the ``IAMCache`` from then on, per sequence.

    Parameters
    ----------
    plan : mapped KV groups per mapped LLM layer.
    window : the establishing window of every sequence.
    n_heads, n_kv : query and KV heads per LLM layer.
    metric, blend : how heads were matched.
    layers : the ``HeadMap`` of each mapped LLM layer (filled in as the establishing forward reaches the layer).
    probe : ``[L, B, H, L_s * H_s]`` similarity of every LLM head to every SLM head, where the strategy measured it
        (``"similar"``); else ``None``.
    kernels : the kernel options of the model that set the mapping (reported in ``summary``).
    """

    plan: Plan
    window: Window
    n_heads: int
    n_kv: int
    metric: str
    blend: int
    layers: dict[int, HeadMap] = field(default_factory=dict)
    probe: torch.Tensor | None = None
    kernels: Kernels = field(default_factory=Kernels)
    routes: dict = field(default_factory=dict, repr=False)  # per layer, the kernels' view of its HeadMap (derived)

    @property
    def mapped_layers(self) -> list[int]:
        """LLM layers with at least one mapped KV group."""
        return list(self.plan)

    @property
    def units(self) -> list[int | str]:
        """The mapped units as the CLI writes them: whole layers as ``int``, single KV groups as ``"layer:group"``."""
        return format_plan(self.plan, self.n_kv)

    @property
    def layers_worth(self) -> float:
        """Whole LLM layers' worth of K the mapping drops: a mapped KV group is ``1 / n_kv`` of a layer."""
        return sum(len(groups) for groups in self.plan.values()) / self.n_kv

    @property
    def slm_layers(self) -> list[int]:
        """The SLM layers some mapped head borrows from (the SLM runs as deep as the last one)."""
        return sorted(set(torch.cat([m.slm_layer.flatten() for m in self.layers.values()]).tolist()))

    def borrowed_weight(self, slm_heads: int) -> dict[int, torch.Tensor]:
        """Per SLM layer borrowed from, ``[B, slm_heads]`` the weight the mapped LLM heads put on each of its heads
        (summed over them): how much each SLM head stands in for the mapped heads."""
        depth = self.slm_layers[-1] + 1
        total = None
        for m in self.layers.values():
            w = m.weight.flatten(1).float()
            total = w.new_zeros(w.shape[0], depth * slm_heads) if total is None else total
            total = total.index_put(
                (torch.arange(w.shape[0], device=w.device)[:, None], (m.slm_layer * slm_heads + m.slm_head).flatten(1)), w, True
            )
        total = total.view(-1, depth, slm_heads)
        return {layer: total[:, layer] for layer in self.slm_layers}

    def _per_head(self, values: Callable[[HeadMap], torch.Tensor], fill: float) -> torch.Tensor:
        """``values(map)`` ``[B, H_mapped, ...]`` of each mapped layer, placed at its heads of a ``[B, n_mapped_layers,
        H, ...]`` tensor; heads of a layer's unmapped KV groups hold ``fill``."""
        maps = list(self.layers.values())
        first = values(maps[0])
        out = first.new_full((first.shape[0], len(maps), self.n_heads, *first.shape[2:]), fill)
        for i, m in enumerate(maps):
            out[:, i, m.heads] = values(m)
        return out

    @property
    def head_mapping(self) -> torch.Tensor:
        """``[B, n_mapped_layers, H, 2]`` LongTensor of each LLM head's best-matching ``(slm_layer, slm_head)`` (``-1``
        for heads of unmapped KV groups). See ``mixture`` for ``blend > 1``."""
        return self._per_head(lambda m: torch.stack([m.slm_layer[..., 0], m.slm_head[..., 0]], -1), -1)

    @property
    def mixture(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every borrowed SLM head and its weight: ``[B, n_mapped_layers, H, blend, 2]`` ``(slm_layer, slm_head)``
        (``-1`` for heads of unmapped KV groups) and ``[B, n_mapped_layers, H, blend]`` weights (NaN there)."""
        return self._per_head(lambda m: torch.stack([m.slm_layer, m.slm_head], -1), -1), self._per_head(
            lambda m: m.weight, float("nan")
        )

    @property
    def similarity(self) -> torch.Tensor:
        """``[B, n_mapped_layers, H]`` similarity of each LLM head's borrowed (with ``blend > 1``, mixed) attention to
        its own on the window (the metric's own scale; NaN for heads of unmapped KV groups)."""
        return self._per_head(lambda m: m.score, float("nan"))

    def summary(self) -> dict:
        """Per mapped layer: mean matched similarity and how many borrowed SLM heads come from each SLM layer (first
        sequence); and the kernel options."""
        layers = {}
        for idx, m in self.layers.items():
            used, counts = m.slm_layer[0].unique(return_counts=True)
            layers[idx] = {
                "kv_groups": list(self.plan[idx]),
                "mean_similarity": round(m.score.mean().item(), 4),
                "slm_layers": {int(u): int(c) for u, c in zip(used, counts)},
            }
        mean = torch.cat([m.score.flatten() for m in self.layers.values()]).mean().item()
        kernels = self.kernels.summary()
        return {
            "mean_similarity": round(mean, 4),
            "metric": self.metric,
            "blend": self.blend,
            "layers": layers,
            "kernels": kernels,
        }

    def rows(self, index: torch.Tensor) -> Mapping:
        """The mapping of the sequences ``index`` (beam search reorders, repeats and narrows the batch)."""
        return replace(
            self,
            window=self.window.rows(index),
            layers={i: m.rows(index) for i, m in self.layers.items()},
            probe=None if self.probe is None else self.probe[:, index.to(self.probe.device)],
            routes={},
        )
