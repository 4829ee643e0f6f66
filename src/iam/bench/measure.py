"""Measured benchmarks of real runs: the LLM alone through its own ``generate()``, IAM through transformers'
``generate()`` at each ratio, and the SLM alone, side by side in rounds; and peak memory against context length."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..core.cache import cache_bytes, slm_cache
from ..core.config import MappingConfig, check_mapped
from ..core.eviction import EvictionPolicy
from ..core.model import IAMForCausalLM
from ..models.presets import Arch
from ..reporting import with_baseline
from .costs import Scenario, llm_decode_bytes, llm_prefill_flops
from .memory import PeakMemory, TensorPeak
from .timing import GenerationTimer, synchronize


def random_prompt(llm, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (clear of the vocabulary's ends, where special tokens live) on the LLM's device."""
    vocab = llm.config.vocab_size
    margin = min(100, vocab // 4)
    return torch.randint(margin, vocab - margin, (batch, length), generator=generator).to(llm.device)


def run_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[dict[str, float], object]:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens, timed; returns the timings and the cache."""
    timer = GenerationTimer(ids.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=timer.start(),
        return_dict_in_generate=True,
    )
    return timer.timings, out.cache


@torch.inference_mode()
def time_slm(slm, ids: torch.Tensor, new_tokens: int, cache_kind: str = "native") -> dict[str, float]:
    """The SLM alone, as IAM runs it: base model only (no LM head), with IAM's kind of SLM cache, over the prompt,
    then ``new_tokens - 1`` one-token steps. Returns ``ttft_s`` and ``tpot_s``."""
    cache = slm_cache(slm.config, cache_kind)
    start = time.perf_counter()
    slm.model(input_ids=ids, cache=cache, use_cache=True)
    synchronize(ids.device)
    ttft = time.perf_counter() - start
    steps = max(new_tokens - 1, 1)
    start = time.perf_counter()
    for _ in range(steps):
        slm.model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
    synchronize(ids.device)
    return {"ttft_s": ttft, "tpot_s": (time.perf_counter() - start) / steps}


def measure(
    llm,
    slm,
    ratios: list[float],
    scenario: Scenario,
    repeats: int,
    base_config: MappingConfig,
    progress: bool = True,
    eviction: EvictionPolicy | None = None,
) -> list[dict]:
    """Run the LLM alone (its own ``generate()``), IAM at each ratio (``IAMForCausalLM.generate()``) and the SLM
    alone, in turns, ``repeats`` times after a warm-up round; report medians. With ``eviction`` every row evicts,
    the LLM alone (then through ``IAMForCausalLM`` at ratio 0) included.

    ``peak_mem_bytes`` comes from the warm-up round (see below). IAM rows also carry its budget, what the parts
    cost measured alone in the same round: the LLM's time scaled by the share of its arithmetic that mapping leaves
    (prefill FLOPs, decode bytes), plus the SLM's time. ``ttft_vs_budget``/``tpot_vs_budget`` are medians of IAM
    over its budget, round by round (1 = IAM costs exactly its parts; above 1, overhead).
    """
    check_mapped([scenario.prompt], [replace(base_config, ratio=r) for r in ratios], "a --prompt")
    device = llm.device
    ids = random_prompt(llm, scenario.batch, scenario.prompt, torch.Generator().manual_seed(0))
    ratios = with_baseline(ratios)
    models = {r: IAMForCausalLM(llm, slm, replace(base_config, ratio=r), eviction) for r in ratios}
    if eviction is None:
        models[0.0] = llm  # the LLM alone through its own generate()
    samples: dict[float | None, list[dict]] = {r: [] for r in [*ratios, None]}  # None: the SLM alone
    peaks: dict[float, int] = {}
    # Round 0 is a warm-up, dropped from the timings: it compiles FlexAttention and lets the allocator reach its
    # steady state, which on CPU otherwise keeps faulting fresh pages in for the first runs (see
    # ``timing_environment``). It is also the only round whose peak memory is taken: on CPU a sampler thread does
    # that, and glibc's mallinfo2 takes malloc's lock, which slows decode steps (docs/results.md).
    runs = [(rep, r) for rep in range(repeats + 1) for r in [*ratios, None]]
    for rep, r in tqdm(runs, desc="bench runs", disable=not progress):
        if r is None:
            sample = time_slm(slm, ids, scenario.new_tokens, base_config.slm_cache)
        else:
            memory = PeakMemory(device)
            with memory if rep == 0 else contextlib.nullcontext():
                timings, cache = run_generate(models[r], ids, scenario.new_tokens)
            if rep == 0:
                peaks[r] = memory.bytes
            if isinstance(models[r], IAMForCausalLM):
                kv, units = cache.kv_bytes(), cache.mapping.units if cache.mapping else []
            else:
                kv, units = {"llm": cache_bytes(cache), "slm": 0, "total": cache_bytes(cache)}, []
            sample = {**timings, "kv": kv, "units": units}
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
            "mapped_layers": s[-1]["units"],
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
            n = models[r].resolved.layers_worth
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


def memory_scaling(
    llm, slm, lengths: list[int], ratios: list[float], base_config: MappingConfig, progress: bool = True
) -> list[dict]:
    """Prefill plus one decode step at each prompt length, the LLM alone and IAM at each ratio, under ``TensorPeak``.

    Returns one row per (length, ratio): ``peak_tensor_bytes`` (activations and caches, weights excluded),
    ``largest_tensor_bytes``, ``tt_matrix_bytes`` (what one head's ``T x T`` score matrix would take), ``kv_bytes``
    and ``peak_growth`` (peak over the previous length's peak; about the length growth when memory is linear,
    its square when it is quadratic).
    """
    check_mapped(lengths, [replace(base_config, ratio=r) for r in ratios], "a --tokens length")
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    runs = [(n, r) for n in sorted(lengths) for r in with_baseline(ratios)]
    for n, r in tqdm(runs, desc="memory scaling", disable=not progress):
        ids = random_prompt(llm, 1, n, g)
        iam = IAMForCausalLM(llm, slm, replace(base_config, ratio=r))
        with TensorPeak() as mem:
            _, cache = run_generate(iam, ids, 2)
        previous = next((row for row in reversed(rows) if row["ratio"] == r), None)
        rows.append(
            {
                "tokens": n,
                "ratio": r,
                "peak_tensor_bytes": mem.peak,
                "largest_tensor_bytes": mem.largest,
                "tt_matrix_bytes": n * n * llm.dtype.itemsize,
                "kv_bytes": cache.kv_bytes()["total"],
                "length_growth": n / previous["tokens"] if previous else None,
                "peak_growth": mem.peak / previous["peak_tensor_bytes"] if previous else None,
            }
        )
    return rows
