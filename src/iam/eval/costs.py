"""Cost arithmetic of IAM from configs alone: KV bytes per token, prefill FLOPs and the bytes a decode step reads.

Per ratio ``r`` (``n = units_for_ratio(r, L)`` mapped layers):

- KV bytes per token: ``2 L kv d b`` for the LLM alone; IAM drops the K of the ``n`` mapped layers and adds the
  SLM's whole cache, in its own precision (``slm_cache="native"``, the paper's accounting) or in int8 with one scale
  per head and token (``slm_cache="int8"``, as ``MappingConfig(slm_cache="int8")`` keeps it).
- Prefill FLOPs (``T`` tokens): linear layers ``2 P T`` plus causal attention ``2 H d T^2`` per layer (QK^T and PV),
  LM head on the last token. A mapped layer skips its Q/K projections and QK^T, keeps V, O, MLP and PV, and its
  SDPA recomputes the SLM's QK^T per LLM head (``H d_s T^2``); the SLM runs its layers but not its LM head. With an
  exact local window the mapped layer projects Q and K again and adds QK^T and PV over the window.
- Decode is memory-bound: a step reads the weights once and every sequence's KV, so the TPOT limit is the ratio
  of bytes read per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.selection import units_for_ratio
from ..models.presets import PRESETS, Arch
from ..reporting import with_baseline

GB = 1e9


@dataclass(frozen=True)
class Scenario:
    """Prompt length, batch and new tokens of a benchmark run."""

    prompt: int
    batch: int
    new_tokens: int


SCENARIOS = {
    # paper-size settings, then CPU-sized defaults
    "concurrency": (Scenario(512, 64, 512), Scenario(512, 4, 32)),
    "long": (Scenario(8192, 8, 512), Scenario(8192, 1, 32)),
}

SLM_CACHE_NOTES = {
    "native": "the paper's accounting: mapped layers drop K, the SLM's full cache is added in its own precision",
    "int8": "the SLM cache in int8 plus one scale per head and token (MappingConfig(slm_cache='int8'))",
}


def llm_kv_bytes_per_token(llm: Arch, n_mapped: float, elem: int) -> float:
    """The LLM's own KV per token: K and V of every layer, less the K of the mapped ones."""
    return (2 * llm.layers - n_mapped) * llm.kv_heads * llm.head_dim * elem


def slm_kv_bytes_per_token(slm: Arch, elem: int, slm_cache: str = "native") -> int:
    """The SLM's whole KV per token; with an int8 cache, int8 plus one ``elem``-byte scale per head and token."""
    row = slm.head_dim * elem if slm_cache == "native" else slm.head_dim + elem
    return 2 * slm.layers * slm.kv_heads * row


def kv_bytes_per_token(llm: Arch, slm: Arch, n_mapped: int, elem: int, slm_cache: str = "native") -> int:
    own = int(llm_kv_bytes_per_token(llm, n_mapped, elem))
    return own + slm_kv_bytes_per_token(slm, elem, slm_cache) if n_mapped else own


def layer_prefill_flops(llm: Arch, slm: Arch, tokens: int, mapped: bool = False, local: int = 0) -> float:
    """FLOPs of one LLM decoder layer over ``tokens`` (causal attention: QK^T and PV each ``H d T^2``); a mapped
    layer with an exact local window of ``local`` tokens (sinks + window) projects Q and K again and attends exactly
    to at most ``local`` tokens per query (QK^T and PV), besides the borrowed part."""
    t = tokens
    if not mapped:
        return 2 * llm.layer_params * t + 2 * llm.heads * llm.head_dim * t * t
    # No Q/K projections and no own QK^T; PV stays, and SDPA redoes the SLM head's QK^T per LLM head.
    borrowed = llm.heads * (llm.head_dim + slm.head_dim) * t * t
    if local:
        n = min(local, t)  # keys per query: up to n, fewer for the first n queries
        return 2 * llm.layer_params * t + borrowed + 4 * llm.heads * llm.head_dim * (t * n - n * n / 2)
    return 2 * (llm.layer_params - llm.qk_params) * t + borrowed


def llm_prefill_flops(llm: Arch, slm: Arch, n_mapped: float, tokens: int, local: int = 0) -> float:
    """Prefill FLOPs of the LLM's own pass, ``n_mapped`` layers mapped (LM head on the last token only)."""
    unmapped, mapped = (layer_prefill_flops(llm, slm, tokens, m, local) for m in (False, True))
    return (llm.layers - n_mapped) * unmapped + n_mapped * mapped + 2 * llm.hidden * llm.vocab


