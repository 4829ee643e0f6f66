"""Efficiency benchmarks: analytic (configs only) and measured (real runs, side by side, medians).

Analytic accounting per ratio ``r`` (``n = round(r * L)`` mapped layers):

- KV bytes per token: ``2 L kv d b`` for the LLM alone; IAM drops the K of the ``n`` mapped layers and adds the
  SLM's whole cache (``paper`` accounting); the ``iam`` accounting keeps that SLM cache in int8 with one scale
  per head and token, as ``MappingConfig(slm_cache="int8")`` does.
- Prefill FLOPs (``T`` tokens): linear layers ``2 P T`` plus causal attention ``2 H d T^2`` per layer (QK^T and PV),
  LM head on the last token. A mapped layer skips its Q/K projections and QK^T, keeps V, O, MLP and PV, and its
  SDPA recomputes the SLM's QK^T per LLM head (``H d_s T^2``); the SLM runs its layers but not its LM head.
- Decode is memory-bound: a step reads the weights once and every sequence's KV, so the TPOT limit is the ratio
  of bytes read per step.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, replace

import torch

from .cache import slm_cache, with_cache
from .config import with_baseline
from .generation import synchronize
from .memory import PeakMemory, TensorPeak, cpu_memory_measure, malloc_in_use
from .presets import Arch
from .selection import format_plan

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


METHODS = {
    "paper": "plain IAM: mapped layers drop K, the SLM's full cache is added",
    "iam": "this library: as paper, with the SLM cache in int8 plus one scale per head and token (slm_cache='int8')",
}


def llm_kv_bytes_per_token(llm: Arch, n_mapped: float, elem: int) -> float:
    """The LLM's own KV per token: K and V of every layer, less the K of the mapped ones."""
    return (2 * llm.layers - n_mapped) * llm.kv_heads * llm.head_dim * elem


def slm_kv_bytes_per_token(slm: Arch, elem: int, method: str = "paper") -> int:
    """The SLM's whole KV per token; ``iam`` accounting: int8 plus one ``elem``-byte scale per head and token."""
    row = slm.head_dim * elem if method == "paper" else slm.head_dim + elem
    return 2 * slm.layers * slm.kv_heads * row


def kv_bytes_per_token(llm: Arch, slm: Arch, n_mapped: int, elem: int, method: str = "paper") -> int:
    own = int(llm_kv_bytes_per_token(llm, n_mapped, elem))
    return own + slm_kv_bytes_per_token(slm, elem, method) if n_mapped else own


def layer_prefill_flops(llm: Arch, slm: Arch, tokens: int, mapped: bool = False) -> float:
    """FLOPs of one LLM decoder layer over ``tokens`` (causal attention: QK^T and PV each ``H d T^2``)."""
    t = tokens
    if not mapped:
        return 2 * llm.layer_params * t + 2 * llm.heads * llm.head_dim * t * t
    # No Q/K projections and no own QK^T; PV stays, and SDPA redoes the SLM head's QK^T per LLM head.
    return 2 * (llm.layer_params - llm.qk_params) * t + llm.heads * (llm.head_dim + slm.head_dim) * t * t


def llm_prefill_flops(llm: Arch, slm: Arch, n_mapped: float, tokens: int) -> float:
    """Prefill FLOPs of the LLM's own pass, ``n_mapped`` layers mapped (LM head on the last token only)."""
    unmapped, mapped = (layer_prefill_flops(llm, slm, tokens, m) for m in (False, True))
    return (llm.layers - n_mapped) * unmapped + n_mapped * mapped + 2 * llm.hidden * llm.vocab


def prefill_flops(llm: Arch, slm: Arch, n_mapped: int, tokens: int) -> float:
    """Prefill FLOPs of the whole pair (the SLM runs no LM head)."""
    own = llm_prefill_flops(llm, slm, n_mapped, tokens)
    return own + slm.layers * layer_prefill_flops(slm, slm, tokens) if n_mapped else own


