"""KV caches: a value-only cache layer for mapped layers, and byte accounting read off the real tensors."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

# The keyword under which models and their attention layers take the cache: transformers 5.24 renamed
# ``past_key_values`` to ``cache`` (the old name is deprecated, with a warning on every call).
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


def with_cache(cache: Cache | None) -> dict[str, Cache | None]:
    """``{CACHE_ARG: cache}``, to pass a cache to a model call under the installed transformers' keyword."""
    return {CACHE_ARG: cache}


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


class Int8Layer(DynamicLayer):
    """Cache layer storing K and V as int8 with one scale per (head, token), in the model's dtype.

    For head_dim 64 in fp16 that is 66 bytes instead of 128 per head and token. ``update`` returns dequantized
    states, so the owning model computes as usual; ``keys``/``values`` hold the int8 tensors.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # the compute dtype (transformers 5.24 dropped the layers' own ``dtype``)
        shape = (*key_states.shape[:2], 0)
        self.keys = key_states.new_empty(*shape, key_states.shape[-1], dtype=torch.int8)
        self.values = value_states.new_empty(*shape, value_states.shape[-1], dtype=torch.int8)
        self.key_scales = key_states.new_empty(*shape, 1)
        self.value_scales = value_states.new_empty(*shape, 1)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127
        return (x.float() / scale).round_().to(torch.int8), scale.to(x.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk, sk = self._quantize(key_states)
        qv, sv = self._quantize(value_states)
        self.keys = torch.cat([self.keys, qk], dim=-2)
        self.values = torch.cat([self.values, qv], dim=-2)
        self.key_scales = torch.cat([self.key_scales, sk], dim=-2)
        self.value_scales = torch.cat([self.value_scales, sv], dim=-2)
        return self.dequantized_keys(), self.values.to(self.dtype) * self.value_scales

    def dequantized_keys(self, *index: torch.Tensor) -> torch.Tensor:
        """Keys in the model's dtype, optionally only ``keys[index]`` (e.g. batch and head indices)."""
        return self.keys[index].to(self.dtype) * self.key_scales[index]

    def reset(self) -> None:
        super().reset()
        self.key_scales = self.value_scales = None


def read_keys(layer: DynamicLayer, *index: torch.Tensor) -> torch.Tensor:
    """``layer.keys[index]`` in the model's dtype, whether the layer is plain or int8."""
    return layer.dequantized_keys(*index) if isinstance(layer, Int8Layer) else layer.keys[index]


def slm_cache(config: PretrainedConfig, kind: str) -> DynamicCache:
    """The SLM's cache for a paired run: the model's usual layers (``native``) or ``Int8Layer`` everywhere."""
    cache = DynamicCache(config=config)
    if kind == "int8":
        cache.layers = [Int8Layer() for _ in cache.layers]
    return cache


def paired_llm_cache(config: PretrainedConfig, plan: dict[int, tuple[int, ...]]) -> DynamicCache:
    """The LLM's cache for a paired run: ``ValueOnlyLayer`` at wholly mapped layers, the model's usual layers
    elsewhere. A partly mapped layer keeps a usual layer, which then holds K for its unmapped KV groups only."""
    cache = DynamicCache(config=config)
    for idx, groups in plan.items():
        if len(groups) == config.num_key_value_heads:
            cache.layers[idx] = ValueOnlyLayer()
    return cache


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by every K and V tensor of ``cache`` (and their scales, for int8 layers)."""
    if cache is None:
        return 0
    names = ("keys", "values", "key_scales", "value_scales")
    return sum(tensor_bytes(getattr(layer, n, None)) for layer in cache.layers for n in names)


def full_cache_bytes(cache: Cache | None) -> int:
    """Bytes the same tokens would take with K and V in every layer (the LLM alone): twice the V bytes."""
    if cache is None:
        return 0
    return sum(2 * tensor_bytes(layer.values) for layer in cache.layers)
