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
    """The requests of one forward as the paged layers read them, padded to ``[requests, rows]`` for the new tokens
    (each request's new tokens are its last ones) and ``[requests, positions]`` for its tokens, cached and new: where
    each padded row lies in the forward's rows, where each position lies in the pages, and which positions each row
    sees. Built once per forward and block table, shared by the layers that read it."""

    slots: torch.Tensor  # [T] each new token's slot
    rows: torch.Tensor  # [B, Q] each padded row's index among the forward's T rows (clamped)
    real: torch.Tensor  # [B, Q] which padded rows are new tokens
    blocks: torch.Tensor  # [B, N] each position's block
    offsets: torch.Tensor  # [B, N] and its offset in the block
    mask: torch.Tensor  # [B, 1, Q, N] which positions each row sees (a padded row sees them all, and is dropped)

    @classmethod
    def of(cls, layer_name: str, block_size: int, built: dict[tuple[int, int], Batch]) -> Batch | None:
        """This forward's batch as the engine's metadata for ``layer_name`` gives it, over pages of ``block_size``
        tokens; ``None`` in a profiling run. The layers of a forward share one metadata object, so ``built`` (the
        forward's own, by metadata object and block size) builds it once per forward."""
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(layer_name) if isinstance(metadata, dict) else None
        if metadata is None:
            return None
        key = (id(metadata), block_size)  # the metadata lives through the forward, so its id is not reused in it
        if key not in built:
            built[key] = cls.build(metadata, block_size)
        return built[key]

    @classmethod
    def build(cls, metadata, block_size: int) -> Batch:
        """The batch of the engine's attention ``metadata`` (query starts, sequence lengths, block table, slots)."""
        loc = metadata.query_start_loc
        n, device = len(loc) - 1, loc.device
        starts, queries, lengths = loc[:-1].long(), (loc[1:] - loc[:-1]).long(), metadata.seq_lens[:n].long()
        block_table = metadata.block_table[:n].long()
        q, positions = int(queries.max()), int(lengths.max())
        j, p = torch.arange(q, device=device), torch.arange(positions, device=device)
        real = j[None] < queries[:, None]
        rows = (starts[:, None] + j[None]).clamp(max=int(loc[-1]) - 1)
        seen = p[None, None] <= (lengths - queries)[:, None, None] + j[None, :, None]  # causal, [B, Q, N]
        mask = seen | ~real[..., None]
        return cls(
            metadata.slot_mapping[: int(loc[-1])],
            rows,
            real,
            block_table.gather(1, (p // block_size)[None].expand(n, -1).clamp(max=block_table.shape[1] - 1)),
            (p % block_size)[None].expand(n, -1),
            mask[:, None],
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, heads, d]`` new rows -> ``[B, heads, Q, d]``."""
        return x[self.rows].transpose(1, 2)

    def unpad(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """``[B, heads, Q, d]`` -> the ``t`` rows of the forward, ``[t, heads, d]`` (zeros past its new tokens)."""
        rows = x.transpose(1, 2)[self.real]
        return rows if len(rows) == t else F.pad(rows, (0, 0, 0, 0, 0, t - len(rows)))


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

    def batch(self, built: dict[tuple[int, int], Batch]) -> Batch | None:
        """This forward's ``Batch`` over this cache's pages; ``None`` in a profiling run. ``built``: as for
        ``Batch.of``."""
        return Batch.of(self.layer_name, self.kv_cache.shape[2], built)

    def store(self, batch: Batch, x: torch.Tensor) -> None:
        """Write ``x`` ``[tokens, KV heads, channels]`` (K then V, or V) into the new tokens' slots."""
        block_size = self.kv_cache.shape[2]
        slots = batch.slots.long()
        self.kv_cache[slots // block_size, :, slots % block_size] = x[: len(slots)].to(self.kv_cache.dtype)

    def read(self, batch: Batch) -> torch.Tensor:
        """Every request's tokens in one gather, ``[B, KV heads, N, channels]`` (past a request's length: whatever
        its pages hold, masked by ``batch.mask``)."""
        return self.kv_cache[batch.blocks, :, batch.offsets].transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[B, H, Q, d_q]``, ``k`` ``[B, H_kv, N, d_q]``, ``v`` ``[B, H_kv, N, d_v]`` (``H`` a multiple of
    ``H_kv``), ``mask`` ``[B, 1, Q, N]`` -> ``[B, H, Q, d_v]``, one SDPA call for the batch."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
