"""``iam bench``: efficiency, LLM alone vs IAM (analytic, projected from measured parts, measured side by side,
profiled part by part, and memory against context)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..bench import measure, profile, projection
from ..bench.timing import allocator_note, stamped, timing_environment
from ..core.config import MappingConfig, check_mapped
from ..eval import costs
from ..eval.setup import Setup
from ..models.presets import load_arch
from ..reporting import markdown_table
from .common import (
    add_eviction_args,
    add_mapping_args,
    add_output_args,
    add_pair_args,
    add_placement_args,
    at_ratios,
    count_list,
    eviction,
    finish,
    load,
    mapping_config,
    positive_float,
    positive_int,
    ratio_list,
    setups_of,
)

PAPER_PAIR = ("qwen2-72b", "qwen2-0.5b")
SHIPPED_PAIR = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")


def warn_allocator(device: torch.device) -> None:
    note = allocator_note(device)
    if note:
        print(note, file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    ratios = [0.3, 0.5] if args.ratios is None else args.ratios
    bad = [r for r in ratios if not 0 <= r <= 1]
    if bad:
        raise ValueError(f"--ratios must lie in [0, 1] (fractions of the LLM's layers mapped), got {bad}.")
    full, cpu = costs.SCENARIOS[args.scenario]
    scenario = full if args.full_size or args.analytic else cpu
    prompt, batch, new_tokens = (
        args.prompt or scenario.prompt,
        args.batch or scenario.batch,
        args.new_tokens or scenario.new_tokens,
    )
    scenario = costs.Scenario(prompt, batch, new_tokens)
    unmeasured = args.analytic or args.projection or args.memory_scaling
    if unmeasured and (args.device_map or args.max_memory or args.offload_folder or (args.tp is not None and not args.analytic)):
        raise ValueError("--tp and --device-map spread measured runs; of the other modes only --analytic takes --tp N.")
    if args.configs is not None and unmeasured:
        raise ValueError("--configs sets measured runs; --analytic, --projection and --memory-scaling take --ratios.")
    if args.analytic and args.tp == 0:
        raise ValueError("bench --analytic --tp takes the number of devices, e.g. --tp 8.")
    if args.projection:
        return bench_projection(args, ratios)
    if args.analytic:
        return bench_analytic(args, ratios, scenario)
    if args.memory_scaling:
        return bench_memory(args, ratios)
    return bench_measured(args, scenario)


def bench_projection(args: argparse.Namespace, ratios: list[float]) -> int:
    device = torch.device(args.device)
    warn_allocator(device)
    local = (mapping_config(args, 0.0).sinks, args.local_window) if args.local_window else None
    llm, slm = load_arch(args.llm or PAPER_PAIR[0]), load_arch(args.slm or PAPER_PAIR[1])
    tokens = args.tokens or ([512, 8192] if device.type == "cuda" else [512])
    dtype = getattr(torch, args.dtype)
    result = projection.project(llm, slm, ratios, tokens, device, dtype, args.repeats, args.decode_repeats, local)
    result.update(parts=stamped(result["parts"]), rows=stamped(result["rows"]))
    result.update(mode="projection", local_window=args.local_window, device=str(device), dtype=args.dtype)
    result.update(repeats=args.repeats, decode_repeats=args.decode_repeats, **timing_environment())
    if not args.json:
        print("measured parts (seconds):\n" + markdown_table(result["parts"], list(result["parts"][0])))
    columns = ["tokens", "ratio", "kv_ratio", "ttft_s", "tpot_s", "ttft_speedup", "ttft_limit", "ttft_of_limit"]
    return finish(args, "bench-projection", result, [*columns, "tpot_speedup", "tpot_limit", "ttft_speedup_vs_eager"])


def bench_memory(args: argparse.Namespace, ratios: list[float]) -> int:
    base = mapping_config(args, 0.0)
    tokens = args.tokens or [1024, 2048, 4096, 8192]
    check_mapped(tokens, at_ratios(base, ratios), "a --tokens length")
    llm, slm, _ = load(args, at_ratios(base, ratios), (args.llm or SHIPPED_PAIR[0], args.slm or SHIPPED_PAIR[1]))
    rows = measure.memory_scaling(llm, slm, tokens, ratios, base)
    result = {"mode": "memory-scaling", "device": str(llm.device), "dtype": str(llm.dtype), "rows": rows}
    columns = ["tokens", "ratio", "peak_tensor_bytes", "peak_growth", "largest_tensor_bytes", "tt_matrix_bytes", "kv_bytes"]
    return finish(args, "bench-memory", result, columns)


def bench_analytic(args: argparse.Namespace, ratios: list[float], scenario: costs.Scenario) -> int:
    if args.local_window:
        raise ValueError("--analytic does not model --local-window (its K bytes depend on the context); measure it instead.")
    llm, slm = load_arch(args.llm or PAPER_PAIR[0]), load_arch(args.slm or PAPER_PAIR[1])
    policy = eviction(args)
    kept = costs.kept_share(policy and policy.budget, scenario.prompt + scenario.new_tokens)
    rows = costs.analytic_rows(llm, slm, ratios, scenario, args.bytes, args.memory_budget, kept)
    columns = ["slm_cache", "ratio", "mapped_layers", "kv_bytes", "kv_ratio", "ttft_limit", "tpot_limit"]
    if args.memory_budget:
        columns += ["max_batch", "batch_ratio", "throughput_ratio"]
    result = {"mode": "analytic", "slm_caches": costs.SLM_CACHE_NOTES, "scenario": args.scenario, **vars(scenario)}
    result.update(bytes_per_element=args.bytes, eviction=None if policy is None else repr(policy), kept_share=kept)
    result.update(memory_budget_gb=args.memory_budget, rows=rows)
    result["break_even"] = costs.break_even_rows(costs.BREAK_EVEN_PAIRS, args.bytes)
    if args.tp is not None:
        per_device = costs.per_device_rows(llm, slm, ratios, scenario, args.bytes, args.tp)
        result.update(tp=args.tp, per_device=per_device)
        if not args.json:
            print(f"per device, tensor parallel over {args.tp}:\n" + markdown_table(per_device, list(per_device[0])))
    return finish(args, "bench-analytic", result, columns)


def bench_setups(args: argparse.Namespace) -> tuple[MappingConfig, list[Setup], list[MappingConfig]]:
    """The measured bench's configurations (``setups_of``): ``--configs``, or ``measure.ratio_setups`` of
    ``--ratios`` with ``--local-window``, ``--llm-cache`` and eviction."""
    if args.configs is not None:
        if args.ratios or args.eviction:
            raise ValueError("give either --configs, or --ratios with --local-window/--eviction, not both.")
        return setups_of(args, args.configs)
    ratios = args.ratios if args.ratios is not None else [0.3, 0.5]
    policy = (args.eviction, args.budget, args.eviction_scope) if args.eviction else ()
    setups = measure.ratio_setups(ratios, args.local_window, *policy, llm_cache=args.llm_cache)
    return setups_of(args, setups, local_window=0, llm_cache="native")


def bench_measured(args: argparse.Namespace, scenario: costs.Scenario) -> int:
    """Every configuration side by side (``measure.measure``) at each prompt length, or profiled (``--profile``)."""
    base, setups, configs = bench_setups(args)
    if not args.profile:
        measure.check_budgeted(setups)
    prompts = args.tokens or ([1024, 4096] if args.scenario == "long" and not args.prompt else [scenario.prompt])
    configs = [c for c in configs if c.ratio]
    check_mapped(prompts, configs, "a --prompt")
    llm, slm, _ = load(args, configs, (args.llm or SHIPPED_PAIR[0], args.slm or SHIPPED_PAIR[1]))
    warn_allocator(llm.device)
    meta = {"scenario": args.scenario, "batch": scenario.batch, "new_tokens": scenario.new_tokens, "device": str(llm.device)}
    meta.update(dtype=str(llm.dtype), configs=[s.label for s in setups], repeats=args.repeats)
    if args.profile:
        at = costs.Scenario(prompts[0], scenario.batch, scenario.new_tokens)
        rows = profile.profile_prefill(llm, slm, setups, at, args.repeats, base)
        result = {"mode": "profile", **meta, "prompt": at.prompt, "parts": profile.PARTS, **timing_environment()}
        result["rows"] = stamped(rows)
        shares = [f"{name}_share" for name in ["llm_own", *(n[4:] for n in profile.PARTS)]]
        return finish(args, "bench-profile", result, ["config", "ttft_s", "profiled_ttft_s", *shares])
    rows = []
    for prompt in prompts:
        at = costs.Scenario(prompt, scenario.batch, scenario.new_tokens)
        rows += [{"prompt": prompt, **row} for row in measure.measure(llm, slm, setups, at, args.repeats, base)]
    result = {"mode": "measured", **meta, "prompts": prompts, **timing_environment(), "rows": stamped(rows)}
    columns = ["prompt", "config", "kv_ratio", "ttft_s", "ttft_min_s", "ttft_max_s", "tpot_s", "tpot_min_s", "tpot_max_s"]
    columns += ["ttft_speedup", "tpot_speedup", "ttft_vs_budget", "ttft_vs_budget_min", "ttft_vs_budget_max"]
    columns += ["tpot_vs_budget", "tpot_vs_budget_min", "tpot_vs_budget_max", "peak_mem_bytes"]
    return finish(args, f"bench-{args.scenario}", result, columns)


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="efficiency: KV bytes, TTFT, TPOT, memory; LLM alone vs IAM")
    add_pair_args(p, llm=None, slm=None)
    add_placement_args(p)
    add_mapping_args(p)
    add_output_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--analytic", action="store_true", help="configs only (presets or config.json), no weights")
    mode.add_argument(
        "--projection",
        action="store_true",
        help="time one real-size layer of --llm (a preset or config.json) and project the full model",
    )
    mode.add_argument(
        "--profile",
        action="store_true",
        help="where each configuration's prefill time goes: one profiled generate() per --configs entry, part by part",
    )
    mode.add_argument(
        "--memory-scaling",
        action="store_true",
        help="exact live-tensor peak of prefill + decode at each --tokens length (default 1024,2048,4096,8192)",
    )
    p.add_argument(
        "--tokens",
        type=count_list,
        default=None,
        help="context lengths, e.g. 512,8192: of projection and memory scaling; measured runs take each as a prompt length",
    )
    p.add_argument("--scenario", default="concurrency", choices=sorted(costs.SCENARIOS))
    p.add_argument("--full-size", action="store_true", help="the paper's sizes instead of the CPU-sized defaults")
    p.add_argument("--prompt", type=positive_int, default=None, help="prompt tokens (overrides the scenario)")
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--new-tokens", type=positive_int, default=None)
    p.add_argument("--ratios", type=ratio_list, default=None, help="mapping ratios (default 0.3,0.5; the LLM alone always runs)")
    p.add_argument(
        "--configs",
        default=None,
        help="measured: configurations side by side instead of --ratios, e.g. iam0.5,iam0.5+w64,iam0.5+streaming@0.8 "
        "(llm|iam<ratio>, then +w<window>, +b<blend>, +<policy>@<budget>[:unmapped], +int8)",
    )
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument(
        "--decode-repeats", type=positive_int, default=20, help="projection: rounds of the decode-step timings (short and noisy)"
    )
    p.add_argument("--bytes", type=positive_int, default=2, help="bytes per cached element (analytic; 2 = fp16/bf16)")
    p.add_argument("--memory-budget", type=positive_float, default=None, metavar="GB", help="analytic: memory for weights + KV")
    add_eviction_args(p)
    p.set_defaults(func=cmd_bench)
