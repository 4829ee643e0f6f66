"""``iam generate`` and ``iam demo``: text from IAM, and the shipped pair side by side with the LLM alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TextStreamer

from ..core.model import IAMForCausalLM
from ..eval import demo, retrieval
from ..eval.demo import prompt_batch, run_generation
from ..io import write_atomic
from .common import (
    add_eviction_args,
    add_head_mapping_arg,
    add_mapping_args,
    add_pair_args,
    add_placement_args,
    eviction,
    load,
    mapping_config,
    positive_int,
    ratio_list,
    setups_of,
)

DEMO_RETRIEVAL = "llm,snapkv@0.7,streaming@0.7,iam0.5+w64"
"""``iam demo``'s cached-document example: the LLM alone, score-based and positional eviction, and IAM with its exact
window, at similar shares of the LLM's KV dropped."""


# ---- iam generate ----------------------------------------------------------------------------------------------------
def generate_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_placement_args(p)
    add_mapping_args(p)
    add_head_mapping_arg(p)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (Instruct models)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.2, the paper's setting")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_eviction_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON result")


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """``generate()`` arguments from ``iam generate``'s flags."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    sampling = {"repetition_penalty": args.repetition_penalty, "do_sample": args.do_sample, "temperature": args.temperature}
    sampling |= {"top_p": args.top_p, "top_k": args.top_k}
    kwargs |= {name: value for name, value in sampling.items() if value is not None}
    if args.stop:
        kwargs.update(stop_strings=args.stop, tokenizer=tokenizer)
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    config, policy = mapping_config(args, args.ratio), eviction(args)
    llm, slm, tok = load(args, [config])
    iam = IAMForCausalLM(llm, slm, config, policy)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    batch = prompt_batch(tok, [args.prompt], args.chat)
    result = run_generation(iam, tok, batch, generation_kwargs(args, tok), streamer)
    result["text"] = result.pop("texts")[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if not args.stream:
            print(result["text"])
        print(f"\nmapped layers: {result['mapped_layers']}")
        kv = result["kv_cache_bytes"]
        print(f"KV bytes: LLM {kv['llm']:,} + SLM {kv['slm']:,} = {kv['total']:,} (LLM alone: {kv['baseline']:,})")
        t = result["timings"]
        print(f"TTFT {t['ttft_s']:.3f} s, TPOT {t['tpot_s']:.3f} s")
    return 0


# ---- iam demo --------------------------------------------------------------------------------------------------------
def demo_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--retrieval",
        default=DEMO_RETRIEVAL,
        help="configurations for the cached-document example (as iam eval retrieval --configs; '' skips it)",
    )
    p.add_argument("--retrieval-tokens", type=positive_int, default=1024, help="the cached document's length")


def cmd_demo(args: argparse.Namespace) -> int:
    configs = [mapping_config(args, r) for r in args.ratios]
    base, setups, cached_configs = setups_of(args, args.retrieval) if args.retrieval else (None, [], [])
    llm, slm, tok = load(args, configs + cached_configs)
    runs = []
    for config, run in zip(configs, demo.demo_runs(llm, slm, tok, configs, args.max_new_tokens)):
        runs.append(run)
        print(f"\n=== {f'IAM, ratio {config.ratio}' if config.maps else 'LLM alone'} ===")
        for prompt, text in zip(demo.PROMPTS, run["texts"]):
            print(f"\n> {prompt}\n{text.strip()}")
        kv, t = run["kv_cache_bytes"], run["timings"]
        print(f"\nmapped layers: {run['mapped_layers']}")
        if run["mapping_summary"]:
            print(f"mean matched similarity: {run['mapping_summary']['mean_similarity']:.3f}")
        print(
            f"KV bytes: LLM {kv['llm']:,} + SLM {kv['slm']:,} = {kv['total']:,} ({kv['total'] / kv['baseline']:.1%} of LLM alone)"
        )
        print(f"TTFT {t['ttft_s']:.2f} s, TPOT {t['tpot_s']:.3f} s", flush=True)
    cached = []
    if setups:
        print(
            f"\n=== A {args.retrieval_tokens}-token document cached (and compressed) first, then four questions about it ===",
            flush=True,
        )
        cached = retrieval.demo(llm, slm, tok, base, setups, args.retrieval_tokens)
        for run in cached:
            print(f"\n{run['method']}: {run['correct']}/4 right, {run['llm_kv_dropped']:.0%} of the LLM's KV dropped")
            for got, want in zip(run["answers"], run["expected"]):
                print(f"  {'ok  ' if want in got else 'MISS'} expected {want}, answered {got!r}")
    if args.json:
        result = {"llm": args.llm, "slm": args.slm, "provenance": args.provenance, "prompts": demo.PROMPTS, "runs": runs}
        result["retrieval"] = cached
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2))
        print(f"\nwrote {path}")
    return 0
