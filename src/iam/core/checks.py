"""The checks of a paired run that a model makes before it runs: the pair (configs, then loaded modules), a config
with its eviction policy against the pair, a forward's inputs and ``generate()``'s arguments; and ``load_checked``,
the loader that makes every check needing no weights before any load."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from ..models.loading import load_pair, read_configs
from ..models.placement import Placement, check_device
from .config import MappingConfig
from .decoder import decoder_layers
from .errors import ConfigError
from .eviction import EvictionPolicy
from .families import check_blend, check_family, check_features, check_kinds, check_windows
from .kernels import Kernels
from .parallel import shard_of
from .resolution import Resolved, resolve
from .selection import Plan, plan_of

SUPPORTED_ATTENTION = ("sdpa", "eager")

UNSUPPORTED_GENERATION = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "custom_generate": "custom generation methods",
    "output_attentions": "output_attentions (mapped layers form no attention matrix)",
    "output_hidden_states": "output_hidden_states",
}
"""``generate()`` arguments that IAM refuses, with the mode each one selects."""


def check_pair_configs(llm: PretrainedConfig, slm: PretrainedConfig) -> None:
    """Raise ``ValueError`` unless the two configs are causal LMs of one supported family with one vocabulary, whose
    sliding windows IAM serves (``iam.core.families``)."""
    for role, config in (("LLM", llm), ("SLM", slm)):
        check_family(role, config)
        check_windows(role, config)
    if llm.model_type != slm.model_type:
        raise ValueError(
            f"LLM and SLM are of different families ({llm.model_type!r} vs {slm.model_type!r}); "
            "IAM needs two models of one family."
        )
    if llm.vocab_size != slm.vocab_size:
        raise ValueError(
            f"LLM and SLM vocabularies differ (vocab_size {llm.vocab_size} vs {slm.vocab_size}); "
            "IAM needs one tokenizer for both."
        )
    check_kinds(llm, slm)


def check_pair(llm: nn.Module, slm: nn.Module) -> None:
    """Raise ``ValueError`` unless ``llm`` and ``slm`` are causal LMs of one supported family with one vocabulary,
    loaded with a supported attention implementation, on one device (unless the LLM is dispatched over several), the
    SLM whole (not sharded by tensor parallelism)."""
    for role, model in (("LLM", llm), ("SLM", slm)):
        if not isinstance(getattr(model, "config", None), PretrainedConfig):
            raise ValueError(f"{role} is not a transformers model (it has no config).")
    check_pair_configs(llm.config, slm.config)
    for role, model in (("LLM", llm), ("SLM", slm)):
        impl = model.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"{role} uses attn_implementation {impl!r}; load it with one of {list(SUPPORTED_ATTENTION)}.")
    if shard_of(decoder_layers(slm)[0].self_attn) is not None:
        raise ValueError(
            "the SLM is sharded (loaded with tp_plan): load it whole on every rank. Sharding a small model fails once "
            "the tensor-parallel size exceeds its KV heads, and IAM reads every SLM head on every rank."
        )
    if llm.device != slm.device and getattr(llm, "hf_device_map", None) is None:
        raise ValueError(
            f"LLM is on {llm.device} but SLM on {slm.device}; put both on one device (or dispatch the LLM with a "
            "device_map: from_pretrained(..., device_map=...))."
        )


def check_eviction(config: MappingConfig, eviction: EvictionPolicy | None) -> None:
    """Raise ``ValueError`` where ``eviction`` cannot serve ``config``."""
    if eviction is not None and eviction.decode and "int4" in (config.llm_cache, config.slm_cache):
        raise ValueError(
            f"{type(eviction).__name__} evicts at every decode step, and an int4 cache would quantize its keys again "
            "each time (they are grouped in blocks of tokens): use int8, or a policy that evicts after prefill only "
            "(snapkv, kvzip, draft-kvzip)."
        )
    if eviction is None or not config.local_window or not isinstance(eviction.budget, int):
        return
    protected = eviction.reserved + config.sinks + config.local_window
    if eviction.budget < protected:
        raise ConfigError(
            "budget",
            f"{{param}} {eviction.budget} is smaller than the {protected} tokens the policy and the exact local window "
            f"always keep ({eviction.reserved} + local_sinks {config.sinks} + local_window {config.local_window}).",
        )


def planned(resolved: Resolved, llm: PretrainedConfig) -> Plan | None:
    """The plan a resolved config fixes for an LLM of config ``llm`` before any input; ``None`` where the strategy
    chooses per input (``"similar"``)."""
    config, strategy, n_kv = resolved.config, resolved.strategy, llm.num_key_value_heads
    if resolved.fixed is not None:
        return resolved.fixed.plan
    if config.layers is not None:
        return plan_of(config.layers, n_kv)
    if strategy.needs_scores:
        return None
    return strategy.plan(llm.num_hidden_layers, n_kv, config.ratio)


def check_scope(resolved: Resolved, llm: PretrainedConfig) -> None:
    """Raise ``ValueError`` where eviction over the unmapped layers only would have no layer to evict from (every layer
    has a mapped KV group): its budget could not be honoured."""
    plan = planned(resolved, llm) if resolved.partial else None
    if plan is not None and len(plan) == llm.num_hidden_layers:
        raise ValueError(
            f"{resolved.eviction!r} evicts only from layers without a mapped KV group, and this mapping leaves none: lower the "
            "ratio, or evict with scope='all'."
        )


def checked(
    config: MappingConfig,
    llm: PretrainedConfig,
    slm: PretrainedConfig,
    eviction: EvictionPolicy | None = None,
    kernels: Kernels = Kernels(),
    tensor_parallel: bool = False,
) -> Resolved:
    """The run spec of ``config`` with ``eviction`` and ``kernels`` for the pair of configs ``llm`` and ``slm``, resolved
    and checked: the one validation of a run's settings, before any weights (``load_checked``) and at wrapping
    (``IAMForCausalLM``). Raises ``ValueError`` naming what cannot be served."""
    check_eviction(config, eviction)
    config.check_head_dims(llm, slm)
    check_features(llm, config.local_window, eviction, tensor_parallel)
    resolved = resolve(config, llm, slm, eviction, kernels)
    check_blend(llm, slm, resolved.config.blend)
    check_scope(resolved, llm)
    return resolved


def load_checked(
    llm: str | os.PathLike,
    slm: str | os.PathLike,
    configs: Sequence[MappingConfig] = (),
    eviction: EvictionPolicy | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    force: bool = False,
    placement: Placement | None = None,
) -> tuple[nn.Module, nn.Module, PreTrainedTokenizerBase]:
    """Load ``(llm, slm, tokenizer)`` after every check that needs no weights: the device, each of ``configs`` with
    ``eviction``, the pair's configs, the ``placement``, and each config resolved against the pair (its stored order
    and blend, its units, the eviction's scope). ``from_pretrained`` and the command line load through it."""
    placement = placement or Placement()
    if slm is None:
        why = " (draft-kvzip scores with it)" if eviction is not None and eviction.reconstruct == "slm" else ""
        raise ValueError(f"an SLM is needed{why}: give slm, an alias, GGUF file or model folder of the LLM's family.")
    check_device(device)
    llm_config, slm_config = read_configs(llm, slm, progress, force)
    check_pair_configs(llm_config, slm_config)
    placement.check(llm_config, device)
    for config in configs:
        checked(config, llm_config, slm_config, eviction, tensor_parallel=placement.tensor_parallel)
    return load_pair(llm, slm, dtype=dtype, device=device, progress=progress, force=force, placement=placement)


