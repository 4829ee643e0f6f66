"""KV caches: a value-only cache layer for mapped layers, and byte accounting read off the real tensors."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer


class ValueOnlyLayer(DynamicLayer):
    """Cache layer of a mapped attention layer: it stores V and never K (K comes from the SLM)."""

    def lazy_initialization(self, key_states: torch.Tensor | None, value_states: torch.Tensor) -> None:
        super().lazy_initialization(value_states, value_states)
        self.keys = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])

    def update(self, key_states: torch.Tensor | None, value_states: torch.Tensor, *args, **kwargs):
        if key_states is not None:
            raise RuntimeError("a mapped layer must not cache keys")
        if not self.is_initialized:
            self.lazy_initialization(None, value_states)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return None, self.values

    def get_seq_length(self) -> int:
        return self.values.shape[-2] if self.is_initialized else 0


def paired_llm_cache(config: PretrainedConfig, mapped_layers: list[int]) -> DynamicCache:
    """The LLM's cache for a paired run: ``ValueOnlyLayer`` at mapped layers, the model's usual layers elsewhere."""
    cache = DynamicCache(config=config)
    for idx in mapped_layers:
        cache.layers[idx] = ValueOnlyLayer()
    return cache


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by every K and V tensor of ``cache``."""
    if cache is None:
        return 0
    return sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers)


def full_cache_bytes(cache: Cache | None) -> int:
    """Bytes the same tokens would take with K and V in every layer (the LLM alone): twice the V bytes."""
    if cache is None:
        return 0
    return sum(2 * tensor_bytes(layer.values) for layer in cache.layers)
