"""``IAMForCausalLM``: a large causal LM that borrows attention from a small one of the same family, as a
transformers model: ``forward`` runs one paired step, and transformers' own ``generate()`` and pipelines drive it.

Flat on purpose (after gpt-fast): ``forward`` picks one of three steps, ``_alone`` (the LLM before the mapping
exists), ``_establish`` (the forward where the context reaches ``establish_threshold``: both models over the whole
context, the mapping set) and ``_paired`` (the SLM, then the LLM with its mapped layers).
"""

from __future__ import annotations

import copy
import os
import time
import warnings

import torch
from torch import nn
from torch.profiler import record_function
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.loading import user_calibrations
from ..models.placement import Placement, input_device
from .attention import MappedAttention
from .cache import IAMCache, Signature
from .checks import check_eviction, check_generate, check_inputs, check_pair, checked, load_checked, planned
from .config import MappingConfig
from .decoder import Pass, decoder_layers, local_window, positions, softcap
from .eviction import EvictionPolicy, attention_mass, repeat_scores
from .families import family, layer_kinds
from .kernels import Kernels
from .layers import slm_cache
from .mapping import Mapping, SLMWindow, Window, cap, slm_window_flats, window_attention
from .parallel import gather_heads, shard_of, sum_heads
from .resolution import Resolved
from .selection import Plan
from .similarity import METRICS
from .step import SLMStep

__all__ = ["IAMForCausalLM", "check_eviction", "load_checked"]  # the checks re-exported where callers import them


