"""The ``iam`` command line: ``generate``, ``demo``, ``eval ...``, ``similarity`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .config import MappingConfig
from .loading import load_pair
from .model import IAMModel
from .selection import STRATEGIES
from .similarity import METRICS

DEMO_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences what a hash map is.",
    "What does the SQL keyword JOIN do? Answer briefly.",
]


def layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, e.g. 20,21,22; got {text!r}") from None


def ratio_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers, e.g. 0,0.3,0.5; got {text!r}") from None


def add_pair_args(p: argparse.ArgumentParser, llm: str = "qwen2.5-coder-1.5b", slm: str = "qwen2.5-coder-0.5b") -> None:
    p.add_argument("--llm", default=llm, help="alias, .gguf file or transformers folder of the large model")
    p.add_argument("--slm", default=slm, help="alias, .gguf file or transformers folder of the small model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_mapping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="back", choices=sorted(STRATEGIES))
    p.add_argument("--metric", default="cosine", choices=sorted(METRICS))
    p.add_argument("--layers", type=layer_list, default=None, help="explicit LLM layers, e.g. 20,21,22 (overrides ratio)")
    p.add_argument("--establish-threshold", type=int, default=20)
    p.add_argument("--truncation-threshold", type=int, default=100)


def mapping_config(args: argparse.Namespace, ratio: float) -> MappingConfig:
    return MappingConfig(
        ratio=ratio,
        strategy=args.strategy,
        layers=args.layers,
        metric=args.metric,
        establish_threshold=args.establish_threshold,
        truncation_threshold=args.truncation_threshold,
    )


def load(args: argparse.Namespace):
    return load_pair(args.llm, args.slm, dtype=getattr(torch, args.dtype), device=args.device)


def chat_ids(tokenizer, prompts: Sequence[str], chat: bool = True) -> dict[str, torch.Tensor]:
    if chat and tokenizer.chat_template:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def run_generation(iam: IAMModel, tokenizer, batch: dict[str, torch.Tensor], max_new_tokens: int) -> dict:
    """Generate for one batch and report texts, mapping, KV bytes and timings."""
    out = iam.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return {
        "ratio": iam.config.ratio if iam.config.layers is None else None,
        "texts": texts,
        "mapped_layers": iam.mapped_layers,
        "mapping_summary": iam.mapping_summary(),
        "kv_cache_bytes": iam.kv_cache_bytes(),
        "timings": iam.timings,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    llm, slm, tok = load(args)
    iam = IAMModel(llm, slm, mapping_config(args, args.ratio))
    result = run_generation(iam, tok, chat_ids(tok, [args.prompt], chat=not args.raw), args.max_new_tokens)
    result["text"] = result.pop("texts")[0]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["text"])
        print(f"\nmapped layers: {result['mapped_layers']}")
        kv = result["kv_cache_bytes"]
        print(f"KV bytes: LLM {kv['llm']:,} + SLM {kv['slm']:,} = {kv['total']:,} (LLM alone: {kv['baseline']:,})")
        t = result["timings"]
        print(f"TTFT {t['ttft_s']:.3f} s, TPOT {t['tpot_s']:.3f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    llm, slm, tok = load(args)
    batch = chat_ids(tok, DEMO_PROMPTS)
    runs = []
    for ratio in args.ratios:
        print(f"\n=== {'LLM alone' if ratio == 0 else f'IAM, ratio {ratio}'} ===", flush=True)
        run = run_generation(IAMModel(llm, slm, mapping_config(args, ratio)), tok, batch, args.max_new_tokens)
        runs.append(run)
        for prompt, text in zip(DEMO_PROMPTS, run["texts"]):
            print(f"\n> {prompt}\n{text.strip()}")
        kv, t = run["kv_cache_bytes"], run["timings"]
        print(f"\nmapped layers: {run['mapped_layers']}")
        if run["mapping_summary"]:
            print(f"mean matched similarity: {run['mapping_summary']['mean_similarity']:.3f}")
        print(f"KV bytes: LLM {kv['llm']:,} + SLM {kv['slm']:,} = {kv['total']:,} "
              f"({kv['total'] / kv['baseline']:.1%} of LLM alone)")
        print(f"TTFT {t['ttft_s']:.2f} s, TPOT {t['tpot_s']:.3f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"llm": args.llm, "slm": args.slm, "prompts": DEMO_PROMPTS, "runs": runs}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text with IAM")
    add_pair_args(p)
    add_mapping_args(p)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print a JSON result")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the shipped pair: LLM alone vs IAM side by side")
    add_pair_args(p)
    add_mapping_args(p)
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"iam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
