"""Paged caches that IAM's layers read across models: the SLM's (K and V) and a mapped LLM layer's (V only).

vLLM's attention kernels keep K and V of one layer in a layout of their own (on a CPU the keys of a block are stored
transposed, and the layout differs per instruction set and per GPU backend), and read no other layer's cache. A
mapped layer reads the SLM layer's keys and its own values, so these layers keep their pages in one plain layout,
``[blocks, KV heads, block size, channels]`` (channels: K then V, or V alone), and attend in torch. The engine
allocates them like any attention layer: each reports a ``FullAttentionSpec`` (``ValueOnlyAttentionSpec`` for V-only
pages, half the bytes), shares the request's block table with every other layer, and gets its metadata (block table,
sequence lengths, query starts, slots) from the engine's attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.selector import get_attn_backend
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import register_kv_cache_spec


@register_kv_cache_spec(manager_class=FullAttentionManager, uniform_type_base_spec=FullAttentionSpec)
@dataclass(frozen=True, kw_only=True)
class ValueOnlyAttentionSpec(FullAttentionSpec):
    """A full-attention layer whose pages hold V only: ``head_size`` channels per KV head and token, ``head_size_v``
    0, so a page is half a ``FullAttentionSpec`` page of the same heads. Blocks are allocated, shared and freed as for
    full attention (one block table with the other layers)."""


@dataclass(frozen=True)
class Batch:
    """The requests of one forward as a paged layer reads them: per request, its first query row, its query rows and
    its tokens (cached and new); the block table and each new token's slot."""

    starts: list[int]
    queries: list[int]
    lengths: list[int]
    block_table: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def of(cls, layer_name: str) -> Batch | None:
        """This forward's batch as the engine's metadata for ``layer_name`` gives it; ``None`` in a profiling run."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(layer_name) if isinstance(metadata, dict) else None
        if metadata is None:
            return None
        loc = metadata.query_start_loc.tolist()
        n = len(loc) - 1
        return cls(
            loc[:-1],
            [b - a for a, b in zip(loc, loc[1:])],
            metadata.seq_lens[:n].tolist(),
            metadata.block_table,
            metadata.slot_mapping[: loc[-1]],
        )

    def causal(self, i: int, device: torch.device) -> torch.Tensor:
        """``[queries, tokens]`` which tokens request ``i``'s new rows see (its new rows are its last tokens)."""
        t, n = self.queries[i], self.lengths[i]
        return torch.ones(t, n, dtype=torch.bool, device=device).tril(n - t)


class PagedCache(nn.Module, AttentionLayerBase):
    """One layer's paged cache in the plain layout (see the module). ``value_only``: V pages
    (``ValueOnlyAttentionSpec``); else K then V."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, value_only: bool, prefix: str) -> None:
        super().__init__()
        vllm_config = get_current_vllm_config()
        self.num_heads, self.num_kv_heads, self.head_size, self.value_only = num_heads, num_kv_heads, head_size, value_only
        self.layer_name = prefix
        self.dtype = vllm_config.model_config.dtype
        self.attn_backend = get_attn_backend(head_size, self.dtype, vllm_config.cache_config.cache_dtype)
        self.kv_cache = torch.tensor([])
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self

    def get_attn_backend(self):
        return self.attn_backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> FullAttentionSpec:
        spec = ValueOnlyAttentionSpec if self.value_only else FullAttentionSpec
        return spec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=0 if self.value_only else self.head_size,
            dtype=self.dtype,
        )

    def store(self, batch: Batch, x: torch.Tensor) -> None:
        """Write ``x`` ``[tokens, KV heads, channels]`` (K then V, or V) into the new tokens' slots."""
        block_size = self.kv_cache.shape[2]
        slots = batch.slots.long()
        self.kv_cache[slots // block_size, :, slots % block_size] = x[: len(slots)].to(self.kv_cache.dtype)

    def read(self, batch: Batch, i: int) -> torch.Tensor:
        """Request ``i``'s tokens, ``[KV heads, tokens, channels]``."""
        block_size, n = self.kv_cache.shape[2], batch.lengths[i]
        blocks = self.kv_cache[batch.block_table[i, : -(-n // block_size)].long()]  # [b, KV heads, block size, C]
        return blocks.transpose(0, 1).flatten(1, 2)[:, :n]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[H, t, d_q]``, ``k`` ``[H, n, d_q]``, ``v`` ``[H, n, d_v]`` (K/V expanded to the query heads), ``mask``
    ``[t, n]`` -> ``[t, H, d_v]``."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale).transpose(0, 1)
