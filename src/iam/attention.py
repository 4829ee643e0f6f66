"""The attention module of a mapped LLM layer.

It replaces the layer's ``self_attn`` while a paired run is in flight (as transformers' KV-sharing layers do) and
follows the same call contract. After the mapping exists it never calls ``q_proj``/``k_proj``, stores no K, and
computes ``softmax(q_slm k_slm^T) V_llm`` with ``scaled_dot_product_attention``, so no T x T matrix is formed.
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
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

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
            # SDPA's fused kernels need one head size for q/k and v; zero-padding q and k (or v) keeps q.k exact
            # and avoids the fallback that would build the T x T matrix.
            q, k = self._slm_query_key(hmap, t, v.shape[2], v.shape[-1])
            width = q.shape[-1]
            out = F.scaled_dot_product_attention(
                q.to(v.dtype),
                k.to(v.dtype),
                F.pad(v.repeat_interleave(attn.num_key_value_groups, dim=1), (0, width - v.shape[-1])),
                attn_mask=attention_mask,
                is_causal=attention_mask is None,
                scale=state.slm_scaling,
            )[..., : v.shape[-1]]
        out = out * hmap.scale.to(out.dtype)[:, :, None, None]
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None

    def _decode(self, hmap: HeadMap, v: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """One new token: gather the SLM's attention rows (computed once per SLM layer and step, shared by every
        LLM head and layer mapped to it) and multiply by V without expanding it; returns ``[B, H, 1, d]``."""
        b, h = hmap.slm_layer.shape
        rows = v.new_empty(b, h, v.shape[2])
        for layer, bi, hi, hs in self._head_groups(hmap):
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

    def _head_groups(self, hmap: HeadMap) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(slm_layer, batch idx, llm head idx, slm head idx)`` for each SLM layer this layer borrows from."""
        if self._groups is None:
            self._groups = []
            for layer in hmap.slm_layer.unique().tolist():
                bi, hi = (hmap.slm_layer == layer).nonzero(as_tuple=True)
                self._groups.append((layer, bi, hi, hmap.slm_head[bi, hi]))
        return self._groups

    def _slm_query_key(self, hmap: HeadMap, t: int, total: int, min_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather, per sequence and LLM head, the matched SLM head's query ``[B, H, t, w]`` and keys ``[B, H, T, w]``,
        zero-padded from the SLM head size ``d_s`` to ``w = max(d_s, min_width)``."""
        state = self.state
        groups = self._head_groups(hmap)
        some_q = state.slm_queries[groups[0][0]]
        b, h, d = *hmap.slm_layer.shape, some_q.shape[-1]
        width = max(d, min_width)
        q = some_q.new_zeros(b, h, t, width)
        k = some_q.new_zeros(b, h, total, width)
        for layer, bi, hi, hs in groups:
            q[bi, hi, :, :d] = state.slm_queries[layer][bi, hs]
            k[bi, hi, :, :d] = read_keys(state.slm_cache_layers[layer], bi, hs // state.slm_kv_groups)
        return q, k
