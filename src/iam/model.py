"""``IAMModel``: a large causal LM that borrows attention from a small one of the same family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import cache_bytes, full_cache_bytes
from .calibration import find_calibration, read_calibration
from .config import MappingConfig, check_layers_in_range
from .generation import PairedSession, generate
from .mapping import HeadMap
from .selection import STRATEGIES, CalibratedSelection, Plan, format_plan, plan_of

SUPPORTED_FAMILIES = ("qwen2", "llama")
SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_pair(llm: nn.Module, slm: nn.Module) -> None:
    """Raise ``ValueError`` unless ``llm`` and ``slm`` are causal LMs of one supported family with one vocabulary."""
    for role, model in (("LLM", llm), ("SLM", slm)):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ValueError(f"{role} has model_type {model_type!r}; supported families: {list(SUPPORTED_FAMILIES)}.")
        impl = model.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"{role} uses attn_implementation {impl!r}; load it with one of {list(SUPPORTED_ATTENTION)}.")
    if llm.config.model_type != slm.config.model_type:
        raise ValueError(
            f"LLM and SLM are of different families ({llm.config.model_type!r} vs {slm.config.model_type!r}); "
            "IAM needs two models of one family."
        )
    if llm.config.vocab_size != slm.config.vocab_size:
        raise ValueError(
            f"LLM and SLM vocabularies differ (vocab_size {llm.config.vocab_size} vs {slm.config.vocab_size}); "
            "IAM needs one tokenizer for both."
        )
    if llm.device != slm.device:
        raise ValueError(f"LLM is on {llm.device} but SLM on {slm.device}; put both on one device.")


class IAMModel:
    """Wraps an LLM and an SLM of one family; the mapped LLM layers take their attention from the SLM.

    Parameters
    ----------
    llm : the large ``*ForCausalLM`` (Qwen2/Qwen2.5 or Llama).
    slm : the small ``*ForCausalLM`` of the same family and vocabulary.
    config : the ``MappingConfig`` (defaults to ``MappingConfig()``); ``self.config`` holds it with ``blend``
        resolved (a copy where it was ``None``).

    Neither model is modified: the mapped attention modules are swapped in only for the duration of a call.
    """

    def __init__(self, llm: nn.Module, slm: nn.Module, config: MappingConfig | None = None) -> None:
        check_pair(llm, slm)
        self.llm, self.slm = llm.eval(), slm.eval()
        config = config if config is not None else MappingConfig()
        self.n_layers: int = llm.config.num_hidden_layers
        self.n_kv: int = llm.config.num_key_value_heads
        self.strategy = STRATEGIES[config.strategy]
        stored = None
        if isinstance(self.strategy, CalibratedSelection):
            file = config.calibration
            stored = read_calibration(file, llm.config, slm.config) if file else find_calibration(llm.config, slm.config)
            self.strategy = replace(self.strategy, order=stored.order if stored else ())
        if config.blend is None:  # the pair's stored blend goes with its stored order
            config = replace(config, blend=stored.blend if stored else 1)
        self.config = config
        if self.config.layers is not None:
            check_layers_in_range(self.config.layers, self.n_layers, self.n_kv)
            self.n_mapped = len(self.config.layers)
        else:
            self.n_mapped = self.strategy.count(self.n_layers, self.n_kv, self.config.ratio)
        self._session: PairedSession | None = None

    # ---- layer selection ------------------------------------------------------------------------------------------
    def select_plan(self, scores: Callable[[], torch.Tensor]) -> Plan:
        """The KV groups to map per LLM layer; ``scores`` is called (``[L]`` mean best-match similarity) only if the
        strategy needs it."""
        if self.config.layers is not None:
            return plan_of(self.config.layers, self.n_kv)
        strategy = self.strategy
        return strategy.plan(self.n_layers, self.n_kv, self.config.ratio, scores() if strategy.needs_scores else None)

    # ---- calls -----------------------------------------------------------------------------------------------------
    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_tokens: int = 0):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a [batch, length] LongTensor.")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one prompt token.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}.")
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        if (mask.diff(dim=-1) < 0).any() or (mask[:, -1] == 0).any():
            raise ValueError(
                "attention_mask must be left-padded (padding first, then the prompt): set tokenizer.padding_side='left'."
            )
        limit = min(self.llm.config.max_position_embeddings, self.slm.config.max_position_embeddings)
        if input_ids.shape[1] + new_tokens > limit:
            raise ValueError(
                f"prompt too long: {input_ids.shape[1]} tokens + {new_tokens} new exceed the models' {limit}-position limit."
            )
        return input_ids.to(self.llm.device), mask.to(self.llm.device)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """One prefill forward with the mapping established on this input; ``.logits`` and, with ``labels``, ``.loss``."""
        ids, mask = self._inputs(input_ids, attention_mask)
        self._session = PairedSession(self, ids, mask)
        logits = self._session.prefill(logits_to_keep=0)
        loss = None
        if labels is not None:
            loss = self.llm.loss_function(logits=logits, labels=labels.to(logits.device), vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Batched generation over left-padded prompts; returns ``[B, T + new]`` token ids (greedy by default)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
        ids, mask = self._inputs(input_ids, attention_mask, max_new_tokens)
        gen_config = self.llm.generation_config
        if eos_token_id is None:
            eos_token_id = gen_config.eos_token_id
        if pad_token_id is None:
            pad_token_id = gen_config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_token_id if isinstance(eos_token_id, int) else (eos_token_id or [0])[0]
        self._session = PairedSession(self, ids, mask)
        out, self.timings = generate(
            self._session, max_new_tokens, do_sample, temperature, top_p, eos_token_id, pad_token_id, generator
        )
        return out

    # ---- what the last call did --------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """KV groups mapped per LLM layer in the last call (or, before any call, what the config fixes)."""
        if self._session is not None and self._session.established:
            return dict(self._session.plan)
        if self.config.layers is not None or not self.strategy.needs_scores:
            return self.select_plan(lambda: torch.empty(0))
        return {}

    @property
    def mapped_layers(self) -> list[int]:
        """LLM layers with at least one mapped KV group in the last call (or, before any call, as the config fixes)."""
        return list(self.plan)

    @property
    def mapped_units(self) -> list[int | str]:
        """The mapped units as the CLI writes them: whole layers as ``int``, single KV groups as ``"layer:group"``."""
        return format_plan(self.plan, self.n_kv)

    @property
    def head_maps(self) -> dict[int, HeadMap] | None:
        """The ``HeadMap`` of each mapped LLM layer in the last call; ``None`` if no mapping was established."""
        if self._session is None or not self._session.established:
            return None
        return {i: self._session.state.maps[i] for i in self._session.plan}

    def _per_head(self, values: Callable[[HeadMap], torch.Tensor], fill: float) -> torch.Tensor | None:
        """``values(map)`` ``[B, H_mapped, ...]`` of each mapped layer, placed at its heads of a ``[B, n_layers, H, ...]``
        tensor; heads of a layer's unmapped KV groups hold ``fill``."""
        head_maps = self.head_maps
        if head_maps is None:
            return None
        maps = list(head_maps.values())
        first = values(maps[0])
        out = first.new_full((first.shape[0], len(maps), self.llm.config.num_attention_heads, *first.shape[2:]), fill)
        for i, m in enumerate(maps):
            out[:, i, m.heads] = values(m)
        return out

    @property
    def mapping(self) -> torch.Tensor | None:
        """``[B, n_mapped_layers, H, 2]`` LongTensor of each LLM head's best-matching ``(slm_layer, slm_head)``
        (``-1`` for heads of unmapped KV groups); ``None`` if not established. See ``mixture`` for ``blend > 1``."""
        return self._per_head(lambda m: torch.stack([m.slm_layer[..., 0], m.slm_head[..., 0]], -1), -1)

    @property
    def mixture(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every borrowed SLM head and its weight: ``[B, n_mapped_layers, H, blend, 2]`` ``(slm_layer, slm_head)``
        (``-1`` for heads of unmapped KV groups) and ``[B, n_mapped_layers, H, blend]`` weights (NaN there)."""
        sources = self._per_head(lambda m: torch.stack([m.slm_layer, m.slm_head], -1), -1)
        return None if sources is None else (sources, self._per_head(lambda m: m.weight, float("nan")))

    @property
    def similarity(self) -> torch.Tensor | None:
        """``[B, n_mapped_layers, H]`` similarity of each LLM head's borrowed (with ``blend > 1``, mixed) attention to
        its own on the window (metric's own scale, NaN for heads of unmapped KV groups); ``None`` if not established."""
        return self._per_head(lambda m: m.score, float("nan"))

    def mapping_summary(self) -> dict | None:
        """Per mapped layer: mean matched similarity and how many borrowed SLM heads come from each SLM layer
        (first sequence)."""
        head_maps, plan = self.head_maps, self.plan
        if head_maps is None:
            return None
        layers = {}
        for idx, m in head_maps.items():
            used, counts = m.slm_layer[0].unique(return_counts=True)
            layers[idx] = {
                "kv_groups": list(plan[idx]),
                "mean_similarity": round(m.score.mean().item(), 4),
                "slm_layers": {int(u): int(c) for u, c in zip(used, counts)},
            }
        mean = torch.cat([m.score.flatten() for m in head_maps.values()]).mean().item()
        return {"mean_similarity": round(mean, 4), "metric": self.config.metric, "blend": self.config.blend, "layers": layers}

    def kv_cache_bytes(self) -> dict[str, int]:
        """Bytes in the real caches after the last call; ``baseline`` is what the LLM alone holds for the same tokens."""
        if self._session is None:
            raise RuntimeError("no call yet: run the model or generate() first.")
        llm = cache_bytes(self._session.llm_cache)
        slm = cache_bytes(self._session.slm_cache)
        return {"llm": llm, "slm": slm, "total": llm + slm, "baseline": full_cache_bytes(self._session.llm_cache)}
