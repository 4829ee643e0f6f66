"""The cache of a paired run: ``IAMCache`` holds the LLM's cache layers (``iam.core.layers``; ``ValueOnlyLayer``
where a whole layer is mapped), the SLM's cache and the ``Mapping``, and ``Signature``, what made it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .eviction import EvictionPolicy
from .families import head_dim, local_windows
from .kept import Kept
from .layers import SLM_CACHES, KVLayer, LocalKeys, cache_bytes, layer_for, slm_cache
from .mapping import Mapping

__all__ = ["SLM_CACHES", "IAMCache", "KVLayer", "LocalKeys", "Signature", "slm_cache"]


@dataclass(frozen=True)
class Signature:
    """What made an ``IAMCache``, compared by value: a model continues only a cache whose signature equals its own
    (so a deep copy, or a cache of another wrapper of the same pair and settings, serves).

    Parameters
    ----------
    llm, slm : the two models' configs, as JSON.
    mapping : the resolved mapping config and layer selection (what sets the plan), as text.
    eviction : the eviction policy, as text (``"None"`` without one).
    slm_cache : as ``MappingConfig.slm_cache``.
    local : ``(sinks, window)`` of the exact local window, if any.
    kernels : the kernel options, as text.
    """

    llm: str
    slm: str
    mapping: str
    eviction: str
    slm_cache: str
    local: tuple[int, int] | None
    kernels: str

    def refuse(self, other: Signature | None) -> None:
        """Raise ``ValueError``, naming what differs, unless ``other`` (a cache's signature) equals this one."""
        if other == self:
            return
        if other is None:
            raise ValueError("this cache was not made by an IAMForCausalLM: use model.new_cache().")
        names = {"llm": "LLM config", "slm": "SLM config", "mapping": "mapping config", "eviction": "eviction policy"}
        names.update(slm_cache="SLM cache kind", local="local window (sinks, window)", kernels="kernel options")
        differ = [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        what = "; ".join(
            f"another {names[n]}"
            if n in ("llm", "slm", "mapping")
            else f"{names[n]} {getattr(other, n)}, not this model's {getattr(self, n)}"
            for n in differ
        )
        raise ValueError(f"this cache was made for {what}: use model.new_cache().")


def _slots(valid: torch.Tensor, attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """The 2D mask over kept slots ``valid`` (``[B, S]``) and the ``new`` tokens' part of the caller's mask."""
    return torch.cat([valid.long(), attention_mask[:, -new:].to(valid.device)], -1)


class IAMCache(Cache):
    """The cache of an ``IAMForCausalLM`` call: the LLM's layers (``self.layers``), the SLM's cache (``self.slm``)
    and, once the context has reached ``establish_threshold``, the ``Mapping`` (``self.mapping``).

    Until the mapping is established the LLM runs alone, its layers are plain ``KVLayer`` and, where something is
    mapped, the cache keeps the tokens seen (``self.tokens``, at ``self.token_positions``), so that the forward which
    reaches the threshold can prefill both models over the whole context (``context``). The cache counts what each
    forward adds itself (``advance``). From then on a wholly mapped layer holds a ``ValueOnlyLayer``
    and a partly mapped one keeps K for its unmapped KV groups only. Beam search's reorder, repeat and select apply
    to both models and the mapping.

    Where the model evicts tokens (``iam.core.eviction``) the cache keeps one set of tokens per sequence
    (``self.kept``, ``iam.core.kept``) for every layer of both models, or, with ``scope="unmapped"``, for the LLM's
    layers that keep K and V only: evicted slots are compacted away, and the slots a shorter row lacks are masked like
    left padding. The cache holds tensors and their bookkeeping; the policy is the model's, passed to ``evict``.

    Parameters
    ----------
    llm_config, slm_config : the two models' configs.
    slm_cache_kind : ``"native"``, ``"int8"`` or ``"int4"`` (see ``MappingConfig.slm_cache``).
    llm_cache_kind : the same for the LLM's layers (see ``MappingConfig.llm_cache``).
    local : ``(sinks, window)`` where mapped layers attend exactly to a local window (``MappingConfig.local_window``):
        their mapped groups' K for those tokens is in ``self.local``, one ``LocalKeys`` per LLM layer.
    signature : what made the cache (``None`` for an internal one); only a model of an equal signature continues it.
    int4 : ``(group, residual)`` of the int4 layers (``Int4Layer``).
    mapped : whether the model maps anything, so that a mapping will be established: until then the cache keeps the
        tokens seen.
    """

    def __init__(
        self,
        llm_config: PretrainedConfig,
        slm_config: PretrainedConfig,
        slm_cache_kind: str = "native",
        local: tuple[int, int] | None = None,
        llm_cache_kind: str = "native",
        signature: Signature | None = None,
        mapped: bool = False,
        int4: tuple[int, int] = (32, 128),
    ) -> None:
        n_layers = llm_config.num_hidden_layers
        self.llm_cache_kind, self.int4 = llm_cache_kind, int4
        self.windows = local_windows(llm_config)  # a Gemma local layer keeps its window only, as the LLM alone does
        super().__init__(layers=[layer_for(llm_cache_kind, False, w, int4) for w in self.windows])
        self.n_kv = llm_config.num_key_value_heads
        self.slm = slm_cache(slm_config, slm_cache_kind, int4)
        # a container of LocalKeys, moved with the batch; the mapped layers update them (``LocalKeys.update``)
        self.local = Cache(layers=[LocalKeys(*local) for _ in range(n_layers)]) if local else None
        self.signature = signature
        self.mapped = mapped
        self.mapping: Mapping | None = None
        self.tokens: torch.Tensor | None = None
        self.token_positions: torch.Tensor | None = None  # the caller's position ids of ``tokens``
        self.kept: Kept | None = None
        self.columns = 0  # tokens (padding included) seen so far: the width of the caller's attention mask
        self.scoring_s = 0.0  # seconds spent scoring for eviction by a repeat pass (``KVzip``)
        self._slm_row = 2 * slm_config.num_hidden_layers * slm_config.num_key_value_heads * head_dim(slm_config)

    @property
    def established(self) -> bool:
        return self.mapping is not None

    @property
    def is_croppable(self) -> bool:
        return False

    def establish(self, mapping: Mapping) -> None:
        """Start over with ``mapping``: every LLM layer emptied (the establishing forward prefills the whole context
        again), a ``ValueOnlyLayer`` at each wholly mapped one."""
        kind = self.llm_cache_kind
        self.layers = [
            layer_for(kind, len(mapping.plan.get(i, ())) == self.n_kv, w, self.int4) for i, w in enumerate(self.windows)
        ]
        self.mapping = mapping
        self.tokens = self.token_positions = None
        if self.local is not None:
            self.local.reset()

    def context(self, ids: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens kept so far, then ``ids`` ``[B, t]``, with their position ids: the whole context that the
        establishing forward prefills."""
        if self.tokens is None:
            return ids, position_ids
        return torch.cat([self.tokens, ids], -1), torch.cat([self.token_positions, position_ids], -1)

    def advance(self, attention_mask: torch.Tensor, ids: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Count a forward that is done: the caller's mask now spans ``attention_mask``'s columns, and until a
        mapping is established (where the model maps anything) the new tokens ``ids`` at ``position_ids`` are kept
        for the forward that establishes it."""
        if self.mapped and not self.established:
            self.tokens, self.token_positions = self.context(ids, position_ids)
        self.columns = attention_mask.shape[1]

    def drop_slm_layers(self, depth: int) -> None:
        """Free the SLM's cache layers from ``depth`` on (no mapping reads them)."""
        for layer in self.slm.layers[depth:]:
            layer.reset()

    def first_slots(self, partial: bool) -> torch.Tensor:
        """``[B]`` each sequence's first real slot in the mapped layers: where the mapping's window starts, or, once
        tokens are evicted from them (not ``partial``: they follow the kept set), past the front padding that
        compaction leaves."""
        if self.kept is None or partial:
            return self.mapping.window.starts
        return (~self.kept.valid).sum(-1)

    def slot_mask(self, attention_mask: torch.Tensor, new: int) -> torch.Tensor:
        """The 2D mask over this forward's cache slots and ``new`` tokens in the layers that follow the kept set: the
        caller's, or, once tokens are evicted, the kept slots' validity and the new tokens' part of the caller's."""
        return attention_mask if self.kept is None else _slots(self.kept.valid, attention_mask, new)

    def own_slot_masks(self, attention_mask: torch.Tensor, new: int) -> dict[int, torch.Tensor]:
        """``slot_mask`` of each LLM layer whose KV groups keep slots of their own (``Kept.own``)."""
        own = {} if self.kept is None else self.kept.own
        return {i: _slots(valid, attention_mask, new) for i, valid in own.items()}

    def track(self, attention_mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Record the slots just written (``[B, t]`` mask and true positions) in the kept set (where a policy evicts)."""
        if self.kept is None:
            self.kept = Kept.empty(attention_mask.shape[0], attention_mask.device)
        self.kept.append(attention_mask, positions)

    def evict(
        self,
        policy: EvictionPolicy,
        layers: list[int],
        mass: torch.Tensor | None,
        prefill: bool,
        groups: dict[int, torch.Tensor] | None = None,
        protect: tuple[int, int] | None = None,
    ) -> None:
        """Score the slots with ``mass`` (``[B, S]`` attention received in this forward) and drop what ``policy`` lets
        go from the LLM's ``layers`` and, unless the policy keeps them whole (``scope="unmapped"``), the SLM's.
        ``groups``: ``[B, KV heads, S]`` scores of LLM layers whose KV groups each keep their own slots (``KVzip``,
        ``Kept.select``); ``protect``: ``(sinks, window)`` always kept (``Kept.select``)."""
        kept = self.kept
        if kept is None:
            return
        if mass is not None:
            kept.scores = kept.scores + mass if policy.decode else mass
        if not (prefill or policy.decode):
            return
        chosen = kept.select(policy, protect, groups)
        if chosen is None:
            return
        index, own = chosen
        for i in layers:
            self.layers[i].keep_slots(own.get(i, index))
        if not policy.partial:
            for layer in self.slm.layers:
                layer.keep_slots(index)

    def _others(self) -> list[Cache]:
        """The caches that follow the LLM's: the SLM's, and the local keys' where there are any."""
        return [self.slm] if self.local is None else [self.slm, self.local]

    def _rows(self, index: torch.Tensor) -> None:
        if self.mapping is not None:
            self.mapping = self.mapping.rows(index)
        if self.tokens is not None:
            self.tokens = self.tokens[index.to(self.tokens.device)]
            self.token_positions = self.token_positions[index.to(self.tokens.device)]
        if self.kept is not None:
            self.kept = self.kept.rows(index.to(self.kept.valid.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for cache in self._others():
            cache.reorder_cache(beam_idx)
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for cache in self._others():
            cache.batch_repeat_interleave(repeats)
        batch = self._batch_size()
        if batch is not None:
            self._rows(torch.arange(batch).repeat_interleave(repeats))

    def _batch_size(self) -> int | None:
        """Rows of what ``_rows`` moves, where anything is there to move."""
        for rows in (self.tokens, self.kept and self.kept.seen, self.mapping and self.mapping.window.starts):
            if rows is not None:
                return len(rows)
        return None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for cache in self._others():
            cache.batch_select_indices(indices)
        self._rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an IAMCache cannot be cropped: the SLM's cache and the mapping follow the LLM's tokens.")

    def reset(self) -> None:
        self.layers = [layer_for(self.llm_cache_kind, False, w, self.int4) for w in self.windows]  # mapped were V-only
        for cache in self._others():
            cache.reset()
        self.mapping = self.tokens = self.token_positions = self.kept = None
        self.columns, self.scoring_s = 0, 0.0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far, padding included: what the caller's attention mask spans (``generate()`` slices its
        inputs by it). Once tokens are evicted the layers hold fewer slots; see ``get_query_offset``."""
        return self.columns

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Slots cached before this forward's tokens, where the mask places them."""
        return self.layers[layer_idx].get_seq_length()

    def kv_bytes(self) -> dict[str, int]:
        """Bytes in the real caches: ``llm`` (local keys included), ``slm``, ``total``, and ``baseline``, what the LLM
        alone would hold for every token seen, without eviction, in its own dtype (K and V in every layer: twice the
        V bytes per token; a Gemma local layer's last ``window - 1`` slots); ``slm_baseline``, the same for the SLM's
        every layer."""
        llm, slm = cache_bytes(self) + cache_bytes(self.local), cache_bytes(self.slm)
        held = [self.columns if w is None else min(self.columns, w - 1) for w in self.windows]
        baseline = sum(layer.full_bytes(n) for layer, n in zip(self.layers, held))
        first = next((layer for layer in self.layers if layer.is_initialized), None)
        own = next((layer for layer in self.slm.layers if layer.is_initialized), first)  # the SLM's own dtype
        slm_baseline = 0 if first is None else self._slm_row * own.dtype.itemsize * self.columns * first.values.shape[0]
        return {"llm": llm, "slm": slm, "total": llm + slm, "baseline": baseline, "slm_baseline": slm_baseline}

    def kv_bytes_by_device(self) -> dict[str, int]:
        """``kv_bytes()["total"]`` split by the device each tensor is on (an LLM dispatched over several devices keeps
        each layer's cache on its layer's device). Under tensor parallelism these are this rank's bytes."""
        out: dict[str, int] = {}
        for cache in (self, self.local, self.slm):
            for layer in [] if cache is None else cache.layers:
                for t in layer.tensors():
                    out[str(t.device)] = out.get(str(t.device), 0) + t.nbytes
        return out