def llm_decode_bytes(llm: Arch, n_mapped: float, batch: int, context: int, elem: int) -> float:
    """Bytes the LLM's own part of a decode step reads: its weights less the mapped Q/K, and its KV."""
    return (llm.params - n_mapped * llm.qk_params) * elem + batch * context * llm_kv_bytes_per_token(llm, n_mapped, elem)


def decode_bytes(llm: Arch, slm: Arch, n_mapped: int, batch: int, context: int, elem: int, method: str = "paper") -> float:
    """Bytes read by one decode step: weights once (the SLM without its LM head), plus the KV of every sequence."""
    own = llm_decode_bytes(llm, n_mapped, batch, context, elem)
    if not n_mapped:
        return own
    slm_weights = (slm.params - slm.vocab * slm.hidden * (0 if slm.tied else 1)) * elem
    return own + slm_weights + batch * context * slm_kv_bytes_per_token(slm, elem, method)


def analytic_rows(
    llm: Arch, slm: Arch, ratios: list[float], scenario: Scenario, elem: int = 2, budget_gb: float | None = None
) -> list[dict]:
    """Rows per method (``paper``, ``iam``) and ratio; ratio 0 (the LLM alone) first."""
    context = scenario.prompt + scenario.new_tokens
    base_kv = kv_bytes_per_token(llm, slm, 0, elem)
    base_prefill = prefill_flops(llm, slm, 0, scenario.prompt)
    base_decode = decode_bytes(llm, slm, 0, scenario.batch, context, elem)
    base_batch = base_tput = None
    rows = []
    for method in METHODS:
        for r in with_baseline(ratios):
            n = round(r * llm.layers)
            kv = kv_bytes_per_token(llm, slm, n, elem, method)
            flops = prefill_flops(llm, slm, n, scenario.prompt)
            row = {
                "method": method,
                "ratio": r,
                "mapped_layers": n,
                "kv_bytes": kv,
                "kv_ratio": kv / base_kv,
                "prefill_tflops": flops / 1e12,
                "ttft_limit": base_prefill / flops,
                "tpot_limit": base_decode / decode_bytes(llm, slm, n, scenario.batch, context, elem, method),
            }
            if budget_gb is not None:
                weights = (llm.params + (slm.params if n else 0)) * elem
                max_batch = max(int((budget_gb * GB - weights) // (kv * context)), 0)
                step = decode_bytes(llm, slm, n, max_batch, context, elem, method)
                row["max_batch"] = max_batch
                row["throughput_tok_s_per_tbps"] = max_batch / step * 1e12 if max_batch else 0.0
                if base_batch is None:
                    base_batch, base_tput = max_batch, row["throughput_tok_s_per_tbps"]
                row["batch_ratio"] = max_batch / base_batch if base_batch else math.nan
                row["throughput_ratio"] = row["throughput_tok_s_per_tbps"] / base_tput if base_tput else math.nan
            rows.append(row)
    return rows


def break_even(llm: Arch, slm: Arch, elem: int = 2, method: str = "paper") -> float | None:
    """Smallest mapping ratio at which IAM's KV falls below the LLM alone; None if never."""
    for n in range(1, llm.layers + 1):
        if kv_bytes_per_token(llm, slm, n, elem, method) < kv_bytes_per_token(llm, slm, 0, elem):
            return n / llm.layers
    return None


# ---- measured ------------------------------------------------------------------------------------------------
def random_prompt(llm, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (clear of the vocabulary's ends, where special tokens live) on the LLM's device."""
    vocab = llm.config.vocab_size
    margin = min(100, vocab // 4)
    return torch.randint(margin, vocab - margin, (batch, length), generator=generator).to(llm.device)


@torch.inference_mode()
def time_slm(slm, ids: torch.Tensor, new_tokens: int, cache_kind: str = "native") -> dict[str, float]:
    """The SLM alone, as IAM runs it: base model only (no LM head), with IAM's kind of SLM cache, over the prompt,
    then ``new_tokens - 1`` one-token steps. Returns ``ttft_s`` and ``tpot_s``."""
    cache = slm_cache(slm.config, cache_kind)
    start = time.perf_counter()
    slm.model(input_ids=ids, **with_cache(cache), use_cache=True)
    synchronize(ids.device)
    ttft = time.perf_counter() - start
    steps = max(new_tokens - 1, 1)
    start = time.perf_counter()
    for _ in range(steps):
        slm.model(input_ids=ids[:, -1:], **with_cache(cache), use_cache=True)
    synchronize(ids.device)
    return {"ttft_s": ttft, "tpot_s": (time.perf_counter() - start) / steps}


def measure(llm, slm, ratios: list[float], scenario: Scenario, repeats: int, base_config, progress: bool = True) -> list[dict]:
    """Run the LLM alone, IAM at each ratio and the SLM alone, in turns, ``repeats`` times after a warm-up round;
    report medians.

    ``peak_mem_bytes`` comes from the warm-up round (see below). IAM rows also carry its budget, what the parts
    cost measured alone in the same round: the LLM's time scaled by the share of its arithmetic that mapping leaves
    (prefill FLOPs, decode bytes), plus the SLM's time. ``ttft_vs_budget``/``tpot_vs_budget`` are medians of IAM
    over its budget, round by round (1 = IAM costs exactly its parts; above 1, overhead).
    """
    from tqdm.auto import tqdm

    from .model import IAMModel

    device = llm.device
    ids = random_prompt(llm, scenario.batch, scenario.prompt, torch.Generator().manual_seed(0))
    ratios = with_baseline(ratios)
    samples: dict[float | None, list[dict]] = {r: [] for r in [*ratios, None]}  # None: the SLM alone
    peaks: dict[float, int] = {}
    # Round 0 is a warm-up, dropped from the timings: it compiles FlexAttention and lets the allocator reach its
    # steady state, which on CPU otherwise keeps faulting fresh pages in for the first runs (see
    # ``timing_environment``). It is also the only round whose peak memory is taken: on CPU a sampler thread does
    # that, and glibc's mallinfo2 takes malloc's lock, which slowed IAM's decode steps by 15-20%.
    runs = [(rep, r) for rep in range(repeats + 1) for r in [*ratios, None]]
    for rep, r in tqdm(runs, desc="bench runs", disable=not progress):
        if r is None:
            sample = time_slm(slm, ids, scenario.new_tokens, base_config.slm_cache)
        else:
            iam, memory = IAMModel(llm, slm, replace(base_config, ratio=r)), PeakMemory(device)
            with memory if rep == 0 else contextlib.nullcontext():
                iam.generate(ids, max_new_tokens=scenario.new_tokens, eos_token_id=[])
            if rep == 0:
                peaks[r] = memory.bytes
            sample = {**iam.timings, "kv": iam.kv_cache_bytes(), "plan": iam.plan}
        if rep:
            samples[r].append(sample)
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    elem, context = llm.dtype.itemsize, scenario.prompt + scenario.new_tokens
    alone, slm_alone = samples[0.0], samples[None]
    rows = []
    for r in ratios:
        s = samples[r]
        kv = s[-1]["kv"]
        row = {
            "ratio": r,
            "mapped_layers": format_plan(s[-1]["plan"], big.kv_heads),
            "kv_bytes": kv["total"],
            "kv_llm_bytes": kv["llm"],
            "kv_slm_bytes": kv["slm"],
            "kv_ratio": kv["total"] / alone[-1]["kv"]["total"],
            "ttft_s": statistics.median(x["ttft_s"] for x in s),
            "tpot_s": statistics.median(x["tpot_s"] for x in s),
            "peak_mem_bytes": peaks[r],
        }
        row["throughput_tok_s"] = scenario.batch / row["tpot_s"]
        if r:
            n = sum(len(groups) for groups in s[-1]["plan"].values()) / big.kv_heads  # mapped layers' worth
            share = {
                "ttft_s": llm_prefill_flops(big, small, n, scenario.prompt) / llm_prefill_flops(big, small, 0, scenario.prompt),
                "tpot_s": llm_decode_bytes(big, n, scenario.batch, context, elem)
                / llm_decode_bytes(big, 0, scenario.batch, context, elem),
            }
            for key, name in (("ttft_s", "ttft"), ("tpot_s", "tpot")):
                budget = [a[key] * share[key] + b[key] for a, b in zip(alone, slm_alone)]
                row[f"slm_{key}"] = statistics.median(b[key] for b in slm_alone)
                row[f"{name}_budget_s"] = statistics.median(budget)
                row[f"{name}_vs_budget"] = statistics.median(x[key] / b for x, b in zip(s, budget))
        rows.append(row)
    for row in rows:
        row["ttft_speedup"] = rows[0]["ttft_s"] / row["ttft_s"]
        row["tpot_speedup"] = rows[0]["tpot_s"] / row["tpot_s"]
    return rows


def timing_environment() -> dict:
    """What a timing depends on beyond the code: torch version, threads, and the allocator settings.

    On Linux CPUs glibc's malloc serves large tensors with fresh ``mmap`` pages and returns them on free, so every
    forward faults its activations in again (about a million page faults, seconds of system time, per 4 x 256
    prefill of the 1.5B model), and how many depends on the run's history. ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<large>`` (or jemalloc/tcmalloc through ``LD_PRELOAD``) keeps freed memory in the
    process; the settings in force are recorded with every measured result, with what CPU peak memory samples."""
    allocator = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "cpu_peak_memory": cpu_memory_measure(),
    }


STEADY_MALLOC = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000"
"""glibc malloc settings that keep freed memory in the process (``make bench`` runs with them)."""


def allocator_note(device: torch.device) -> str | None:
    """A hint to print before CPU timings taken under glibc malloc's defaults (see ``timing_environment``)."""
    if device.type != "cpu" or malloc_in_use() is None or os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return None
    return (
        "note: glibc malloc hands freed memory back to the OS here, and CPU timings then include faulting it in again "
        f"on every forward; for steady timings run with {STEADY_MALLOC} (as `make bench` does)."
    )


def memory_scaling(llm, slm, lengths: list[int], ratios: list[float], base_config, progress: bool = True) -> list[dict]:
    """Prefill plus one decode step at each prompt length, the LLM alone and IAM at each ratio, under ``TensorPeak``.

    Returns one row per (length, ratio): ``peak_tensor_bytes`` (activations and caches, weights excluded),
    ``largest_tensor_bytes``, ``tt_matrix_bytes`` (what one head's ``T x T`` score matrix would take), ``kv_bytes``
    and ``peak_growth`` (peak over the previous length's peak; about the length growth when memory is linear,
    its square when it is quadratic).
    """
    from tqdm.auto import tqdm

    from .model import IAMModel

    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    runs = [(n, r) for n in sorted(lengths) for r in with_baseline(ratios)]
    for n, r in tqdm(runs, desc="memory scaling", disable=not progress):
        ids = random_prompt(llm, 1, n, g)
        iam = IAMModel(llm, slm, replace(base_config, ratio=r))
        with TensorPeak() as mem:
            iam.generate(ids, max_new_tokens=2, eos_token_id=[])
        previous = next((row for row in reversed(rows) if row["ratio"] == r), None)
        rows.append(
            {
                "tokens": n,
                "ratio": r,
                "peak_tensor_bytes": mem.peak,
                "largest_tensor_bytes": mem.largest,
                "tt_matrix_bytes": n * n * llm.dtype.itemsize,
                "kv_bytes": iam.kv_cache_bytes()["total"],
                "length_growth": n / previous["tokens"] if previous else None,
                "peak_growth": mem.peak / previous["peak_tensor_bytes"] if previous else None,
            }
        )
    return rows