def prefill_flops(llm: Arch, slm: Arch, n_mapped: int, tokens: int, local: int = 0) -> float:
    """Prefill FLOPs of the whole pair (the SLM runs no LM head); ``local`` as for ``layer_prefill_flops``."""
    own = llm_prefill_flops(llm, slm, n_mapped, tokens, local)
    return own + slm.layers * layer_prefill_flops(slm, slm, tokens) if n_mapped else own


def llm_decode_bytes(llm: Arch, n_mapped: float, batch: int, context: float, elem: int, local: int = 0) -> float:
    """Bytes the LLM's own part of a decode step reads: its weights less the mapped Q/K, and its KV. With an exact
    local window of ``local`` tokens (sinks + window) mapped layers read their Q/K weights and the window's K."""
    weights = llm.params - (0 if local else n_mapped * llm.qk_params)
    window_k = n_mapped * min(local, context) * llm.kv_heads * llm.head_dim * elem
    return weights * elem + batch * (context * llm_kv_bytes_per_token(llm, n_mapped, elem) + window_k)


def llm_shares(
    llm: Arch, slm: Arch, n_mapped: float, scenario: Scenario, elem: int, local: int = 0, kept: float = 1.0
) -> tuple[float, float]:
    """The shares of the LLM alone's prefill FLOPs and decode-step bytes that the LLM's own part of a setup costs:
    ``n_mapped`` layers' worth mapped, an exact local window of ``local`` tokens (sinks + window; a window over
    short prompts can cost more than the layer it maps), and eviction keeping ``kept`` of each sequence's tokens
    (a decode step reads only the kept KV; prefill is unchanged)."""
    context = scenario.prompt + scenario.new_tokens
    prefill = llm_prefill_flops(llm, slm, n_mapped, scenario.prompt, local) / llm_prefill_flops(llm, slm, 0, scenario.prompt)
    step = llm_decode_bytes(llm, n_mapped, scenario.batch, context * kept, elem, local)
    return prefill, step / llm_decode_bytes(llm, 0, scenario.batch, context, elem)


def decode_bytes(
    llm: Arch, slm: Arch, n_mapped: int, batch: int, context: float, elem: int, slm_cache: str = "native", local: int = 0
) -> float:
    """Bytes read by one decode step: weights once (the SLM without its LM head), plus the KV of every sequence;
    ``local`` as for ``llm_decode_bytes``."""
    own = llm_decode_bytes(llm, n_mapped, batch, context, elem, local)
    if not n_mapped:
        return own
    slm_weights = (slm.params - slm.vocab * slm.hidden * (0 if slm.tied else 1)) * elem
    return own + slm_weights + batch * context * slm_kv_bytes_per_token(slm, elem, slm_cache)