def check_inputs(
    input_ids, attention_mask, past: int, llm: PretrainedConfig, slm: PretrainedConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a forward's inputs after ``past`` cached columns; returns the ids and the full 2D mask (ones where none is
    given, as long)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a [batch, length] LongTensor.")
    b, t = input_ids.shape
    if b == 0 or t == 0:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} is empty: give at least one row of one token.")
    vocab = llm.vocab_size
    if input_ids.min() < 0 or input_ids.max() >= vocab:
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab}): {input_ids.min()}..{input_ids.max()}.")
    if attention_mask is None:
        attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
    if attention_mask.dim() != 2 or attention_mask.shape != (b, past + t):
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must be 2D [batch, cached + new tokens] = {(b, past + t)}."
        )
    if attention_mask.dtype != torch.bool and attention_mask.dtype.is_floating_point:
        raise ValueError(f"attention_mask must be 0/1, bool or integer, got dtype {attention_mask.dtype}.")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"attention_mask must hold only 0 and 1, got values {sorted(mask.unique().tolist())}.")
    if (mask.diff(dim=-1) < 0).any() or (mask[:, -1] == 0).any():
        raise ValueError(
            "attention_mask must be left-padded (padding first, then the prompt): set tokenizer.padding_side='left'."
        )
    limit = min(llm.max_position_embeddings, slm.max_position_embeddings)
    if past + t > limit:
        raise ValueError(f"context too long: {past + t} tokens exceed the models' {limit}-position limit.")
    return input_ids, mask


def check_generate(
    llm: PretrainedConfig, slm: PretrainedConfig, default: GenerationConfig, inputs, generation_config, kwargs: dict
) -> None:
    """Refuse, with a ``ValueError`` that names them, the ``generate()`` modes IAM cannot serve
    (``UNSUPPORTED_GENERATION``), ``use_cache=False``, a static cache, and a prompt whose generation would run past the
    models' positions (``default``: the model's own generation config)."""
    for name, mode in UNSUPPORTED_GENERATION.items():
        value = kwargs.get(name, getattr(generation_config, name, None))
        if value not in (None, False):
            raise ValueError(f"IAMForCausalLM does not support {mode} (got {name}={value!r}).")
    config = generation_config if generation_config is not None else default
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ValueError("IAMForCausalLM does not support use_cache=False: the SLM's cache and the mapping live in the cache.")
    implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    if implementation not in (None, "dynamic"):
        raise ValueError(f"IAMForCausalLM keeps its own IAMCache; cache_implementation={implementation!r} is not supported.")
    ids = kwargs.get("input_ids", inputs)
    if isinstance(ids, torch.Tensor) and (ids.dim() != 2 or 0 in ids.shape):  # transformers: an IndexError
        raise ValueError(f"input_ids must be a non-empty [batch, length] LongTensor, got shape {tuple(ids.shape)}.")
    if isinstance(ids, torch.Tensor):  # refused before generating, not midway with the tokens so far lost
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        total = ids.shape[1] + new if new is not None else kwargs.get("max_length", getattr(config, "max_length", None))
        limit = min(llm.max_position_embeddings, slm.max_position_embeddings)
        if total is not None and total - 1 > limit:  # the last token generated is never fed back
            raise ValueError(
                f"a prompt of {ids.shape[1]} tokens generating up to {total - ids.shape[1]} more needs {total - 1} "
                f"positions, beyond the models' {limit}: generate at most {max(limit + 1 - ids.shape[1], 0)} new tokens."
            )
