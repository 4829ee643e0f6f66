"""``iam similarity`` and ``iam calibrate``: how alike the pair's heads are, and the order in which to map the LLM's
layers, measured and stored for ``--strategy auto``."""

from __future__ import annotations

import argparse

import torch

from ..core.config import check_mapped
from ..eval import analysis, calibrate, data, retrieval
from ..reporting import heatmap_plot
from .common import (
    add_granularity_arg,
    add_mapping_args,
    add_output_args,
    add_pair_args,
    add_text_args,
    at_ratios,
    eval_windows,
    finish,
    load,
    mapping_config,
)


def similarity_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    add_text_args(p, windows=2, tokens=256)
    add_output_args(p)


def cmd_similarity(args: argparse.Namespace) -> int:
    config = mapping_config(args, 0.0)
    check_mapped([args.tokens], at_ratios(config, [1.0]), "a --tokens window")  # a mapping's window
    names = [args.text] if args.text else args.dataset.split(",")
    models = analysis.load_for_similarity(args.llm, args.slm, config, getattr(torch, args.dtype), args.device, args.force)
    texts = [data.load_text(name) for name in names]
    result = analysis.eval_pair_similarity(*models, texts, args.windows, args.tokens, config)
    plot = heatmap_plot(result["heatmap"], f"mean best {result['metric']} similarity")
    return finish(args, "similarity", result, ["llm_layer", "mean_best_similarity", "best_slm_layer"], plot)


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    add_text_args(p, windows=3, tokens=256)
    p.set_defaults(dataset="lee-news")
    add_output_args(p)
    p.add_argument("--to", default=None, metavar="FOLDER", help="where to write the order (default: $IAM_CACHE/calibration)")
    p.add_argument(
        "--method",
        choices=list(calibrate.COLUMNS),
        default="single",
        help="single: each layer mapped alone, sorted by perplexity cost; greedy: grow the mapped set by the layer "
        "that adds least KL to the LLM alone; retrieval: the KV groups that read the asked fact least first, on "
        "--windows multikey contexts of --tokens tokens (KV groups always)",
    )
    add_granularity_arg(p)
    p.add_argument("--steps", type=int, default=None, help="greedy: units chosen greedily (default: half of them)")
    p.add_argument("--shortlist", type=int, default=4, help="greedy: candidates re-measured per step after the first")


def cmd_calibrate(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    check_mapped([args.tokens], at_ratios(base, [1.0]), "a --tokens window")
    llm, slm, tok = load(args, [base])
    source = {"method": args.method, "granularity": args.granularity, "windows": args.windows, "tokens": args.tokens}
    source.update(llm=args.llm, slm=args.slm, dataset=args.text or args.dataset)
    if args.method == "retrieval":
        samples = retrieval.make_samples(tok, "multikey", args.windows, args.tokens, calibrate.RETRIEVAL_SEED)
        source.update(task="multikey", filler="prose", seed=calibrate.RETRIEVAL_SEED, granularity="kv-group")
        source.pop("dataset")  # the contexts are the task's, not --dataset's
        result = calibrate.calibrate_retrieval(llm, slm, tok, samples, base, source, args.to)
        return finish(args, "calibrate", result, calibrate.COLUMNS[args.method])
    windows, per_group = eval_windows(args, tok), args.granularity == "kv-group"
    result = calibrate.calibrate(llm, slm, windows, base, args.method, per_group, args.steps, args.shortlist, source, args.to)
    return finish(args, "calibrate", result, calibrate.COLUMNS[args.method])
