"""Cache layers: what one attention layer's cache stores, how it reads its keys, how many bytes it holds (read
off the real tensors) and how it keeps a subset of its slots (eviction). ``KVLayer`` and its subclasses: V only (a
wholly mapped layer), int8, int4, a local layer's window (``Windowed``), and a mapped layer's local keys
(``LocalKeys``)."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

SLM_CACHES = ("native", "int8", "int4")
"""How a model's cache is kept (``MappingConfig.slm_cache``/``llm_cache``): in the model's own dtype, as int8 with
one scale per head and token, or as int4 in groups with KIVI's axes and a full-precision residual (``Int4Layer``)."""


class KVLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` (K and V in the model's dtype) with what a paired run asks of a cache layer:
    its keys (``read_keys``), its bytes (``nbytes``, ``full_bytes``) and a subset of its slots (``keep_slots``). The
    base of the layers below, which change what they store (``stores``) and how they read it."""

    stores: tuple[str, ...] = ("keys", "values")
    """The tensors the layer holds, each ``[B, heads, slots, ...]``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = value_states.dtype  # the compute dtype (transformers 5.24 dropped the layers' own ``dtype``)

    def read_keys(self, *index: torch.Tensor) -> torch.Tensor:
        """``keys[index]`` (all of them without ``index``) in the model's dtype."""
        return self.keys[index]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the layer holds now."""
        return [t for t in (getattr(self, name) for name in self.stores) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held by the layer's tensors."""
        return sum(t.nbytes for t in self.tensors())

    def full_bytes(self, slots: int) -> int:
        """Bytes K and V of every head of ``values`` would take over ``slots`` slots in the model's dtype (what the
        LLM alone holds); 0 while the layer holds no V."""
        v = self.values
        if v is None or v.shape[-2] == 0:
            return 0
        return 2 * v.shape[0] * v.shape[1] * v.shape[-1] * self.dtype.itemsize * slots

    def keep_slots(self, index: torch.Tensor) -> None:
        """Keep only the slots ``index`` of every tensor that holds any, in that order; the others are freed.
        ``index`` is ``[B, S']`` (per sequence) or ``[B, heads, S']`` (per KV head)."""
        for name in self.stores:
            x = getattr(self, name)
            if x is not None and x.shape[-2] > 0:
                i = (index[:, None] if index.dim() == 2 else index).to(x.device)
                setattr(self, name, x.gather(2, i[..., None].expand(x.shape[0], x.shape[1], -1, x.shape[-1])))


class ValueOnlyLayer(KVLayer):
    """Cache layer of a wholly mapped attention layer: it stores V and never K (K comes from the SLM)."""

    def lazy_initialization(self, key_states: torch.Tensor | None, value_states: torch.Tensor) -> None:
        super().lazy_initialization(value_states, value_states)
        self.keys = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])

    def update(self, key_states: torch.Tensor | None, value_states: torch.Tensor, cache_kwargs: dict | None = None, **kwargs):
        if key_states is not None:
            raise RuntimeError("a mapped layer must not cache keys")
        if not self.is_initialized:
            self.lazy_initialization(None, value_states)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return None, self.values

    def get_seq_length(self) -> int:
        return self.values.shape[-2] if self.is_initialized else 0


class Int8Layer(KVLayer):
    """Cache layer storing K and V as int8 with one scale per (head, token), in the model's dtype.

    For head_dim 64 in fp16 that is 66 bytes instead of 128 per head and token. ``update`` returns dequantized
    states, so the owning model computes as usual; ``keys``/``values`` hold the int8 tensors.
    """

    stores = ("keys", "values", "key_scales", "value_scales")

    def __init__(self) -> None:
        super().__init__()
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # K and V may hold different heads: a partly mapped layer keeps K of its unmapped groups only
        empty = lambda x, d, **kw: x.new_empty(*x.shape[:2], 0, d, **kw)
        self.keys, self.values = (empty(x, x.shape[-1], dtype=torch.int8) for x in (key_states, value_states))
        self.key_scales, self.value_scales = (empty(x, 1) for x in (key_states, value_states))

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127
        return (x.float() / scale).round_().to(torch.int8), scale.to(x.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        qk, sk = self._quantize(key_states)
        qv, sv = self._quantize(value_states)
        self.keys = torch.cat([self.keys, qk], dim=-2)
        self.values = torch.cat([self.values, qv], dim=-2)
        self.key_scales = torch.cat([self.key_scales, sk], dim=-2)
        self.value_scales = torch.cat([self.value_scales, sv], dim=-2)
        return self.read_keys(), self.values.to(self.dtype) * self.value_scales

    def read_keys(self, *index: torch.Tensor) -> torch.Tensor:
        """``keys[index]`` dequantized to the model's dtype."""
        return self.keys[index].to(self.dtype) * self.key_scales[index]

    def _rows(self, index: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            i = index.to(self.keys.device)
            for name in self.stores:
                setattr(self, name, getattr(self, name)[i])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.is_initialized:
            self.key_scales = self.key_scales[..., : -abs(tokens_to_remove), :]
            self.value_scales = self.value_scales[..., : -abs(tokens_to_remove), :]

    def reset(self) -> None:
        super().reset()
        self.key_scales = self.value_scales = None


class Int8ValueOnlyLayer(Int8Layer):
    """A ``ValueOnlyLayer`` whose V is int8 with one scale per (head, token) (``MappingConfig.llm_cache="int8"``)."""

    def update(self, key_states: torch.Tensor | None, value_states: torch.Tensor, cache_kwargs: dict | None = None, **kwargs):
        if key_states is not None:
            raise RuntimeError("a mapped layer must not cache keys")
        if not self.is_initialized:
            self.lazy_initialization(value_states[..., :0, :], value_states)
        qv, sv = self._quantize(value_states)
        self.values = torch.cat([self.values, qv], dim=-2)
        self.value_scales = torch.cat([self.value_scales, sv], dim=-2)
        return None, self.values.to(self.dtype) * self.value_scales

    def get_seq_length(self) -> int:
        return self.values.shape[-2] if self.is_initialized else 0


class LocalKeys(KVLayer):
    """K of a mapped layer's mapped KV groups under ``MappingConfig.local_window``: each sequence's first ``sinks``
    real tokens, then the latest ``window`` slots, in one ``keys`` tensor ``[B, G, sinks + recent, d]``. Keys that
    leave the window are freed. ``values`` stays empty: the layer's V is in its own cache layer.

    Parameters
    ----------
    sinks, window : as ``MappingConfig.sinks`` and ``MappingConfig.local_window``.
    """

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks, self.window = sinks, window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        super().lazy_initialization(key_states, key_states)
        self.values = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])

    def update(
        self, key_states: torch.Tensor, value_states: None = None, cache_kwargs: dict | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys of this forward's ``t`` slots (``[B, G, t, d]``; no V). The first forward holds every slot
        so far, and ``cache_kwargs["starts"]`` ``[B]`` places each sequence's sinks in it. Returns the sink keys
        ``[B, G, sinks, d]`` and the recent keys this forward reads: the cached ones, then the new ones."""
        if value_states is not None:
            raise RuntimeError("local keys hold no V: the layer's V is in its own cache layer")
        if not self.is_initialized:
            self.lazy_initialization(key_states)
            starts = cache_kwargs["starts"].to(key_states.device)
            slots = (starts[:, None] + torch.arange(self.sinks, device=key_states.device))[:, None, :, None]
            self.keys = key_states.gather(2, slots.expand(-1, key_states.shape[1], -1, key_states.shape[-1]))
        sinks, recent = self.keys.split([self.sinks, self.keys.shape[2] - self.sinks], 2)
        recent = torch.cat([recent, key_states], 2)
        self.keys = torch.cat([sinks, recent[:, :, max(recent.shape[2] - self.window, 0) :]], 2)
        return sinks, recent


def pack4(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[..., d]`` (uint8 in ``0..15``, ``d`` even) packed two per byte: ``[..., d / 2]``."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack4``."""
    return torch.stack([p & 15, p >> 4], -1).flatten(-2)


def quantize4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of ``x`` with one scale and zero point per slice along ``dim`` (the group's axis):
    ``x ~ code * scale + zero``, codes in ``0..15``, error at most ``scale / 2``. Scales and zeros in ``x``'s dtype."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - low).float() / 15).clamp_min(1e-8).to(x.dtype)
    low = low.to(x.dtype)
    code = ((x.float() - low.float()) / scale.float()).round_().clamp_(0, 15).to(torch.uint8)
    return code, scale, low


class Int4Layer(Int8Layer):
    """Cache layer storing K and V in 4 bits with KIVI's axes (Liu et al. 2024): keys per channel over blocks of
    ``group`` tokens, values per token over groups of ``group`` channels, each group with a scale and a zero point in
    the model's dtype, two codes per byte. The newest ``residual`` to ``residual + group - 1`` tokens stay in the
    model's dtype until a whole block of keys can be quantized. ``update`` returns dequantized states.

    Parameters
    ----------
    group : tokens per key block and channels per value group; divides the head dimension.
    residual : tokens kept in full precision at least.
    """

    stores = ("keys", "values", "key_scales", "key_zeros", "value_scales", "value_zeros", "key_recent", "value_recent")

    def __init__(self, group: int = 32, residual: int = 128) -> None:
        super().__init__()
        self.group, self.residual = group, residual
        self.key_zeros = self.value_zeros = self.key_recent = self.value_recent = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        d = value_states.shape[-1]
        if d % self.group or d % 2:
            raise ValueError(f"int4 cache group {self.group} must divide the head dimension {d} (an even number).")
        KVLayer.lazy_initialization(self, key_states, value_states)
        empty = lambda x, n, **kw: x.new_empty(*x.shape[:2], 0, n, **kw)
        self.keys, self.values = (empty(x, x.shape[-1] // 2, dtype=torch.uint8) for x in (key_states, value_states))
        self.key_scales, self.key_zeros = empty(key_states, key_states.shape[-1]), empty(key_states, key_states.shape[-1])
        self.value_scales, self.value_zeros = empty(value_states, d // self.group), empty(value_states, d // self.group)
        self.key_recent, self.value_recent = empty(key_states, key_states.shape[-1]), empty(value_states, d)

    def _append(self, key_states: torch.Tensor | None, value_states: torch.Tensor) -> None:
        """Add slots to the full-precision part, then quantize its oldest whole blocks beyond ``residual``."""
        if key_states is not None:
            self.key_recent = torch.cat([self.key_recent, key_states], -2)
        self.value_recent = torch.cat([self.value_recent, value_states], -2)
        n = (self.value_recent.shape[-2] - self.residual) // self.group * self.group
        if n <= 0:
            return
        old, self.value_recent = self.value_recent.split([n, self.value_recent.shape[-2] - n], -2)
        code, scale, zero = quantize4(old.unflatten(-1, (-1, self.group)), -1)
        self.values = torch.cat([self.values, pack4(code.flatten(-2))], -2)
        self.value_scales = torch.cat([self.value_scales, scale[..., 0]], -2)
        self.value_zeros = torch.cat([self.value_zeros, zero[..., 0]], -2)
        if self.key_recent.shape[1]:
            old, self.key_recent = self.key_recent.split([n, self.key_recent.shape[-2] - n], -2)
            code, scale, zero = quantize4(old.unflatten(-2, (-1, self.group)), -2)
            self.keys = torch.cat([self.keys, pack4(code.flatten(-3, -2))], -2)
            self.key_scales = torch.cat([self.key_scales, scale[..., 0, :]], -2)
            self.key_zeros = torch.cat([self.key_zeros, zero[..., 0, :]], -2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        return self.read_keys(), self.read_values()

    def read_keys(self, *index: torch.Tensor) -> torch.Tensor:
        """Every slot's keys (``keys[index]`` with ``index``) dequantized to the model's dtype."""
        code = unpack4(self.keys).unflatten(-2, (-1, self.group)).float()  # in float32: the bound holds in any dtype
        old = (code * self.key_scales[..., None, :].float() + self.key_zeros[..., None, :].float()).flatten(-3, -2)
        return torch.cat([old.to(self.dtype), self.key_recent], -2)[index]

    def read_values(self) -> torch.Tensor:
        """Every slot's values dequantized to the model's dtype."""
        code = unpack4(self.values).unflatten(-1, (-1, self.group)).float()
        old = (code * self.value_scales[..., None].float() + self.value_zeros[..., None].float()).flatten(-2)
        return torch.cat([old.to(self.dtype), self.value_recent], -2)

    def get_seq_length(self) -> int:
        return self.values.shape[-2] + self.value_recent.shape[-2] if self.is_initialized else 0

    def full_bytes(self, slots: int) -> int:
        v = self.value_recent
        if v is None or self.get_seq_length() == 0:
            return 0
        return 2 * v.shape[0] * v.shape[1] * v.shape[-1] * self.dtype.itemsize * slots

    def keep_slots(self, index: torch.Tensor) -> None:
        """Keep the slots ``index`` (see ``KVLayer.keep_slots``): the kept slots are dequantized, gathered and stored
        again (keys requantized in new blocks, the newest ``residual`` in full precision)."""
        if self.get_seq_length() == 0:
            return
        i = (index[:, None] if index.dim() == 2 else index)[..., None]
        take = lambda x: x.gather(2, i.expand(x.shape[0], x.shape[1], -1, x.shape[-1]))
        keys = take(self.read_keys()) if self.key_recent.shape[1] else None
        values = take(self.read_values())
        self.lazy_initialization(self.key_recent if keys is None else keys, values)
        self._append(keys, values)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an int4 cache layer cannot be cropped (its keys are quantized in blocks of tokens).")

    def reset(self) -> None:
        super().reset()
        self.key_zeros = self.value_zeros = self.key_recent = self.value_recent = None


class Int4ValueOnlyLayer(Int4Layer):
    """A ``ValueOnlyLayer`` whose V is int4 per token (``Int4Layer``'s values); it stores no K."""

    def update(self, key_states: torch.Tensor | None, value_states: torch.Tensor, cache_kwargs: dict | None = None, **kwargs):
        if key_states is not None:
            raise RuntimeError("a mapped layer must not cache keys")
        if not self.is_initialized:
            self.lazy_initialization(value_states[:, :0], value_states)
        self._append(None, value_states)
        return None, self.read_values()


class Windowed:
    """A cache layer of a local (sliding-window) attention layer, mixed into one of the layers above: like transformers'
    ``DynamicSlidingWindowLayer`` it keeps the last ``window - 1`` slots only, and an update returns the kept and the
    new ones (the layer's mask spans those, ``get_mask_sizes``)."""

    is_sliding = True

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window, self.cumulative_length = window, 0

    def update(self, key_states, value_states, cache_kwargs: dict | None = None, **kwargs):
        out = super().update(key_states, value_states, cache_kwargs, **kwargs)
        self.cumulative_length += value_states.shape[-2]
        for name in self.stores:
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x[..., max(x.shape[-2] - self.window + 1, 0) :, :])
        return out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = min(self.cumulative_length, self.window - 1)
        return kept + query_length, self.cumulative_length - kept

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


class WindowedKVLayer(Windowed, KVLayer):
    """``KVLayer`` of a local layer."""


class WindowedValueOnlyLayer(Windowed, ValueOnlyLayer):
    """``ValueOnlyLayer`` of a local layer."""


class WindowedInt8Layer(Windowed, Int8Layer):
    """``Int8Layer`` of a local layer."""


class WindowedInt8ValueOnlyLayer(Windowed, Int8ValueOnlyLayer):
    """``Int8ValueOnlyLayer`` of a local layer."""


def layer_for(kind: str, value_only: bool = False, window: int | None = None, int4: tuple[int, int] = (32, 128)) -> KVLayer:
    """A new cache layer: K and V, or V only (a wholly mapped layer), in the model's dtype, int8 or int4 (``int4``:
    ``Int4Layer``'s group and residual); of a local layer keeping its last ``window - 1`` slots (``Windowed``) where
    ``window`` is given (not with int4: ``MappingConfig.check_head_dims`` refuses it)."""
    if kind == "int4":
        if window is not None:
            raise ValueError("an int4 cache is not served on sliding-window (local) layers.")
        return Int4ValueOnlyLayer(*int4) if value_only else Int4Layer(*int4)
    if kind == "int8":
        plain, local = (Int8ValueOnlyLayer, WindowedInt8ValueOnlyLayer) if value_only else (Int8Layer, WindowedInt8Layer)
    else:
        plain, local = (ValueOnlyLayer, WindowedValueOnlyLayer) if value_only else (KVLayer, WindowedKVLayer)
    return plain() if window is None else local(window)


def slm_cache(config: PretrainedConfig, kind: str = "native", int4: tuple[int, int] = (32, 128)) -> DynamicCache:
    """The SLM's cache for a paired run: ``KVLayer`` (``native``), ``Int8Layer`` or ``Int4Layer`` (``int4``: its
    group and residual) everywhere."""
    cache = DynamicCache(config=config)
    cache.layers = [layer_for(kind, False, None, int4) for _ in cache.layers]
    return cache


def cache_bytes(cache: Cache | None) -> int:
    """Bytes held by every layer of ``cache`` (one of ``KVLayer``s)."""
    return 0 if cache is None else sum(layer.nbytes for layer in cache.layers)
