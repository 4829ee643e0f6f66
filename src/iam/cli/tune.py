"""``iam tune``: the SLM tuned through the mapped LLM's loss (paper Appendix A)."""

from __future__ import annotations

import argparse

from .common import add_mapping_args, add_pair_args, from_flags, load, mapping_config, positive_int


def tune_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    p.add_argument("--ratio", type=float, default=0.5, help="mapping ratio to tune at")
    p.add_argument(
        "--data",
        type=lambda t: [x for x in t.split(",") if x],
        default=["chatterbot"],
        help="comma-separated sources: an Alpaca JSON/JSONL file, chatterbot, alpaca (online) for --objective instruct; "
        "python-stdlib-train, another --dataset name or a text file for --objective lm",
    )
    p.add_argument("--objective", choices=["instruct", "lm"], default="instruct", help="loss on the response, or on every token")
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="peft LoRA on the SLM's q/k, or every weight")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--grad-accum", type=positive_int, default=4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time, model written")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 full, 2e-4 lora)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--lora-rank", type=positive_int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=positive_int, default=25, help="optimizer steps between checkpoints")
    p.add_argument(
        "--eval-examples", type=int, default=4, help="examples held out; their mapped loss is measured at every checkpoint"
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the LLM's unmapped layers in backward")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most this many examples")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--out", required=True, help="the run's folder: checkpoints/, slm/ (the tuned model), tune.json/.md/.png")


def cmd_tune(args: argparse.Namespace) -> int:
    from .. import tuning

    mapping = mapping_config(args, args.ratio)
    config = from_flags(tuning.TuneConfig, args, mapping=mapping)
    examples = tuning.tuning_data(args.llm, args.slm, mapping, args.data, args.objective, args.seq_len, args.limit, args.force)
    llm, slm, tok = load(args, [mapping])
    result = tuning.tune_slm(llm, slm, tok, examples, args.out, args.llm, config, resume=args.resume, provenance=args.provenance)
    last = result["rows"][-1] if result["rows"] else {}
    print(
        f"tuned {result['steps']} steps ({result['train_seconds'] / 60:.1f} min, peak RSS {result['peak_rss_gib']:.1f} GiB), "
        f"last loss {last.get('loss', float('nan')):.4f}\nwrote {result['model']} (use it with --slm) and {args.out}/tune.json"
    )
    return 0
