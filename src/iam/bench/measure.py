"""Measured benchmarks of real runs: the LLM alone through its own ``generate()``, IAM through transformers'
``generate()`` at each ratio, and the SLM alone, side by side in rounds; and peak memory against context length."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..core.cache import slm_cache
from ..core.config import MappingConfig, check_mapped
from ..core.kernels import Kernels
from ..core.model import IAMForCausalLM
from ..eval.costs import Scenario, kept_share, llm_shares
from ..eval.setup import Setup, build, configured
from ..eval.timer import GenerationTimer, synchronize
from ..models.placement import input_device
from ..models.presets import Arch
from ..reporting import with_baseline
from .memory import PeakMemory, TensorPeak


def random_prompt(llm, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids (clear of the vocabulary's ends, where special tokens live) on the LLM's device."""
    vocab = llm.config.vocab_size
    margin = min(100, vocab // 4)
    return torch.randint(margin, vocab - margin, (batch, length), generator=generator).to(input_device(llm))


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


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def ratio_setups(
    ratios: Sequence[float],
    local_window: int = 0,
    policy: str | None = None,
    budget: float | int | None = None,
    scope: str = "all",
    llm_cache: str = "native",
) -> list[Setup]:
    """The LLM alone (with ``policy`` too, where it evicts from every layer), then IAM at each nonzero ratio with the
    local window, the policy and the LLM's cache: what ``iam bench`` measures without ``--configs``."""
    alone = [Setup()] + ([Setup(policy=policy, budget=budget)] if policy and scope == "all" else [])
    return alone + [Setup(r, local_window, policy, budget, scope, llm_cache) for r in ratios if r]


def check_budgeted(setups: Sequence[Setup]) -> None:
    """Raise unless ``setups`` start with the LLM alone and each has a budget (``measure``): eviction over every
    layer, scored in the forward, and both caches in their own dtype."""
    if not setups or not setups[0].plain:
        raise ValueError("setups must start with the LLM alone (Setup()): every budget is set against it.")
    unbudgeted = [
        s.label
        for s in setups
        if s.scope != "all" or "native" != s.llm_cache or "native" != s.slm_cache or (s.policy and s.eviction().reconstruct)
    ]
    if unbudgeted:
        raise ValueError(
            f"the budget models eviction over every layer, scored in the forward, and both caches in their own dtype; "
            f"{unbudgeted} are not measured against one: leave out :unmapped, quantized caches (+int8, +int4, +slm-*) "
            "and KVzip's policies (their repeat pass)."
        )


def measure(
    llm,
    slm,
    setups: Sequence[Setup],
    scenario: Scenario,
    repeats: int,
    base_config: MappingConfig,
    progress: bool = True,
    kernels: Kernels = Kernels(),
) -> list[dict]:
    """Run every setup (``iam.eval.setup``; the first is the LLM alone, through its own ``generate()``) and the SLM
    alone, in turns, ``repeats`` times after a warm-up round; report medians with min and max. IAM's models run
    ``kernels``, which their rows report (``None`` for the LLM alone).

    ``peak_mem_bytes`` comes from the warm-up round (see below). Every other row also carries its budget, what its
    parts cost measured alone in the same round: the LLM alone's time scaled by the share of its arithmetic that
    the setup leaves (prefill FLOPs, decode bytes; ``costs.llm_shares``), plus the SLM alone's time where layers are
    mapped. ``ttft_vs_budget``/``tpot_vs_budget`` are medians of the setup over its budget, round by round (1 = it
    costs exactly its parts; above 1, overhead).
    """
    check_budgeted(setups)
    configs = [configured(base_config, s) for s in setups]
    check_mapped([scenario.prompt], [c for c in configs if c.ratio], "a prompt")
    device = input_device(llm)
    ids = random_prompt(llm, scenario.batch, scenario.prompt, torch.Generator().manual_seed(0))
    models = [llm if s.plain else build(llm, slm, base_config, s, kernels=kernels) for s in setups]
    # The LLM alone runs through its own ``generate()``; its bytes are counted once, untimed, as IAM at ratio 0 holds
    # them (``IAMCache.kv_bytes``, the one byte accounting).
    alone_kv = run_generate(IAMForCausalLM(llm, slm, configs[0], kernels=kernels), ids, scenario.new_tokens)[1].kv_bytes()
    samples: list[list[dict]] = [[] for _ in [*setups, None]]  # the last: the SLM alone
    peaks: list[int] = [0] * len(setups)
    # Round 0 is a warm-up, dropped from the timings: it compiles FlexAttention and lets the allocator reach its
    # steady state, which on CPU otherwise keeps faulting fresh pages in for the first runs (see
    # ``timing_environment``). It is also the only round whose peak memory is taken: on CPU a sampler thread does
    # that, and glibc's mallinfo2 takes malloc's lock, which slows decode steps (docs/results.md, "Allocator").
    runs = [(rep, i) for rep in range(repeats + 1) for i in range(len(setups) + 1)]
    for rep, i in tqdm(runs, desc="bench runs", disable=not progress):
        if i == len(setups):
            sample = time_slm(slm, ids, scenario.new_tokens, base_config.slm_cache)
        else:
            memory = PeakMemory(device)
            with memory if rep == 0 else contextlib.nullcontext():
                timings, cache = run_generate(models[i], ids, scenario.new_tokens)
            if rep == 0:
                peaks[i] = memory.bytes
            if isinstance(models[i], IAMForCausalLM):
                kv, worth = cache.kv_bytes(), cache.mapping.layers_worth if cache.mapping else 0.0
                units = cache.mapping.units if cache.mapping else []
            else:
                kv, worth, units = alone_kv, 0.0, []
            sample = {**timings, "kv": kv, "layers_worth": worth, "units": units}
        if rep:
            samples[i].append(sample)
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    alone, slm_alone = samples[0], samples[-1]
    rows = []
    for setup, config, s, peak in zip(setups, configs, samples, peaks):
        kv = s[-1]["kv"]
        row = {
            "config": setup.label,
            "ratio": setup.ratio,
            "local_window": config.local_window,
            "kernels": None if setup.plain else kernels.summary(),
            "eviction": None if setup.policy is None else f"{setup.policy}@{setup.budget}",
            "mapped_layers": s[-1]["units"],
            "kv_bytes": kv["total"],
            "kv_llm_bytes": kv["llm"],
            "kv_slm_bytes": kv["slm"],
            "kv_ratio": kv["total"] / alone[-1]["kv"]["total"],
            "peak_mem_bytes": peak,
        }
        for key in ("ttft_s", "tpot_s"):
            row[key], row[key.replace("_s", "_min_s")], row[key.replace("_s", "_max_s")] = spread([x[key] for x in s])
        row["throughput_tok_s"] = scenario.batch / row["tpot_s"]
        if not setup.plain:
            local = config.sinks + config.local_window if config.local_window else 0
            kept = kept_share(setup.budget, scenario.prompt + scenario.new_tokens)
            shares = llm_shares(big, small, s[-1]["layers_worth"], scenario, llm.dtype.itemsize, local, kept)
            for key, share in zip(("ttft_s", "tpot_s"), shares):
                name = key[:4]
                paired = [b[key] if setup.ratio else 0.0 for b in slm_alone]
                budget = [a[key] * share + b for a, b in zip(alone, paired)]
                row[f"slm_{key}"] = statistics.median(paired)
                row[f"{name}_llm_share"] = share
                row[f"{name}_budget_s"] = statistics.median(budget)
                row[f"{name}_vs_budget"], row[f"{name}_vs_budget_min"], row[f"{name}_vs_budget_max"] = spread(
                    [x[key] / b for x, b in zip(s, budget)]
                )
        rows.append(row)
    for row in rows:
        row["ttft_speedup"] = rows[0]["ttft_s"] / row["ttft_s"]
        row["tpot_speedup"] = rows[0]["tpot_s"] / row["tpot_s"]
    return rows


def memory_scaling(
    llm,
    slm,
    lengths: list[int],
    ratios: list[float],
    base_config: MappingConfig,
    progress: bool = True,
    kernels: Kernels = Kernels(),
) -> list[dict]:
    """Prefill plus one decode step at each prompt length, the LLM alone and IAM (on ``kernels``) at each ratio,
    under ``TensorPeak``.

    Returns one row per (length, ratio): ``peak_tensor_bytes`` (activations and caches, weights excluded),
    ``largest_tensor_bytes``, ``tt_matrix_bytes`` (what one head's ``T x T`` score matrix would take), ``kv_bytes``
    and ``peak_growth`` (peak over the previous length's peak; about the length growth when memory is linear,
    its square when it is quadratic).
    """
    check_mapped(lengths, [replace(base_config, ratio=r) for r in ratios], "a `tokens` length")
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    runs = [(n, r) for n in sorted(lengths) for r in with_baseline(ratios)]
    for n, r in tqdm(runs, desc="memory scaling", disable=not progress):
        ids = random_prompt(llm, 1, n, g)
        iam = IAMForCausalLM(llm, slm, replace(base_config, ratio=r), kernels=kernels)
        with TensorPeak() as mem:
            _, cache = run_generate(iam, ids, 2)
        previous = next((row for row in reversed(rows) if row["ratio"] == r), None)
        rows.append(
            {
                "tokens": n,
                "ratio": r,
                "kernels": kernels.summary(),
                "peak_tensor_bytes": mem.peak,
                "largest_tensor_bytes": mem.largest,
                "tt_matrix_bytes": n * n * llm.dtype.itemsize,
                "kv_bytes": cache.kv_bytes()["total"],
                "length_growth": n / previous["tokens"] if previous else None,
                "peak_growth": mem.peak / previous["peak_tensor_bytes"] if previous else None,
            }
        )
    return rows
