"""The attention module of a mapped LLM layer.

It replaces the layer's ``self_attn`` while a paired run is in flight (as transformers' KV-sharing layers do) and
follows the same call contract. After the mapping exists it never calls ``q_proj``/``k_proj``, stores no K, and
computes ``softmax(q_slm k_slm^T) V_llm`` with ``scaled_dot_product_attention``, so no T x T matrix is formed.
LLM heads of one KV group that borrow the same SLM head would compute the same thing, so prefill computes it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import read_keys
from .capture import apply_rope
from .mapping import HeadMap, MappingState, match_heads, window_attention


class MappedAttention(nn.Module):
    """Drop-in ``self_attn`` for a mapped layer: the SLM's attention probabilities times this layer's own V.

    Parameters
    ----------
    original : the layer's own attention module (its ``v_proj``/``o_proj`` are used; ``q_proj``/``k_proj`` only on
        the establishing window).
    state : the run's shared ``MappingState``.
    """

    def __init__(self, original: nn.Module, state: MappingState) -> None:
        super().__init__()
        self.original = original
        self.state = state
        self.layer_idx: int = original.layer_idx
        self._groups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._unique: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        attn, state = self.original, self.state
        if self.layer_idx not in state.maps:
            state.maps[self.layer_idx] = self._establish(hidden_states, position_embeddings)
        hmap = state.maps[self.layer_idx]

        b, t, _ = hidden_states.shape
        v = attn.v_proj(hidden_states).view(b, t, -1, attn.head_dim).transpose(1, 2)
        if past_key_values is not None:
            _, v = past_key_values.update(None, v, self.layer_idx)
        if t == 1:
            out = self._decode(hmap, v, attention_mask)
        else:
            out = self._prefill(hmap, v, attention_mask)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None

    def _decode(self, hmap: HeadMap, v: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One new token: gather the SLM's attention rows (computed once per SLM layer and step, shared by every
        LLM head and layer mapped to it) and multiply by V without expanding it; returns ``[B, H, 1, d]``."""
        b, h = hmap.slm_layer.shape
        rows = v.new_empty(b, h, v.shape[2])
        for layer, bi, hi, hs in self._by_slm_layer("heads", hmap.slm_layer, hmap.slm_head):
            rows[bi, hi] = self.state.decode_rows(layer, attention_mask)[bi, hs].to(v.dtype)
        kv_heads = v.shape[1]
        return (rows.view(b, kv_heads, h // kv_heads, -1) @ v).view(b, h, 1, -1)

    def _establish(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> HeadMap:
        """Q/K projections on the window rows only, then best-match search against every SLM head."""
        attn, window = self.original, self.state.window
        b = hidden_states.shape[0]
        rows = window.take(hidden_states, 1)
        cos, sin = (window.take(x.expand(b, -1, -1), 1) for x in position_embeddings)
        q = attn.q_proj(rows).view(b, window.size, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(rows).view(b, window.size, -1, attn.head_dim).transpose(1, 2)
        probs = window_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), attn.scaling)
        return match_heads(probs, window, self.state.slm_flats, self.state.slm_heads, self.state.metric)

    def _prefill(self, hmap: HeadMap, v: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """All new tokens: one SDPA over the distinct (SLM head, KV group) items, expanded to the LLM heads.

        SDPA's fused kernels need one head size for q/k and v; zero-padding q and k (or v) keeps q.k exact and
        avoids the fallback that would build the T x T matrix. Returns ``[B, H, t, d]``."""
        slm_layer, slm_head, kv, head_item = self._unique_items(hmap, self.original.num_key_value_groups)
        b, total, d = v.shape[0], v.shape[2], v.shape[-1]  # total: cached and new tokens
        state = self.state
        groups = self._by_slm_layer("items", slm_layer, slm_head)
        some_q = state.slm_queries[groups[0][0]]
        d_s = some_q.shape[-1]
        width = max(d_s, d)
        q = some_q.new_zeros(*slm_layer.shape, some_q.shape[2], width)
        k = some_q.new_zeros(*slm_layer.shape, total, width)
        for layer, bi, ui, hs in groups:
            q[bi, ui, :, :d_s] = state.slm_queries[layer][bi, hs]
            k[bi, ui, :, :d_s] = read_keys(state.slm_cache_layers[layer], bi, hs // state.slm_kv_groups)
        rows = torch.arange(b, device=v.device)[:, None]
        out = F.scaled_dot_product_attention(
            q.to(v.dtype),
            k.to(v.dtype),
            F.pad(v[rows, kv], (0, width - d)),
            attn_mask=attention_mask,
            is_causal=attention_mask is None,
            scale=state.slm_scaling,
        )[..., :d]
        return out[rows, head_item]

    def _unique_items(self, hmap: HeadMap, kv_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sequence, the distinct ``(slm_layer, slm_head, kv_head)`` items ``[B, U]`` (padded by repeating the
        first), and the item of each LLM head ``[B, H]``."""
        if self._unique is None:
            b, h = hmap.slm_layer.shape
            kv = torch.arange(h, device=hmap.slm_layer.device) // kv_groups
            keys = torch.stack([hmap.slm_layer, hmap.slm_head, kv.expand(b, h)], -1)  # [B, H, 3]
            found = [keys[i].unique(dim=0, return_inverse=True) for i in range(b)]
            width = max(len(u) for u, _ in found)
            items = torch.stack([torch.cat([u, u[:1].expand(width - len(u), 3)]) for u, _ in found])  # [B, U, 3]
            self._unique = (*items.unbind(-1), torch.stack([inv for _, inv in found]))
        return self._unique

    def _by_slm_layer(
        self, kind: str, slm_layer: torch.Tensor, slm_head: torch.Tensor
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(slm_layer, batch idx, column idx, slm head idx)`` for each SLM layer borrowed from, where ``slm_layer``
        and ``slm_head`` are ``[B, N]`` (N LLM heads, or N prefill items); cached under ``kind``."""
        if kind not in self._groups:
            self._groups[kind] = []
            for layer in slm_layer.unique().tolist():
                bi, ni = (slm_layer == layer).nonzero(as_tuple=True)
                self._groups[kind].append((layer, bi, ni, slm_head[bi, ni]))
        return self._groups[kind]
