"""The attention of a mapped LLM layer (what it reads of the SLM's forward is ``iam.core.step``).

A mapped layer (without ``local_window``) never calls ``q_proj``/``k_proj`` once the mapping exists (only on the
establishing window), stores no K, and computes ``softmax(q_slm k_slm^T) V_llm`` with FlexAttention or SDPA (see
``MappedAttention._prefill``), so no T x T matrix is formed. LLM heads of one KV group that borrow the same SLM
head would compute the same thing, so prefill computes it once. An LLM head can borrow a weighted mix of several
SLM heads (``MappingConfig.blend``), and a layer can be mapped in part, one KV group at a time (see
``MappedAttention``).

With ``MappingConfig.local_window`` a mapped head instead attends exactly, with its own Q and K, to the first
tokens and a window of the latest ones, and borrows from the SLM only the attention on older tokens (see
``MappedAttention._local``): it projects Q and K again and caches K for the window (``cache.LocalKeys``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function
from transformers.cache_utils import Cache

from .decoder import attend, local_window, project_qk, project_v, runs, softcap
from .families import FULL, SLIDING
from .kernels import Kernels
from .kernels.local import local_chunked, local_decode, local_flex, local_sdpa
from .kernels.prefill import flex_prefill, sdpa_prefill
from .layers import LocalKeys
from .mapping import HeadMap, Mapping, SLMWindow, window_attention
from .parallel import rank_map, shard_of
from .step import Routes, SLMStep


class MappedAttention:
    """A mapped layer's attention for one call: the SLM's attention probabilities times this layer's own V.

    It is a function of the call, not a module: the layer's own ``self_attn`` stays in place, untouched, and only
    its ``v_proj``/``o_proj`` (and ``q_proj``/``k_proj`` on the establishing window, and their unmapped rows) are
    used. A layer can be mapped in part: its ``groups`` of query heads (one group per KV head) borrow SLM attention
    and keep no K, while the other groups attend as usual, with Q and K projected by row slices of
    ``q_proj``/``k_proj`` (views, no copy) and attention by the model's own attention function. With a ``local``
    window (``MappingConfig.local_window``), the mapped groups project Q and K too and attend exactly to the sinks and
    the window (``_local``), their keys in the cache's ``LocalKeys``. The model passes each value from its run spec
    (``iam.core.resolution.Resolved``).

    Parameters
    ----------
    original : the layer's own attention module.
    groups : the mapped KV groups of this layer (every group for a wholly mapped layer).
    kernels : which kernels it runs (``Resolved.kernels``).
    local : ``(sinks, window)`` of the exact local window (``Resolved.local``), or ``None``.
    partial : whether eviction leaves the mapped layers whole (``Resolved.partial``).
    """

    def __init__(
        self,
        original: nn.Module,
        groups: tuple[int, ...],
        kernels: Kernels,
        local: tuple[int, int] | None = None,
        partial: bool = False,
    ) -> None:
        self.original = original
        self.kernels, self.local, self.partial = kernels, local, partial
        self.layer_idx: int = original.layer_idx
        self.window, self.softcap = local_window(original), softcap(original)  # as the layer's own attention (Gemma)
        per_group = original.num_key_value_groups
        heads_of = lambda gs: torch.tensor([h for g in gs for h in range(g * per_group, (g + 1) * per_group)], dtype=torch.long)
        # under tensor parallelism the rank holds some KV groups (``held``, global indices); the tensors of a call
        # are the rank's, indexed from its first group, while the head map covers every mapped head (``mapped``)
        shard = shard_of(original)
        n_kv = original.config.num_key_value_heads
        held = range(n_kv) if shard is None else shard.groups(n_kv)
        self.sharded = shard is not None
        self.planned, self.mapped = groups, heads_of(groups)
        self.shard_positions = heads_of([j for j, g in enumerate(groups) if g in held])  # the rank's, of ``mapped``
        self.groups = tuple(g - held.start for g in groups if g in held)
        self.own = tuple(g - held.start for g in held if g not in groups)
        self.heads, self.own_heads = heads_of(self.groups), heads_of(self.own)

    def __call__(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache,
        mapping: Mapping,
        slm: SLMStep,
        establishing: SLMWindow | None = None,
        layer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's attention output (after ``o_proj``) ``[B, t, D]``. In the establishing forward
        (``establishing`` given) the layer first matches its heads and records its ``HeadMap`` in ``mapping``.
        ``attention_mask`` is the global layers' mask; a local layer's own (sliding-window) one is ``layer_mask``."""
        attn = self.original
        device = hidden_states.device  # a dispatched LLM's layer may sit apart from the SLM and the first layer
        slm = slm.on(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        own_mask = attention_mask if self.window is None else None if layer_mask is None else layer_mask.to(device)
        position_embeddings = tuple(x.to(device) for x in position_embeddings)
        if self.layer_idx not in mapping.layers:
            if establishing is None:
                raise RuntimeError(f"LLM layer {self.layer_idx} is mapped but has no head map.")
            with record_function("iam.establish"):
                mapping.layers[self.layer_idx] = self._establish(hidden_states, position_embeddings, establishing)
        routes = mapping.routes.get(self.layer_idx)
        if routes is None and self.groups:
            with record_function("iam.routes"):
                hmap = rank_map(mapping.layers[self.layer_idx], self.shard_positions, hidden_states.device)
                routes = mapping.routes[self.layer_idx] = Routes.of(hmap, attn.num_key_value_groups)

        b, t, _ = hidden_states.shape
        v = project_v(attn, hidden_states)
        q = k = None
        if self.own:
            q, k = project_qk(attn, hidden_states, *position_embeddings, self.own)
        elif self.sharded and len(self.mapped) < attn.config.num_attention_heads:  # the layer keeps K, on other ranks
            k = v[:, :0]
        k, v = cache.update(k, v, self.layer_idx)
        mapped_v = take_groups(v, self.groups) if self.groups else None
        with record_function("iam.mapped_attention"):
            if mapped_v is None:  # this rank holds none of the layer's mapped groups
                out = v.new_empty(b, 0, t, attn.head_dim)
            elif self.local is not None:
                keys = cache.local.layers[self.layer_idx]
                starts = cache.first_slots(self.partial)
                out = self._local(hidden_states, position_embeddings, routes, mapped_v, keys, starts, attention_mask, slm)
            elif t == 1:
                out = self._decode(routes, mapped_v, attention_mask, slm)
            else:
                out = self._prefill(routes, mapped_v, own_mask, slm)
        if self.own:
            full = out.new_empty(b, len(self.heads) + len(self.own_heads), t, attn.head_dim)
            full[:, self.heads] = out
            full[:, self.own_heads] = attend(attn, q, k, take_groups(v, self.own), own_mask)
            out = full
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    @torch.no_grad()
    def _establish(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], establishing: SLMWindow
    ) -> HeadMap:
        """Q/K projections of the mapped groups on the window rows only, then best-match search against every SLM
        head (outside autograd: the map is a constant of the forward)."""
        window = establishing.window
        b = hidden_states.shape[0]
        cos, sin = (window.take(x.expand(b, -1, -1), 1) for x in position_embeddings)
        q, k = project_qk(self.original, window.take(hidden_states, 1), cos, sin, self.planned, gather=True)
        probs = window_attention(q, k, self.original.scaling, self.softcap, self.window).to(establishing.flats[0].device)
        with record_function("iam.match"):
            return establishing.match(self.mapped, probs, FULL if self.window is None else SLIDING)

    def _decode(self, routes: Routes, v: torch.Tensor, attention_mask: torch.Tensor | None, slm: SLMStep) -> torch.Tensor:
        """One new token: gather the SLM's attention rows, mix them per LLM head, and multiply by the mapped groups'
        V without expanding it; returns ``[B, H_m, 1, d]``."""
        b = v.shape[0]
        rows = routes.mix(slm.column_rows(routes, attention_mask, v.dtype))  # [B, H_m, T]
        rows = rows[..., rows.shape[-1] - v.shape[2] :]  # a local layer's V: its window's slots (the rows' only weight)
        h, kv_heads = rows.shape[1], v.shape[1]
        return (rows.view(b, kv_heads, h // kv_heads, -1) @ v).view(b, h, 1, -1)

    def _prefill(self, routes: Routes, v: torch.Tensor, attention_mask: torch.Tensor | None, slm: SLMStep) -> torch.Tensor:
        """All new tokens: one attention call over the distinct (SLM head, KV group) items, mixed per LLM head.
        ``v`` holds the mapped groups. Where ``Kernels.flex`` says so, unpadded causal prefills run FlexAttention,
        which takes the SLM's smaller q/k head size as it is; otherwise padded SDPA (``iam.core.kernels.prefill``).
        Returns ``[B, H_m, t, d]``."""
        total, d = v.shape[2], v.shape[-1]  # total: cached and new tokens
        some_q = slm.queries[0]
        t, d_s = some_q.shape[2], some_q.shape[-1]
        causal = attention_mask is None and d_s != d and total == t and slm.softcap is None
        if causal and self.kernels.flex(t, d_s, v, some_q):
            return routes.from_items(flex_prefill(routes, v, slm))
        return routes.from_items(sdpa_prefill(routes, v, attention_mask, slm, self.kernels))

    def _local(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        routes: Routes,
        v: torch.Tensor,
        keys: LocalKeys,
        starts: torch.Tensor,
        attention_mask: torch.Tensor | None,
        slm: SLMStep,
    ) -> torch.Tensor:
        """The mapped heads with an exact local window (``MappingConfig.local_window``): each query attends with the
        head's own Q and K to the sinks and the ``window`` latest slots, and the borrowed SLM row gives the mass
        ``m`` on the older ("far") slots and its spread over them::

            out = sum_far a_j v_j + (1 - m) * softmax_window(q k^T) v

        so where the window covers every slot the head is exactly the LLM's own. ``v`` ``[B, G, S, d]`` holds the
        mapped groups' V of every slot; ``starts`` ``[B]`` each sequence's first real slot. Where ``Kernels.flex``
        says so, prefills run on FlexAttention (``local_flex``), else on a CPU on fused SDPA and the band
        (``local_sdpa``), and decode on the borrowed row and the band (``local_decode``); with
        ``Kernels.window_reference``, and for prefills elsewhere, on the chunked reference (``local_chunked``; all
        in ``iam.core.kernels.local``). Returns ``[B, H_m, t, d]``."""
        q, k = project_qk(self.original, hidden_states, *position_embeddings, self.groups)
        sink_k, recent_k = keys.update(k, None, {"starts": starts})
        t, d = q.shape[2:]
        args = (q, sink_k, recent_k, v, slm, routes, starts.to(v.device), *self.local, self.original.scaling)
        if self.kernels.flex(t, slm.queries[0].shape[-1], v, q, slm.queries[0]):
            exact, borrowed = local_flex(*args)
            mixed = routes.from_items(borrowed)
            return mixed[..., :d] + mixed[..., d:] * exact
        if not self.kernels.window_reference and t == 1:
            return local_decode(*args, attention_mask)
        if not self.kernels.window_reference and v.device.type == "cpu":
            return local_sdpa(*args, self.kernels)
        return local_chunked(*args, attention_mask, self.kernels)


def take_groups(x: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """``x[:, groups]`` along the KV-head axis: a view when the groups are contiguous."""
    parts = [x[:, a:b] for a, b in runs(groups)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
