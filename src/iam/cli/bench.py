"""``iam bench``: efficiency, LLM alone vs IAM (analytic, projected from measured parts, measured, and memory against
context)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from ..bench import costs, measure, projection
from ..bench.timing import allocator_note, timing_environment
from ..core.config import check_mapped
from ..core.selection import units_for_ratio
from ..models.presets import PRESETS, load_arch
from ..reporting import markdown_table
from .common import (
    add_eviction_args,
    add_mapping_args,
    add_output_args,
    add_pair_args,
    add_placement_args,
    count_list,
    eviction,
    finish,
    load,
    mapping_config,
    positive_float,
    positive_int,
    ratio_list,
)

BREAK_EVEN_PAIRS = [
    ("qwen2-72b", "qwen2-0.5b"),
    ("qwen2-7b", "qwen2-0.5b"),
    ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"),
    ("llama-3.1-70b", "llama-3.2-1b"),
]


def warn_allocator(device: torch.device) -> None:
    note = allocator_note(device)
    if note:
        print(note, file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    bad = [r for r in args.ratios if not 0 <= r <= 1]
    if bad:
        raise ValueError(f"--ratios must lie in [0, 1] (fractions of the LLM's layers mapped), got {bad}.")
    full, cpu = costs.SCENARIOS[args.scenario]
    scenario = full if args.full_size or args.analytic else cpu
    scenario = costs.Scenario(
        args.prompt or scenario.prompt, args.batch or scenario.batch, args.new_tokens or scenario.new_tokens
    )
    meta = {"scenario": args.scenario, **vars(scenario)}
    if (args.analytic or args.projection or args.memory_scaling) and (
        args.device_map or args.max_memory or args.offload_folder or (args.tp is not None and not args.analytic)
    ):
        raise ValueError("--tp and --device-map spread measured runs; of the other modes only --analytic takes --tp N.")
    if args.analytic and args.tp == 0:
        raise ValueError("bench --analytic --tp takes the number of devices, e.g. --tp 8.")
    if args.projection:
        args.llm, args.slm = args.llm or "qwen2-72b", args.slm or "qwen2-0.5b"
        device = torch.device(args.device)
        warn_allocator(device)
        tokens = args.tokens or ([512, 8192] if device.type == "cuda" else [512])
        result = projection.project(
            load_arch(args.llm),
            load_arch(args.slm),
            args.ratios,
            tokens,
            device,
            getattr(torch, args.dtype),
            args.repeats,
            args.decode_repeats,
        )
        result.update(
            mode="projection",
            device=str(device),
            dtype=args.dtype,
            repeats=args.repeats,
            decode_repeats=args.decode_repeats,
            **timing_environment(),
        )
        if not args.json:
            print("measured parts (seconds):\n" + markdown_table(result["parts"], list(result["parts"][0])))
        return finish(
            args,
            "bench-projection",
            result,
            [
                "tokens",
                "ratio",
                "kv_ratio",
                "ttft_s",
                "tpot_s",
                "ttft_speedup",
                "ttft_limit",
                "tpot_speedup",
                "tpot_limit",
                "ttft_speedup_vs_eager",
            ],
        )
    if args.memory_scaling:
        args.llm, args.slm = args.llm or "qwen2.5-coder-1.5b", args.slm or "qwen2.5-coder-0.5b"
        base = mapping_config(args, 0.0)
        tokens = args.tokens or [1024, 2048, 4096, 8192]
        check_mapped(tokens, [replace(base, ratio=r) for r in args.ratios], "a --tokens length")
        llm, slm, _ = load(args, [replace(base, ratio=r) for r in args.ratios])
        rows = measure.memory_scaling(llm, slm, tokens, args.ratios, base)
        result = {"mode": "memory-scaling", "device": str(llm.device), "dtype": str(llm.dtype), "rows": rows}
        columns = ["tokens", "ratio", "peak_tensor_bytes", "peak_growth", "largest_tensor_bytes", "tt_matrix_bytes", "kv_bytes"]
        return finish(args, "bench-memory", result, columns)
    if args.analytic:
        if args.local_window:
            raise ValueError("--analytic does not model --local-window (its K bytes depend on the context); measure it instead.")
        args.llm, args.slm = args.llm or "qwen2-72b", args.slm or "qwen2-0.5b"
        llm, slm = load_arch(args.llm), load_arch(args.slm)
        policy = eviction(args)
        kept = costs.kept_share(policy and policy.budget, scenario.prompt + scenario.new_tokens)
        rows = costs.analytic_rows(llm, slm, args.ratios, scenario, args.bytes, args.memory_budget, kept)
        per_device = None if args.tp is None else costs.per_device_rows(llm, slm, args.ratios, scenario, args.bytes, args.tp)
        even = []
        for big, small in BREAK_EVEN_PAIRS:
            a, b = PRESETS[big], PRESETS[small]
            half = units_for_ratio(0.5, a.layers)
            row = {"llm": big, "slm": small}
            for kind in costs.SLM_CACHE_NOTES:
                row[f"break_even_ratio_{kind}"] = costs.break_even(a, b, args.bytes, kind)
                row[f"kv_ratio_at_0.5_{kind}"] = costs.kv_bytes_per_token(
                    a, b, half, args.bytes, kind
                ) / costs.kv_bytes_per_token(a, b, 0, args.bytes)
            even.append(row)
        columns = ["slm_cache", "ratio", "mapped_layers", "kv_bytes", "kv_ratio", "ttft_limit", "tpot_limit"]
        if args.memory_budget:
            columns += ["max_batch", "batch_ratio", "throughput_ratio"]
        result = {
            "mode": "analytic",
            "slm_caches": costs.SLM_CACHE_NOTES,
            **meta,
            "bytes_per_element": args.bytes,
            "eviction": None if policy is None else repr(policy),
            "kept_share": kept,
            "memory_budget_gb": args.memory_budget,
            "rows": rows,
            "break_even": even,
        }
        if per_device is not None:
            result.update(tp=args.tp, per_device=per_device)
            if not args.json:
                print(f"per device, tensor parallel over {args.tp}:\n" + markdown_table(per_device, list(per_device[0])))
        return finish(args, "bench-analytic", result, columns)
    args.llm, args.slm = args.llm or "qwen2.5-coder-1.5b", args.slm or "qwen2.5-coder-0.5b"
    base = mapping_config(args, 0.0)
    check_mapped([scenario.prompt], [replace(base, ratio=r) for r in args.ratios], "a --prompt")
    llm, slm, _ = load(args, [replace(base, ratio=r) for r in args.ratios])
    warn_allocator(llm.device)
    rows = measure.measure(llm, slm, args.ratios, scenario, args.repeats, base, eviction=eviction(args))
    environment = timing_environment()
    result = {"mode": "measured", **meta, "repeats": args.repeats, "device": str(llm.device), **environment, "rows": rows}
    return finish(
        args,
        f"bench-{args.scenario}",
        result,
        [
            "ratio",
            "kv_bytes",
            "kv_ratio",
            "ttft_s",
            "tpot_s",
            "throughput_tok_s",
            "peak_mem_bytes",
            "ttft_speedup",
            "tpot_speedup",
            "ttft_vs_budget",
            "tpot_vs_budget",
        ],
    )


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
        "--memory-scaling",
        action="store_true",
        help="exact live-tensor peak of prefill + decode at each --tokens length (default 1024,2048,4096,8192)",
    )
    p.add_argument(
        "--tokens",
        type=count_list,
        default=None,
        help="projection and memory scaling: context lengths, e.g. 512,8192",
    )
    p.add_argument("--scenario", default="concurrency", choices=sorted(costs.SCENARIOS))
    p.add_argument("--full-size", action="store_true", help="the paper's sizes instead of the CPU-sized defaults")
    p.add_argument("--prompt", type=positive_int, default=None, help="prompt tokens (overrides the scenario)")
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--new-tokens", type=positive_int, default=None)
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument(
        "--decode-repeats", type=positive_int, default=20, help="projection: rounds of the decode-step timings (short and noisy)"
    )
    p.add_argument("--bytes", type=positive_int, default=2, help="bytes per cached element (analytic; 2 = fp16/bf16)")
    p.add_argument("--memory-budget", type=positive_float, default=None, metavar="GB", help="analytic: memory for weights + KV")
    add_eviction_args(p)
    p.set_defaults(func=cmd_bench)
