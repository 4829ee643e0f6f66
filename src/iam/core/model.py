"""``IAMForCausalLM``: a large causal LM that borrows attention from a small one of the same family, as a
transformers model: ``forward`` runs one paired step, and transformers' own ``generate()`` and pipelines drive it.

Flat on purpose (after gpt-fast): ``forward`` picks one of three steps, ``_alone``, ``_establish`` and ``_paired``
(``iam.core.paired``). The run's settings are resolved and checked once, here (``checks.checked``), into the run spec
``self.resolved``, which the steps hand to the cache and to each ``MappedAttention``.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.loading import user_calibrations
from ..models.placement import Placement, input_device
from .cache import IAMCache, Signature
from .checks import check_eviction, check_generate, check_inputs, check_pair, checked, load_checked
from .config import MappingConfig
from .decoder import decoder_layers, positions
from .eviction import EvictionPolicy
from .kernels import Kernels
from .paired import PairedSteps
from .parallel import shard_of
from .resolution import Resolved
from .selection import Plan

__all__ = ["IAMForCausalLM", "check_eviction", "load_checked"]  # the checks re-exported where callers import them


class IAMForCausalLM(PairedSteps, PreTrainedModel, GenerationMixin):
    """An LLM whose mapped layers take their attention from an SLM of the same family (IAM, arXiv 2507.11953).

    Build it with ``from_pair(llm, slm, config)`` or ``from_pretrained(llm=..., slm=..., **mapping)``. Wrapping
    changes nothing in either model, during a call too: the mapped layers' attention is computed beside the
    model's modules, never swapped into them, so one LLM can serve several wrappers, in several threads.
    What a call did (plan, head mapping, blend weights, similarity, KV bytes) comes back on its cache, an
    ``IAMCache`` (``output.cache``, or ``generate(..., return_dict_in_generate=True).cache``).

    Parameters
    ----------
    llm : the large ``*ForCausalLM`` (Qwen2/Qwen2.5 or Llama), loaded with SDPA or eager attention.
    slm : the small ``*ForCausalLM`` of the same family and vocabulary, on the same device.
    config : the ``MappingConfig`` (default ``MappingConfig()``); ``self.mapping_config`` holds it resolved for
        the pair (the stored blend filled in).
    eviction : a token eviction policy (``iam.core.eviction``), composed with the mapping; at ratio 0 it is the
        LLM alone with eviction.
    kernels : which kernels the mapped layers run (``iam.core.kernels.Kernels``), reported in
        ``cache.mapping.summary()``.
    """

    config_class = PretrainedConfig
    base_model_prefix = "llm"
    _supports_sdpa = True

    def __init__(
        self,
        llm: nn.Module,
        slm: nn.Module,
        config: MappingConfig | None = None,
        eviction: EvictionPolicy | None = None,
        kernels: Kernels = Kernels(),
    ) -> None:
        check_pair(llm, slm)
        sharded = shard_of(decoder_layers(llm)[0].self_attn) is not None
        config = config if config is not None else MappingConfig()
        resolved = checked(config, llm.config, slm.config, eviction, kernels, tensor_parallel=sharded)
        super().__init__(copy.deepcopy(llm.config))
        self.llm, self.slm = llm, slm
        self.generation_config = copy.deepcopy(llm.generation_config)
        self.resolved: Resolved = resolved
        self.mapping_config: MappingConfig = resolved.config
        self.n_layers: int = llm.config.num_hidden_layers
        self.n_kv: int = llm.config.num_key_value_heads
        mapping = f"{self.mapping_config!r} {resolved.strategy!r}"
        self.signature = Signature(
            llm.config.to_json_string(),
            slm.config.to_json_string(),
            mapping,
            repr(eviction),
            self.mapping_config.slm_cache,
            resolved.local,
            repr(kernels),
        )

    @property
    def eviction(self) -> EvictionPolicy | None:
        """The token eviction policy (``self.resolved.eviction``)."""
        return self.resolved.eviction

    @property
    def kernels(self) -> Kernels:
        """The kernels the mapped layers run (``self.resolved.kernels``)."""
        return self.resolved.kernels

    @classmethod
    def from_pair(
        cls,
        llm: nn.Module,
        slm: nn.Module,
        config: MappingConfig | None = None,
        eviction: EvictionPolicy | None = None,
        kernels: Kernels = Kernels(),
    ) -> IAMForCausalLM:
        """Wrap two loaded models."""
        return cls(llm, slm, config, eviction, kernels)

    @classmethod
    def from_pretrained(
        cls,
        llm: str | os.PathLike = "qwen2.5-coder-1.5b",
        slm: str | os.PathLike = "qwen2.5-coder-0.5b",
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = True,
        eviction: EvictionPolicy | None = None,
        kernels: Kernels = Kernels(),
        force: bool = False,
        tp_plan: str | dict | None = None,
        distributed_config=None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | os.PathLike | None = None,
        slm_device: str | torch.device | None = None,
        **mapping,
    ) -> IAMForCausalLM:
        """Load a pair by alias, GGUF file or local folder (see ``iam.models.loading``) and wrap it; ``mapping`` holds
        ``MappingConfig`` fields (``calibrations``: the user's folder, ``user_calibrations``, unless given). The config
        is checked against the pair's configs before any weights load, and an
        SLM tuned through another LLM (``iam tune``) is refused unless ``force``.

        ``tp_plan``/``distributed_config`` (tensor parallelism, under ``torchrun``) or ``device_map``/``max_memory``/
        ``offload_folder`` (accelerate dispatch) go to transformers' ``from_pretrained`` for the LLM; the SLM is
        loaded whole, on each rank's device or on ``slm_device`` (see ``iam.models.placement``)."""
        config = MappingConfig(**{"calibrations": user_calibrations(), **mapping})
        placement = Placement(tp_plan, distributed_config, device_map, max_memory, offload_folder, slm_device)
        big, small, _ = load_checked(
            llm, slm, [config], eviction, dtype=dtype, device=device, progress=progress, force=force, placement=placement
        )
        return cls(big, small, config, eviction, kernels)

    def save_pretrained(self, *args, **kwargs) -> None:
        """Refused with a ``ValueError``: one folder would hold both models' weights under the LLM's config, which
        loads as a randomly initialised LLM. Save ``model.llm`` and ``model.slm`` each with its own
        ``save_pretrained`` and keep the ``MappingConfig`` (and eviction policy) to wrap them again."""
        raise ValueError(
            "IAMForCausalLM cannot be saved as one folder (it would load as a random LLM): save model.llm and model.slm "
            "each with save_pretrained, and wrap them again with their MappingConfig."
        )

    @property
    def device(self) -> torch.device:
        """Where inputs go: the LLM's embedding's execution device (``input_device``), also where a dispatched LLM's
        first weights wait on disk."""
        return input_device(self.llm)

    @property
    def planned(self) -> Plan | None:
        """The plan the config fixes before any input (``{}`` at ratio 0); ``None`` where the strategy chooses per
        input (``"similar"``)."""
        return self._planned

    def new_cache(self) -> IAMCache:
        """An empty cache for this pair; pass it to ``forward`` or ``generate`` and read the results off it."""
        config = self.mapping_config
        return IAMCache(
            self.llm.config,
            self.slm.config,
            config.slm_cache,
            self.resolved.local,
            config.llm_cache,
            self.signature,
            mapped=config.maps,
            int4=config.int4,
        )

    # ---- generate --------------------------------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' ``generate()``, refusing the modes IAM cannot serve (``checks.check_generate``)."""
        check_generate(self.llm.config, self.slm.config, self.generation_config, inputs, generation_config, kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """One paired step over the new tokens ``input_ids`` ``[B, t]``.

        ``attention_mask`` is the 2D mask of every token so far (cached and new; left padding only), ``cache`` the
        ``IAMCache`` of earlier steps (``past_key_values`` is its old name; ``None`` or an empty cache starts a new
        sequence). The cache is always kept and returned (``use_cache`` is accepted for ``generate()``). Returns the
        LLM's logits (the last ``logits_to_keep`` positions, all for 0), the loss with
        ``labels``, and the cache, which carries the mapping.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("IAMForCausalLM takes input_ids, not inputs_embeds: the SLM reads the same tokens.")
        cache = self._cache(cache if cache is not None else past_key_values)
        ids, mask = check_inputs(input_ids, attention_mask, cache.columns, self.llm.config, self.slm.config)
        ids, mask = ids.to(self.device), mask.to(self.device)
        t = ids.shape[1]
        if position_ids is None:
            position_ids = positions(mask, t)
        if cache.established:
            logits = self._paired(cache, ids, mask, position_ids, logits_to_keep)
        elif self._ready(mask):
            logits = self._establish(cache, ids, mask, position_ids, logits_to_keep)
        else:
            logits = self._alone(cache, ids, mask, position_ids, logits_to_keep)
        cache.advance(mask, ids, position_ids)
        loss = None
        if labels is not None:
            loss = self.llm.loss_function(logits=logits, labels=labels.to(logits.device), vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _cache(self, cache: Cache | None) -> IAMCache:
        if isinstance(cache, IAMCache):
            self.signature.refuse(cache.signature)
            return cache
        if cache is None or cache.get_seq_length() == 0:  # e.g. the empty DynamicCache that generate() makes
            return self.new_cache()
        raise ValueError(f"IAMForCausalLM continues only its own IAMCache, got a filled {type(cache).__name__}.")

    def _ready(self, mask: torch.Tensor) -> bool:
        """Whether this forward establishes the mapping: something is mapped and the shortest sequence holds
        ``establish_threshold`` tokens, or at once with a fixed mapping (it needs no window)."""
        threshold = 1 if self.resolved.fixed is not None else self.mapping_config.establish_threshold
        return self.mapping_config.maps and int(mask.sum(-1).min()) >= threshold
