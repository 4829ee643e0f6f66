"""The steps of a paired forward, the body of ``IAMForCausalLM``: ``_alone`` (the LLM before the mapping exists),
``_establish`` (the forward where the context reaches ``establish_threshold``: both models over the whole context,
the mapping set) and ``_paired`` (the SLM, then the LLM with its mapped layers); their parts, and eviction's scoring
(attention mass, or KVzip's reconstruction)."""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn
from torch.profiler import record_function
from transformers import PretrainedConfig

from .attention import MappedAttention
from .cache import IAMCache
from .checks import planned
from .config import MappingConfig
from .decoder import Pass, decoder_layers, local_window, softcap
from .eviction import attention_mass, repeat_scores
from .families import family, layer_kinds
from .layers import slm_cache
from .mapping import Mapping, SLMWindow, Window, cap, slm_window_flats, window_attention
from .parallel import gather_heads, sum_heads
from .resolution import Resolved
from .selection import Plan
from .similarity import METRICS
from .step import SLMStep


class PairedSteps:
    """The steps and parts of a paired forward over ``llm`` and ``slm``, under the run spec ``resolved``; mixed into
    ``IAMForCausalLM``, which sets the attributes below and picks the step (``forward``)."""

    llm: nn.Module
    slm: nn.Module
    config: PretrainedConfig
    resolved: Resolved
    mapping_config: MappingConfig
    n_layers: int
    n_kv: int

    @property
    def _planned(self) -> Plan | None:
        return planned(self.resolved, self.llm.config)

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
        mapping = Mapping(plan, window, heads, self.n_kv, config.metric, config.blend, probe=probe, kernels=self.resolved.kernels)
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
        policy = self.resolved.eviction
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
        policy, mapping = self.resolved.eviction, cache.mapping
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
        last = self.resolved.eviction.observed_queries()
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
        planned = self._planned
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
