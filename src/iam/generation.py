"""The paired run: prefill both models, establish the mapping, then decode them in lock-step.

Flat on purpose (after gpt-fast): ``PairedSession.prefill`` and ``PairedSession.decode`` are the two phases, and
``generate`` is the loop around them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache

from .attention import MappedAttention
from .cache import paired_llm_cache, read_keys, slm_cache, with_cache
from .capture import QueryCapture, decoder_layers
from .mapping import MappingState, Window, similarity_matrix, slm_window_flats, window_attention
from .similarity import METRICS

if TYPE_CHECKING:
    from .model import IAMModel


@contextmanager
def attached(model: nn.Module, modules: dict[int, MappedAttention]) -> Iterator[None]:
    """Swap the mapped layers' ``self_attn`` in for one call, and always put the originals back."""
    layers = decoder_layers(model)
    try:
        for idx, module in modules.items():
            layers[idx].self_attn = module
        yield
    finally:
        for idx, module in modules.items():
            layers[idx].self_attn = module.original


@contextmanager
def truncated(model: nn.Module, depth: int) -> Iterator[None]:
    """Run only the first ``depth`` decoder layers of ``model`` for one call."""
    config = model.config
    full = config.num_hidden_layers
    config.num_hidden_layers = depth
    try:
        yield
    finally:
        config.num_hidden_layers = full


