"""Where a prefill's time goes, part by part: ``generate()`` of one token under ``torch.profiler``, read through the
``iam.*`` ranges that the model marks (``record_function``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..core.config import MappingConfig
from ..core.kernels import Kernels
from ..eval.costs import Scenario
from ..eval.setup import Setup, build
from .measure import random_prompt, run_generate

PARTS = {
    "iam.slm": "the SLM's pass (its layers, recording queries)",
    "iam.slm_window": "the SLM's attention on the establishing window",
    "iam.establish": "each mapped layer's window Q/K and head matching",
    "iam.match": "head matching (in establish)",
    "iam.blend_fit": "the simplex fit of blended heads (in match)",
    "iam.routes": "each mapped layer's routes for the kernels",
    "iam.mapped_attention": "mapped layers' attention (borrowed rows times V; the local window)",
    "iam.evict": "eviction scores and compaction",
}
TOP = ("iam.slm", "iam.slm_window", "iam.establish", "iam.routes", "iam.mapped_attention", "iam.evict")
"""The parts that do not nest in one another: the LLM's own layers take the rest."""


def profile_prefill(
    llm,
    slm,
    setups: Sequence[Setup],
    scenario: Scenario,
    repeats: int,
    base_config: MappingConfig,
    kernels: Kernels = Kernels(),
) -> list[dict]:
    """Per setup (IAM's on ``kernels``): TTFT (``generate()`` of one token; median of ``repeats`` after a warm-up),
    then one profiled run split into ``PARTS`` and ``llm_own_s``, the rest (the LLM's own layers, its LM head and
    the glue). Profiled seconds run above the plain ones (the profiler's cost); ``*_share`` columns are of the
    profiled run. CPU only: on a GPU the ranges' CPU time is launch time, and the split would be wrong."""
    if llm.device.type != "cpu":
        raise ValueError(f"the prefill profile splits CPU time; the models are on {llm.device}: profile on a CPU.")
    ids = random_prompt(llm, scenario.batch, scenario.prompt, torch.Generator().manual_seed(0))
    rows = []
    for setup in setups:
        model = llm if setup.plain else build(llm, slm, base_config, setup, kernels=kernels)
        run_generate(model, ids, 1)  # warm-up: compiles FlexAttention, settles the allocator
        ttft = statistics.median(run_generate(model, ids, 1)[0]["ttft_s"] for _ in range(repeats))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = run_generate(model, ids, 1)[0]["ttft_s"]
        seen = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in PARTS}
        parts = {name: seen.get(name, 0.0) for name in PARTS}
        row = {"config": setup.label, "kernels": None if setup.plain else kernels.summary(), "ttft_s": ttft}
        row["profiled_ttft_s"] = profiled
        row["llm_own_s"] = profiled - sum(parts[name] for name in TOP)
        for name, seconds in parts.items():
            row[f"{name[4:]}_s"] = seconds
        for name in ["llm_own", *(n[4:] for n in PARTS)]:
            row[f"{name}_share"] = row[f"{name}_s"] / profiled
        rows.append(row)
    return rows