def analytic_rows(
    llm: Arch,
    slm: Arch,
    ratios: list[float],
    scenario: Scenario,
    elem: int = 2,
    budget_gb: float | None = None,
    kept: float = 1.0,
) -> list[dict]:
    """Rows per SLM cache kind (``native``, ``int8``) and ratio; ratio 0 (the LLM alone) first. ``kept``: the share
    of tokens an eviction policy keeps, in every layer of both models (``kv_ratio`` and the limits are against the
    LLM alone without eviction; a decode step reads only the kept KV)."""
    context = scenario.prompt + scenario.new_tokens
    base_kv = kv_bytes_per_token(llm, slm, 0, elem)
    base_prefill = prefill_flops(llm, slm, 0, scenario.prompt)
    base_decode = decode_bytes(llm, slm, 0, scenario.batch, context, elem)
    if budget_gb is not None:  # the LLM alone without eviction: what every row is set against
        base_batch = max(int((budget_gb * GB - llm.params * elem) // (base_kv * context)), 0)
        base_tput = base_batch / decode_bytes(llm, slm, 0, base_batch, context, elem) * 1e12 if base_batch else 0.0
    rows = []
    for slm_cache in SLM_CACHE_NOTES:
        for r in with_baseline(ratios):
            n = units_for_ratio(r, llm.layers)
            kv = kv_bytes_per_token(llm, slm, n, elem, slm_cache) * kept
            flops = prefill_flops(llm, slm, n, scenario.prompt)
            row = {
                "slm_cache": slm_cache,
                "ratio": r,
                "mapped_layers": n,
                "kv_bytes": kv,
                "kv_ratio": kv / base_kv,
                "prefill_tflops": flops / 1e12,
                "ttft_limit": base_prefill / flops,
                "tpot_limit": base_decode / decode_bytes(llm, slm, n, scenario.batch, context * kept, elem, slm_cache),
            }
            if budget_gb is not None:
                weights = (llm.params + (slm.params if n else 0)) * elem
                max_batch = max(int((budget_gb * GB - weights) // (kv * context)), 0)
                step = decode_bytes(llm, slm, n, max_batch, context * kept, elem, slm_cache)
                row["max_batch"] = max_batch
                row["throughput_tok_s_per_tbps"] = max_batch / step * 1e12 if max_batch else 0.0
                row["batch_ratio"] = max_batch / base_batch if base_batch else math.nan
                row["throughput_ratio"] = row["throughput_tok_s_per_tbps"] / base_tput if base_tput else math.nan
            rows.append(row)
    return rows


def per_device_rows(llm: Arch, slm: Arch, ratios: list[float], scenario: Scenario, elem: int, tp: int) -> list[dict]:
    """GB per device with the LLM tensor parallel over ``tp`` devices and the SLM whole on each (its weights and its
    KV for the whole batch), LLM alone first, after the prompt and the new tokens. The LLM's decoder layers, LM head
    and KV heads are split evenly, its input embedding kept whole on each device (transformers' Qwen2/Llama plan);
    mapped layers keep their Q/K weights (they establish the mapping)."""
    if llm.kv_heads % tp or llm.heads % tp:
        raise ValueError(f"`tp` {tp} must divide the LLM's {llm.heads} attention heads and {llm.kv_heads} KV heads.")
    tokens = scenario.batch * (scenario.prompt + scenario.new_tokens)
    rows = []
    for r in with_baseline(ratios):
        n = units_for_ratio(r, llm.layers)
        embed = llm.vocab * llm.hidden
        weights = ((llm.params - embed) / tp + embed + (slm.params if n else 0)) * elem
        kv = tokens * (llm_kv_bytes_per_token(llm, n, elem) / tp + (slm_kv_bytes_per_token(slm, elem) if n else 0))
        rows.append(
            {
                "tp": tp,
                "ratio": r,
                "mapped_layers": n,
                "weights_gb": weights / GB,
                "kv_gb": kv / GB,
                "total_gb": (weights + kv) / GB,
            }
        )
    return rows


def kept_share(budget: float | int | None, context: int) -> float:
    """The share of a ``context``-token sequence that an eviction budget keeps (a fraction, or a token count)."""
    if budget is None:
        return 1.0
    return float(budget) if isinstance(budget, float) else min(1.0, budget / context)


def break_even(llm: Arch, slm: Arch, elem: int = 2, slm_cache: str = "native") -> float | None:
    """Smallest mapping ratio at which IAM's KV falls below the LLM alone; None if never."""
    for n in range(1, llm.layers + 1):
        if kv_bytes_per_token(llm, slm, n, elem, slm_cache) < kv_bytes_per_token(llm, slm, 0, elem):
            return n / llm.layers
    return None


BREAK_EVEN_PAIRS = [
    ("qwen2-72b", "qwen2-0.5b"),
    ("qwen2-7b", "qwen2-0.5b"),
    ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"),
    ("llama-3.1-70b", "llama-3.2-1b"),
]
"""Preset pairs of the analytic bench's break-even table."""


def break_even_rows(pairs: list[tuple[str, str]], elem: int = 2) -> list[dict]:
    """Per preset pair and SLM cache kind: the break-even ratio and the KV ratio at ratio 0.5."""
    rows = []
    for big, small in pairs:
        llm, slm = PRESETS[big], PRESETS[small]
        half = units_for_ratio(0.5, llm.layers)
        row = {"llm": big, "slm": small}
        for kind in SLM_CACHE_NOTES:
            row[f"break_even_ratio_{kind}"] = break_even(llm, slm, elem, kind)
            alone = kv_bytes_per_token(llm, slm, 0, elem)
            row[f"kv_ratio_at_0.5_{kind}"] = kv_bytes_per_token(llm, slm, half, elem, kind) / alone
        rows.append(row)
    return rows