class IAMForCausalLM(PreTrainedModel, GenerationMixin):
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
        return planned(self.resolved, self.llm.config)

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

    # ---- the three steps -------------------------------------------------------------------------------------
    def _alone(self, cache: IAMCache, ids, mask, position_ids, logits_to_keep: int) -> torch.Tensor:
        """The LLM alone, before the mapping exists (the cache keeps the tokens for the forward that establishes it,
        ``IAMCache.advance``)."""
        if self.mapping_config.maps:  # eviction waits for the mapping, whose forward prefills the whole context
            run = Pass(self.llm, ids, mask, position_ids, cache)
            for i in range(self.n_layers):
                run.layer(i)
            return self._logits(run, logits_to_keep)
        return self._llm_step(cache, ids, mask, position_ids, logits_to_keep, None)

    def _establish(self, cache: IAMCache, ids, mask, position_ids, logits_to_keep: int) -> torch.Tensor:
        """Both models over the whole context (earlier tokens and these): the SLM first, with every layer's queries;
        then the plan and the LLM, whose mapped layers match their heads on the window as they are reached. Returns
        the logits of this forward's tokens only."""
        t = ids.shape[1]
        ids, position_ids = cache.context(ids, position_ids)
        needs_scores = self.resolved.strategy.needs_scores
        if needs_scores and ids.shape[0] > 1:
            raise ValueError(
                "strategy 'similar' chooses layers per input: run one sequence at a time (a batch would choose for all "
                "rows at once)."
            )
        config, fixed = self.mapping_config, self.resolved.fixed
        cache.slm.reset()
        if fixed is not None:  # the heads are known: the SLM runs only as deep as they borrow, and no window is matched
            step, establishing = self._slm_step(cache, ids, mask, position_ids, fixed.slm_depth), None
            window = Window.from_mask(mask, config.truncation_threshold)
        else:
            step, establishing = self._slm_window(cache, ids, mask, position_ids, config.truncation_threshold)
            window = establishing.window
        probe = self._probe(ids, establishing) if needs_scores else None
        plan = self._plan(probe)
        heads = self.config.num_attention_heads
        mapping = Mapping(plan, window, heads, self.n_kv, config.metric, config.blend, probe=probe, kernels=self.kernels)
        cache.establish(mapping if fixed is None else fixed.mapping(ids.shape[0], mapping))
        logits = self._llm_step(cache, ids, mask, position_ids, logits_to_keep or t, step, establishing)
        cache.drop_slm_layers(cache.mapping.slm_layers[-1] + 1)  # from here on the SLM runs only this deep
        return logits

    def _paired(self, cache: IAMCache, ids, mask, position_ids, logits_to_keep: int) -> torch.Tensor:
        """The SLM over the new tokens, as deep as the mapping reads, then the LLM with its mapped layers."""
        with record_function("iam.slm"):
            step = self._slm_step(cache, ids, mask, position_ids, cache.mapping.slm_layers[-1] + 1)
        return self._llm_step(cache, ids, mask, position_ids, logits_to_keep, step)

    # ---- parts -----------------------------------------------------------------------------------------------
    def _slm_window(self, cache: IAMCache, ids, mask, position_ids, truncation: int) -> tuple[SLMStep, SLMWindow]:
        """The SLM over the whole context, every layer (its queries recorded), and what it provides to establish a
        mapping: its attention on the window of the first ``truncation`` real tokens."""
        with record_function("iam.slm"):
            step = self._slm_step(cache, ids, mask, position_ids, self.slm.config.num_hidden_layers)
        with record_function("iam.slm_window"):
            window = Window.from_mask(mask, truncation)
            keys = [layer.read_keys() for layer in cache.slm.layers]
            attns = [layer.self_attn for layer in decoder_layers(self.slm)]
            own = [local_window(attn) for attn in attns]  # the SLM's own attention, as its layers compute it
            flats = slm_window_flats(step.queries, keys, step.scaling, window, softcap(attns[0]), own)
        config = self.mapping_config
        kinds = tuple(layer_kinds(self.slm.config)) if family(self.llm.config).local_layers else None
        heads = self.slm.config.num_attention_heads
        return step, SLMWindow(window, flats, heads, METRICS[config.metric], config.blend, kinds)

    def _slm_step(self, cache: IAMCache, ids, mask, position_ids, depth: int) -> SLMStep:
        """The SLM's base model (never its LM head) through ``depth`` layers, recording their queries."""
        device = self.slm.device  # the SLM may sit apart from a dispatched LLM's first layer
        slots = (mask if self.resolved.partial else cache.slot_mask(mask, ids.shape[1])).to(device)
        queries = Pass(self.slm, ids.to(device), slots, position_ids.to(device), cache.slm).queries(depth)
        attn = decoder_layers(self.slm)[0].self_attn
        return SLMStep(queries, cache.slm.layers, attn.num_key_value_groups, attn.scaling, *self._borrowing)

    @property
    def _borrowing(self) -> tuple[float | None, list[int | None] | None]:
        """How the LLM's mapped layers attend, applied to the SLM's logits they borrow: the LLM's soft-cap, and per SLM
        layer the window of the LLM layers that borrow from it (local layers borrow from local ones only)."""
        attns = [layer.self_attn for layer in decoder_layers(self.llm)]
        windows = {kind: local_window(attn) for kind, attn in zip(layer_kinds(self.llm.config), attns)}
        local = [windows.get(kind) for kind in layer_kinds(self.slm.config)] if family(self.llm.config).local_layers else None
        return softcap(attns[0]), local

    def _llm_step(
        self,
        cache: IAMCache,
        ids,
        mask,
        position_ids,
        logits_to_keep: int,
        step: SLMStep | None,
        establishing: SLMWindow | None = None,
    ) -> torch.Tensor:
        """The LLM over the new tokens, its mapped layers (if any) reading ``step``; then eviction, if the cache has
        a policy."""
        t = ids.shape[1]
        policy = self.eviction
        first = cache.kept is None
        scoring = policy is not None and policy.needs_scores and not policy.reconstruct and (first or policy.decode)
        queries: dict[int, torch.Tensor] | None = {} if scoring else None
        run = self._llm_layers(cache, ids, mask, position_ids, step, establishing, queries)
        logits = self._logits(run, logits_to_keep)
        if policy is not None and any(self._evicts(cache, i) for i in range(self.n_layers)):
            with record_function("iam.evict"):
                mass, groups = None, None
                if scoring:
                    mass = self._attention_mass(cache, queries, step, cache.slot_mask(mask, t))
                elif policy.reconstruct and first:
                    sync = torch.cuda.synchronize if ids.is_cuda else lambda: None  # time the work, not its launch
                    sync()
                    start = time.perf_counter()
                    mass, groups = self._reconstruction(cache, ids, mask, position_ids)
                    sync()
                    cache.scoring_s += time.perf_counter() - start
                cache.track(mask[:, -t:], position_ids)
                evicted = [i for i in range(self.n_layers) if self._evicts(cache, i)]
                cache.evict(policy, evicted, mass, prefill=first, groups=groups, protect=self._protected)
        return logits

    def _llm_layers(
        self,
        cache: IAMCache,
        ids,
        mask,
        position_ids,
        step: SLMStep | None,
        establishing: SLMWindow | None = None,
        queries: dict[int, torch.Tensor] | None = None,
    ) -> Pass:
        """The LLM's decoder layers over the new tokens, its mapped layers (if any) reading ``step``; with
        ``queries``, the unmapped layers' queries are recorded in it. Returns the pass (its hidden states)."""
        t = ids.shape[1]
        slots = cache.slot_mask(mask, t)
        mapping = cache.mapping
        # with scope "unmapped", once tokens are evicted the mapped layers span more slots than the evicted ones
        partial = self.resolved.partial and cache.kept is not None and mapping is not None
        evicted = [i for i in range(self.n_layers) if self._evicts(cache, i)]
        own_slots = cache.own_slot_masks(mask, t)  # layers whose KV groups keep slots of their own (KVzip's budgets)
        shared = evicted[0] if partial else min(mapping.plan) if own_slots and mapping is not None else None
        run = Pass(self.llm, ids, slots, position_ids, cache, shared, own_slots)
        mapped_mask = None if mapping is None else run.causal_mask(mask, min(mapping.plan)) if partial else run.mask
        layers = decoder_layers(self.llm)
        for i in range(self.n_layers):
            if mapping is not None and i in mapping.plan:
                spec = self.resolved
                mapped = MappedAttention(layers[i].self_attn, mapping.plan[i], spec.kernels, spec.local, spec.partial)
                rope, own = run.rope_of(i), run.mask_of(i) if mapped.window is not None else None
                attention = lambda x, m=mapped, rope=rope, own=own: m(
                    x, rope, mapped_mask, cache, mapping, step, establishing, own
                )  # noqa: E731
                run.layer(i, attention)
            elif queries is not None:
                run.query_capture(i, queries)
            else:
                run.layer(i)
        return run

    @torch.no_grad()
    def _reconstruction(self, cache: IAMCache, ids, mask, position_ids) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """KVzip's scores of the slots just prefilled (``EvictionPolicy.reconstruct``): the LLM (with its SLM where
        it maps) or the SLM alone is teacher-forced through the repeat prompt and each chunk of the context on a
        scratch copy of its cache. Returns the shared set's scores ``[B, S]`` (the mapped layers' and the SLM's:
        through the SLM heads the mapped heads borrow) and, per LLM layer that keeps K in every KV group and follows
        the kept set, ``[B, KV heads, S]``."""
        policy, mapping = self.eviction, cache.mapping
        draft = policy.reconstruct == "slm"
        if not policy.prompt:
            warnings.warn(
                f"{type(policy).__name__} has no repeat prompt, so the model repeats the bare context: build it with "
                "prompt=repeat_prompt(tokenizer) (iam.core.eviction), as iam eval retrieval does.",
                stacklevel=3,
            )
        s = mask.shape[1]
        slm_depth = mapping.slm_layers[-1] + 1 if mapping is not None and not draft else self.slm.config.num_hidden_layers
        source = cache.slm
        if draft and mapping is None:  # the LLM alone: the SLM prefills the context for scoring only
            source = slm_cache(self.slm.config, self.mapping_config.slm_cache, self.mapping_config.int4)
            dev = self.slm.device
            prefill = Pass(self.slm, ids.to(dev), mask.to(dev), position_ids.to(dev), source)
            for j in range(slm_depth):
                prefill.layer(j)
        prompt = torch.tensor(policy.prompt, dtype=torch.long, device=ids.device).expand(ids.shape[0], -1)
        start = position_ids.amax(-1, keepdim=True) + 1
        llm_scores: dict[int, torch.Tensor] = {}
        slm_scores: dict[int, torch.Tensor] = {}
        keep_max = lambda into, key, x: into.__setitem__(key, x if key not in into else torch.maximum(into[key], x))
        for end in range(s, 0, -policy.chunk):  # chunks counted from the newest token: a left-padded row's are its own
            a = max(end - policy.chunk, 0)
            part = mask[:, a:end]
            rids = torch.cat([prompt, ids[:, a:end]], -1)
            rmask = torch.cat([torch.ones_like(prompt), part], -1)
            rpos = start + (rmask.cumsum(-1) - 1).clamp_min(0)
            full = torch.cat([mask, rmask], -1)
            if draft:
                scratch = copy.deepcopy(source)
                dev = self.slm.device
                queries = Pass(self.slm, rids.to(dev), full.to(dev), rpos.to(dev), scratch).queries(slm_depth)
                keys, scaling = (
                    (lambda j, scratch=scratch: scratch.layers[j].read_keys()),
                    decoder_layers(self.slm)[0].self_attn.scaling,
                )
            else:
                scratch = copy.deepcopy(cache)  # the scratch pass only reads: it evicts nothing (``_llm_layers``)
                step = self._slm_step(scratch, rids, full, rpos, slm_depth) if mapping is not None else None
                own: dict[int, torch.Tensor] = {}
                self._llm_layers(scratch, rids, full, rpos, step, queries=own)
                llm_scaling = decoder_layers(self.llm)[0].self_attn.scaling
                for i, q in own.items():  # a dispatched LLM's layers may sit on other devices
                    x = repeat_scores(q, scratch.layers[i].read_keys(), llm_scaling, full.to(q.device), s)
                    keep_max(llm_scores, i, x.unflatten(1, (self.n_kv, -1)).amax(2).to(ids.device))
                queries = {} if step is None else step.queries
                keys, scaling = (lambda j, step=step: step.keys(j)), (None if step is None else step.scaling)
            for j, q in queries.items():
                keep_max(slm_scores, j, repeat_scores(q, keys(j), scaling, full.to(q.device), s).to(ids.device))
            del scratch
        groups = {
            i: llm_scores[i] if not draft else self._carried(slm_scores, i)
            for i in range(self.n_layers)
            if self._evicts(cache, i) and (mapping is None or i not in mapping.plan)
        }
        if mapping is not None:
            weight = mapping.borrowed_weight(self.slm.config.num_attention_heads)
            shared = torch.stack(
                [slm_scores[j].masked_fill(~(w > 0)[..., None].to(ids.device), 0).amax(1) for j, w in weight.items()]
            ).amax(0)
        else:
            shared = torch.cat(list(groups.values()), 1).amax(1)
        return shared, groups

    def _carried(self, slm_scores: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """``[B, KV heads, S]`` SLM repeat scores for LLM layer ``layer`` without a head map: the SLM layer at the same
        relative depth, each LLM KV group taking the SLM KV group at the same relative place (max over its heads)."""
        slm = self.slm.config
        x = slm_scores[layer * slm.num_hidden_layers // self.n_layers]
        per_group = x.unflatten(1, (slm.num_key_value_heads, -1)).amax(2)
        return per_group[:, torch.arange(self.n_kv) * slm.num_key_value_heads // self.n_kv]

    def _attention_mass(self, cache: IAMCache, queries: dict[int, torch.Tensor], step: SLMStep | None, slots) -> torch.Tensor:
        """Attention mass on each cache slot from this forward's queries: the LLM's unmapped layers' own, and the SLM
        heads' that the mapped layers borrow, each by the weight the mapped heads put on it (they stand in for them)."""
        last = self.eviction.observed_queries()
        llm_scaling = decoder_layers(self.llm)[0].self_attn.scaling
        mass = sum(attention_mass(q, cache.layers[i].read_keys(), llm_scaling, slots, last) for i, q in queries.items())
        mass = sum_heads(mass, decoder_layers(self.llm)[0].self_attn)  # tensor parallel: every rank's heads
        if cache.mapping is not None and not self.resolved.partial:  # partial: the SLM's slots are not the kept ones
            for layer, weight in cache.mapping.borrowed_weight(self.slm.config.num_attention_heads).items():
                mass = mass + attention_mass(step.queries[layer], step.keys(layer), step.scaling, slots, last, head_weight=weight)
        return mass

    def _evicts(self, cache: IAMCache, layer: int) -> bool:
        """Whether LLM layer ``layer`` of ``cache`` follows the kept set."""
        return self.resolved.evicts(layer, None if cache.mapping is None else cache.mapping.plan)

    @property
    def _protected(self) -> tuple[int, int] | None:
        """``(sinks, window)`` that eviction keeps in every layer it evicts from: the exact local window's, where the
        mapped layers follow the kept set."""
        return None if self.resolved.partial else self.resolved.local

    def _logits(self, run: Pass, logits_to_keep: int) -> torch.Tensor:
        """The LM head's logits, soft-capped where the LLM caps them (Gemma 2's ``final_logit_softcapping``)."""
        hidden = self.llm.model.norm(run.hidden)
        logits = self.llm.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return cap(logits, getattr(self.llm.config, "final_logit_softcapping", None))

    def _plan(self, probe: torch.Tensor | None) -> Plan:
        planned = self.planned
        if planned is not None:
            return planned
        scores = probe.amax(-1).mean((1, 2))
        return self.resolved.strategy.plan(self.n_layers, self.n_kv, self.mapping_config.ratio, scores)

    @torch.no_grad()
    def _probe(self, ids: torch.Tensor, establishing: SLMWindow, borrowable: bool = True) -> torch.Tensor:
        """Similarity ``[L, B, H, L_s * H_s]`` of every LLM head to every SLM head, from an unmapped LLM pass over
        the window only; ``-inf`` to heads it cannot borrow (of another layer kind) where ``borrowable``."""
        window_ids = establishing.window.take(ids, 1)
        cache = slm_cache(self.llm.config)  # every layer keeps every key (an IAMCache keeps a local layer's window)
        pos = torch.arange(window_ids.shape[1], device=ids.device).expand_as(window_ids)
        queries = Pass(self.llm, window_ids, torch.ones_like(window_ids), pos, cache).queries(self.n_layers)
        attns, kinds = [layer.self_attn for layer in decoder_layers(self.llm)], layer_kinds(self.llm.config)
        similarity = [
            establishing.similarity(
                window_attention(queries[i], cache.layers[i].keys, a.scaling, softcap(a), local_window(a)).to(
                    establishing.flats[0].device
                ),
                kinds[i] if borrowable else None,
            )
            for i, a in enumerate(attns)
        ]
        return gather_heads(torch.stack(similarity), attns[0], dim=2)  # tensor parallel: every rank's heads

        return self._probe(ids, establishing, borrowable=False)