class PairedSession:
    """One batched paired run over a left-padded batch. Holds both caches and the mapping."""

    def __init__(self, iam: IAMModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.iam = iam
        self.ids = input_ids
        self.mask = attention_mask
        self.llm_cache: DynamicCache | None = None
        self.slm_cache: DynamicCache | None = None
        self.state: MappingState | None = None
        self.modules: dict[int, MappedAttention] = {}
        self.plan: dict[int, tuple[int, ...]] = {}
        self.slm_layers: list[int] = []
        self.similarity: torch.Tensor | None = None

    @property
    def established(self) -> bool:
        return self.state is not None

    def _ready(self) -> bool:
        return self.iam.n_mapped > 0 and int(self.mask.sum(-1).min()) >= self.iam.config.establish_threshold

    def _positions(self, new: int) -> torch.Tensor:
        pos = self.mask.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, -new:]

    # ---- phases -------------------------------------------------------------------------------------------------
    def prefill(self, logits_to_keep: int = 1) -> torch.Tensor:
        """Run the whole prompt; establishes the mapping if the prompt is long enough. Returns LLM logits."""
        if self._ready():
            return self._establish(logits_to_keep)
        self.llm_cache = DynamicCache(config=self.iam.llm.config)
        return self._llm_step(self.ids, logits_to_keep)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence (``[B]``); returns the LLM logits ``[B, 1, V]`` for the next one."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=-1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        if not self.established and self._ready():
            return self._establish(1)  # the context just reached establish_threshold: prefill it paired
        if self.established:
            self._slm_step(tokens[:, None])
        return self._llm_step(tokens[:, None], 1)

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _llm_step(self, ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        with attached(self.iam.llm, self.modules):
            out = self.iam.llm(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=self._positions(ids.shape[1]),
                **with_cache(self.llm_cache),
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        return out.logits

    def _slm_forward(self, ids: torch.Tensor, layers: list[int], depth: int) -> dict[int, torch.Tensor]:
        """SLM base model only (never its LM head), through ``depth`` layers; returns the captured queries."""
        slm = self.iam.slm
        with QueryCapture(slm, layers) as cap, truncated(slm, depth):
            slm.model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=self._positions(ids.shape[1]),
                **with_cache(self.slm_cache),
                use_cache=True,
            )
        return cap.queries

    def _slm_step(self, ids: torch.Tensor) -> None:
        self.state.new_step(self._slm_forward(ids, self.slm_layers, self.slm_layers[-1] + 1))

    def prepare(self) -> MappingState:
        """SLM prefill over the whole context with every layer's queries captured; builds the mapping state."""
        slm, cfg = self.iam.slm, self.iam.config
        n_slm = slm.config.num_hidden_layers
        window = Window.from_mask(self.mask, cfg.truncation_threshold)
        self.slm_cache = slm_cache(slm.config, cfg.slm_cache)
        queries = self._slm_forward(self.ids, list(range(n_slm)), n_slm)
        keys = [read_keys(layer) for layer in self.slm_cache.layers]
        slm_attn = decoder_layers(slm)[0].self_attn
        self.state = MappingState(
            window=window,
            slm_flats=slm_window_flats(queries, keys, slm_attn.scaling, window),
            slm_heads=slm.config.num_attention_heads,
            slm_kv_groups=slm_attn.num_key_value_groups,
            slm_scaling=slm_attn.scaling,
            metric=METRICS[cfg.metric],
            blend=cfg.blend,
            slm_cache_layers=self.slm_cache.layers,
            slm_queries=queries,
        )
        return self.state

    def _establish(self, logits_to_keep: int) -> torch.Tensor:
        """Paired prefill of the whole context: SLM first, then the LLM, whose mapped layers pick their heads."""
        iam = self.iam
        self.prepare()
        self.plan = iam.select_plan(lambda: self.probe_similarity().amax(-1).mean((1, 2)))
        llm_layers = decoder_layers(iam.llm)
        self.modules = {i: MappedAttention(llm_layers[i].self_attn, self.state, g) for i, g in self.plan.items()}
        self.llm_cache = paired_llm_cache(iam.llm.config, self.plan)
        logits = self._llm_step(self.ids, logits_to_keep)

        # From here on the SLM only runs as deep as the deepest head any mapping uses.
        used = torch.cat([m.slm_layer.flatten() for m in self.state.maps.values()])
        self.slm_layers = sorted(set(used.tolist()))
        for layer in self.slm_cache.layers[self.slm_layers[-1] + 1 :]:
            layer.reset()
        self.state.slm_flats = []
        self.state.slm_queries = {}
        return logits

    def probe_similarity(self) -> torch.Tensor:
        """Similarity ``[L, B, H, L_s * H_s]`` of every LLM head to every SLM head, from an unmapped LLM pass over
        the window only (needs ``prepare``)."""
        llm, state = self.iam.llm, self.state
        ids = state.window.take(self.ids, 1)
        cache = DynamicCache(config=llm.config)
        n_layers = llm.config.num_hidden_layers
        with QueryCapture(llm, range(n_layers)) as cap:
            llm.model(
                input_ids=ids,
                position_ids=torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
                **with_cache(cache),
                use_cache=True,
            )
        scaling = decoder_layers(llm)[0].self_attn.scaling
        self.similarity = torch.stack(
            [
                similarity_matrix(
                    window_attention(cap.queries[i], cache.layers[i].keys, scaling), state.window, state.slm_flats, state.metric
                )
                for i in range(n_layers)
            ]
        )
        return self.similarity


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy, or temperature + nucleus sampling, over ``[B, V]`` logits."""
    if not do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(
    session: PairedSession,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefill, then decode up to ``max_new_tokens`` tokens; returns ``[B, T + new]`` ids and timings in seconds."""
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=session.ids.device).flatten()
    start = time.perf_counter()
    logits = session.prefill(logits_to_keep=1)
    synchronize(logits.device)
    ttft = time.perf_counter() - start
    prompt_len = session.ids.shape[1]
    finished = torch.zeros(session.ids.shape[0], dtype=torch.bool, device=session.ids.device)
    tokens = []
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        tok = next_token(logits[:, -1], do_sample, temperature, top_p, generator)
        tok = tok.masked_fill(finished, pad_token_id)
        finished |= torch.isin(tok, eos)
        tokens.append(tok)
        if finished.all() or step + 1 == max_new_tokens:
            break
        logits = session.decode(tok)
    synchronize(logits.device)
    decode_s = time.perf_counter() - decode_start
    out = torch.cat([session.ids[:, :prompt_len], torch.stack(tokens, 1)], dim=-1) if tokens else session.ids
    steps = max(len(tokens) - 1, 1)
    return out, {"ttft_s": ttft, "tpot_s": decode_s / steps, "total_s": ttft + decode_s, "new_tokens": len(tokens)}
