"""``iam eval ...``: a table of evaluations, each declaring its flags and running one library function."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import MappingConfig, check_mapped
from ..core.eviction import POLICIES
from ..core.similarity import METRICS
from ..eval import analysis, data, generation, retrieval, sweep, tradeoff
from ..eval.perplexity import eval_metrics, eval_perplexity
from ..eval.tasks import TASKS
from ..models.loading import load_tokenizer, read_configs
from ..reporting import (
    attention_maps_plot,
    depth_plot,
    retrieval_plot,
    save_figure,
    sweep_plot,
    task_sweep_plot,
    tradeoff_plot,
    usage_plot,
)
from .common import (
    add_eviction_args,
    add_granularity_arg,
    add_mapping_args,
    add_output_args,
    add_pair_args,
    add_placement_args,
    add_text_args,
    at_ratios,
    count_list,
    eval_windows,
    eviction,
    finish,
    load,
    mapping_config,
    name_list,
    named_windows,
    positive_int,
    ratio_list,
    setups_of,
)

RETRIEVAL_CONFIGS = (
    "llm,int4,kvzip@0.25,draft-kvzip@0.25,kvzip@0.25+int4,snapkv@0.5,iam0.5+w64,iam0.5+w64+int4+slm-int4,"
    "iam0.5+w64+draft-kvzip@0.5+int4+slm-int4"
)
"""``iam eval retrieval``'s default configurations."""


@dataclass(frozen=True)
class Evaluation:
    """One ``iam eval`` subcommand: its help, its own flags (beside the pair, placement, mapping and output flags
    every evaluation takes) and its handler."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def check_windows(tokens: int, base: MappingConfig, ratios: Sequence[float], scored: bool = True) -> None:
    """Before loading: windows of ``tokens`` tokens that cannot be scored (``scored``: perplexity needs two), or on
    which IAM would map nothing at ``ratios`` (rows labelled IAM would be the LLM alone)."""
    if scored and tokens < 2:
        raise ValueError(f"--tokens {tokens}: a window needs at least 2 tokens to score one.")
    check_mapped([tokens], at_ratios(base, ratios), "a --tokens window")


def mapped_base(args: argparse.Namespace, command: str) -> MappingConfig:
    """The mapping of an evaluation that measures mapped layers; ``--ratio 0`` without ``--layers`` is refused."""
    base = mapping_config(args, 0.0)
    if not replace(base, ratio=args.ratio).maps:
        raise ValueError(f"--ratio {args.ratio} maps nothing: iam eval {command} measures mapped layers (use --ratio > 0).")
    return base


# ---- perplexity, metrics, sweep, kv-tradeoff -------------------------------------------------------------------------
def perplexity_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=3, tokens=512)
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    add_eviction_args(p)
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="continuation protocol: prefill the first N tokens of each window, score the rest over that cache",
    )


def run_perplexity(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    if args.context is None:
        check_windows(args.tokens, base, args.ratios)
    llm, slm, tok = load(args, at_ratios(base, args.ratios))
    windows = eval_windows(args, tok)
    result = eval_perplexity(llm, slm, windows, args.ratios, base, context=args.context, eviction=eviction(args))
    result["text"] = args.text or args.dataset
    return finish(args, "perplexity", result, TASKS["perplexity"].columns)


def metrics_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=3, tokens=512)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--metrics", type=lambda t: t.split(","), default=sorted(METRICS))


def run_metrics(args: argparse.Namespace) -> int:
    base = mapped_base(args, "metrics")
    check_windows(args.tokens, base, [args.ratio])
    llm, slm, tok = load(args, at_ratios(base, [args.ratio]))
    result = eval_metrics(llm, slm, eval_windows(args, tok), args.ratio, base, args.metrics)
    return finish(args, "metrics", result, ["metric", "ratio", "ppl", "ppl_increase"])


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=3, tokens=512)
    p.add_argument("--block", type=positive_int, default=4)
    add_granularity_arg(p)
    p.add_argument(
        "--tasks",
        type=name_list(list(TASKS), distinct=True),
        default=["perplexity"],
        help="comma-separated tasks scored per block, e.g. perplexity,choice,qa,summarize; each is correlated with "
        "the first (paper Table 3)",
    )
    p.add_argument("--limit", type=positive_int, default=8, help="items per task for choice, qa and summarize")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="qa and summarize")


def run_sweep(args: argparse.Namespace) -> int:
    base, per_group = mapping_config(args, 0.0), args.granularity == "kv-group"
    check_windows(args.tokens, base, [1.0])  # every block maps
    llm, slm, tok = load(args, [base])
    if args.tasks == ["perplexity"]:
        result = sweep.eval_sweep(llm, slm, eval_windows(args, tok), args.block, base, per_group)
        plot = sweep_plot(result["rows"][1:], args.block, per_group)
        return finish(args, "sweep", result, ["block", "ppl", "ppl_increase"], plot)
    windows = eval_windows(args, tok) if "perplexity" in args.tasks else []
    scorers = sweep.sweep_scorers(tok, args.tasks, base, windows, args.limit, args.tokens, args.max_new_tokens)
    result = sweep.eval_task_sweep(llm, slm, scorers, args.block, base, per_group)
    plot = task_sweep_plot(result["rows"], args.tasks, args.block)
    return finish(args, "sweep-tasks", result, ["block", *args.tasks], plot)


def tradeoff_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=3, tokens=512)
    p.add_argument("--context", type=int, default=384, help="tokens prefilled (and evicted from) per window")
    p.add_argument("--ratios", type=ratio_list, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--policies", type=lambda t: t.split(","), default=sorted(POLICIES))
    p.add_argument("--budgets", type=ratio_list, default=[0.9, 0.75, 0.5, 0.25, 0.1], help="kept shares, policy alone")
    p.add_argument("--combined-budgets", type=ratio_list, default=[0.8], help="kept shares, with IAM")
    p.add_argument(
        "--local-windows",
        type=lambda t: [int(x) for x in t.split(",") if x.strip()],
        default=[64],
        help="exact local windows of the mapped layers to add as IAM points (see --local-window)",
    )


def run_tradeoff(args: argparse.Namespace) -> int:
    if args.local_window or args.local_sinks is not None:
        raise ValueError("iam eval kv-tradeoff takes --local-windows (a list; 4 sinks), not --local-window/--local-sinks.")
    base = mapping_config(args, 0.0)
    windows = [0, *args.local_windows]
    llm, slm, tok = load(args, [replace(base, ratio=r, local_window=w) for r in args.ratios for w in windows])
    result = tradeoff.eval_kv_tradeoff(
        llm,
        slm,
        eval_windows(args, tok),
        args.context,
        base,
        args.ratios,
        args.policies,
        args.budgets,
        args.combined_budgets,
        args.local_windows,
    )
    result["text"] = args.text or args.dataset
    columns = ["method", "ratio", "budget", "llm_kv_dropped", "total_kv_dropped", "total_kv_dropped_at_72b", "ppl_increase"]
    columns += ["prefill_flops", *tradeoff.AXES]
    return finish(args, "kv-tradeoff", result, columns, tradeoff_plot(result["rows"]))


# ---- analyses of the mapping ---------------------------------------------------------------------------------------
def consistency_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=2, tokens=64)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=positive_int, default=16)


def run_consistency(args: argparse.Namespace) -> int:
    base = mapped_base(args, "consistency")
    check_windows(args.tokens, base, [args.ratio], scored=False)
    llm, slm, tok = load(args, at_ratios(base, [args.ratio]))
    result = analysis.eval_consistency(llm, slm, tok, eval_windows(args, tok), args.ratio, args.steps, base)
    return finish(args, "consistency", result, ["llm_layer", "consistency"])


def stats_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=6, tokens=128)
    p.set_defaults(dataset="wikipedia,python-stdlib")
    p.add_argument("--ratio", type=float, default=0.5)


def run_stats(args: argparse.Namespace) -> int:
    base = mapped_base(args, "mapping-stats")
    check_windows(args.tokens, base, [args.ratio], scored=False)
    llm, slm, tok = load(args, at_ratios(base, [args.ratio]))
    result = analysis.eval_mapping_stats(llm, slm, named_windows(args, tok), args.ratio, base)
    columns = ["text", "window", "slm_layers_used", "deepest_slm_layer", "never_needed"]
    return finish(args, "mapping-stats", result, columns, usage_plot(result["usage"]))


def maps_arguments(p: argparse.ArgumentParser) -> None:
    add_text_args(p, windows=1, tokens=64)
    p.add_argument("--ratio", type=float, default=0.5)


def run_maps(args: argparse.Namespace) -> int:
    base = mapped_base(args, "attention-maps")
    check_windows(args.tokens, base, [args.ratio], scored=False)
    llm, slm, tok = load(args, at_ratios(base, [args.ratio]))
    result = analysis.eval_attention_maps(llm, slm, eval_windows(args, tok)[0], args.ratio, base)
    result["text"] = args.text or args.dataset
    columns = ["map", "matrices", "cosine_to_llm_mapped", "first_token_share", "diagonal_share"]
    return finish(args, "attention-maps", result, columns, attention_maps_plot(result["maps"]))


# ---- generation tasks and lm-eval ---------------------------------------------------------------------------------------
def qa_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--limit", type=positive_int, default=40, help="number of questions")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dataset", default="trivia", help="trivia (offline), hotpotqa or alpaca (online)")


def run_qa(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    llm, slm, tok = load(args, at_ratios(base, args.ratios))
    pairs = data.load_qa(args.dataset)[: args.limit]
    result = generation.eval_qa(llm, slm, tok, pairs, args.ratios, base, args.max_new_tokens)
    return finish(args, "qa", result, TASKS["qa"].columns)


def choice_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--limit", type=positive_int, default=40, help="number of questions")
    p.add_argument("--dataset", default=None, help="MMLU-format JSONL file, or 'mmlu' (online); default: trivia")


def run_choice(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    llm, slm, tok = load(args, at_ratios(base, args.ratios))
    items = data.load_items(args.dataset, None)
    result = generation.eval_choice(llm, slm, tok, items, args.ratios, base, limit=args.limit)
    return finish(args, "choice", result, TASKS["choice"].columns)


def summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument("--dataset", default="wikipedia", help="wikipedia (offline: article body -> lead) or govreport (online)")
    p.add_argument("--limit", type=positive_int, default=20, help="number of documents")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="the paper's 512; less for CPU runs")
    p.add_argument("--context", type=positive_int, default=1024, help="document tokens given to the model (the rest is cut)")
    p.add_argument("--min-tokens", type=positive_int, default=64, help="documents with fewer tokens are skipped (counted)")


def run_summarize(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    llm, slm, tok = load(args, at_ratios(base, args.ratios))
    docs, skipped = data.load_summaries(args.dataset)
    docs = docs[: args.limit]
    result = generation.eval_summarize(llm, slm, tok, docs, args.ratios, base, args.max_new_tokens, args.context, args.min_tokens)
    result.update(dataset=args.dataset, skipped={**skipped, **result["skipped"]})
    return finish(args, "summarize", result, TASKS["summarize"].columns)


def harness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
    p.add_argument(
        "--tasks",
        type=lambda t: [x for x in t.split(",") if x],
        default=["iam_trivia_mc", "iam_wikipedia_ppl", "iam_trivia_qa"],
        help="lm-eval task names: the local iam_trivia_mc, iam_wikipedia_ppl, iam_trivia_qa, or any lm-eval task",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all)")


def run_harness(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    llm, slm, tok = load(args, at_ratios(base, args.ratios))
    try:
        from ..eval import harness
    except ImportError as e:
        raise FileNotFoundError(f"iam eval harness needs lm-eval ({e}): pip install 'iam-llm[harness]'") from None
    result = harness.evaluate(llm, slm, tok, args.tasks, args.ratios, base, args.limit)
    return finish(args, "harness", result, ["ratio", "task", "metric", "value", "change"])


EVALUATIONS: dict[str, Evaluation] = {
    "perplexity": Evaluation("sliding-window perplexity", perplexity_arguments, run_perplexity),
    "metrics": Evaluation("perplexity under each similarity metric (paper Table 1)", metrics_arguments, run_metrics),
    "sweep": Evaluation("map each block of layers in turn (paper Fig. 2)", sweep_arguments, run_sweep),
    "consistency": Evaluation(
        "does the prefill mapping stay the best during decode (paper Fig. 3)", consistency_arguments, run_consistency
    ),
    "qa": Evaluation("generated answers scored by token F1 (chatterbot trivia by default)", qa_arguments, run_qa),
    "choice": Evaluation("multiple-choice accuracy by length-normalised log-likelihood", choice_arguments, run_choice),
    "harness": Evaluation(
        "lm-evaluation-harness tasks (local ones offline, any lm-eval task online)", harness_arguments, run_harness
    ),
    "kv-tradeoff": Evaluation(
        "continuation perplexity against KV kept: token eviction, IAM, and both", tradeoff_arguments, run_tradeoff
    ),
    "mapping-stats": Evaluation(
        "which SLM heads the mapping borrows, how concentrated, SLM layers never needed (paper Fig. 12)",
        stats_arguments,
        run_stats,
    ),
    "attention-maps": Evaluation(
        "mean attention of the SLM, the LLM and IAM's mapped layers on one context (paper Fig. 9)", maps_arguments, run_maps
    ),
    "summarize": Evaluation(
        "summaries scored by ROUGE: Wikipedia body -> lead (offline) or GovReport (online)", summarize_arguments, run_summarize
    ),
}
"""``iam eval``'s subcommands but ``retrieval`` (which takes no placement flags), in the order ``--help`` lists them."""


def add_eval_parsers(sub) -> None:
    """``iam eval``: one subcommand per entry of ``EVALUATIONS``, then ``retrieval``."""
    ev = sub.add_parser("eval", help="quality evaluations, LLM alone vs IAM side by side").add_subparsers(
        dest="eval_command", required=True
    )
    for name, evaluation in EVALUATIONS.items():
        p = ev.add_parser(name, help=evaluation.help)
        add_pair_args(p)
        add_placement_args(p)
        add_mapping_args(p)
        add_output_args(p)
        evaluation.arguments(p)
        p.set_defaults(func=evaluation.run)
    p = ev.add_parser("retrieval", help="long-context retrieval (RULER family) with the context compressed before the question")
    retrieval_arguments(p)
    p.set_defaults(func=cmd_retrieval)


# ---- long-context retrieval --------------------------------------------------------------------------------------
def retrieval_arguments(p: argparse.ArgumentParser) -> None:
    add_pair_args(p)
    add_mapping_args(p)
    add_output_args(p)
    p.add_argument(
        "--tasks",
        type=name_list(list(retrieval.TASKS)),
        default=["multikey"],
        help=f"comma-separated: {', '.join(retrieval.TASKS)}",
    )
    p.add_argument("--tokens", type=count_list, default=[1024], help="context lengths, e.g. 1024,2048,4096")
    p.add_argument("--n", type=positive_int, default=13, help="contexts per task and length (multikey asks 4 questions each)")
    p.add_argument(
        "--protocol", choices=retrieval.PROTOCOLS, default="agnostic", help="question after (agnostic) or in the prefill"
    )
    p.add_argument("--depths", choices=["even", "random"], default="even", help="needle depths: spread evenly, or at random")
    p.add_argument("--filler", choices=retrieval.FILLERS, default="prose", help="offline Wikipedia prose or Python source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configs",
        default=RETRIEVAL_CONFIGS,
        help="comma-separated configurations: llm or iam<ratio>, then +w<window>, +b<blend> (SLM heads per mapped head), "
        "+<policy>@<budget>[:unmapped] "
        "(policies: h2o, snapkv, streaming, kvzip, draft-kvzip), +int8 or +int4 (the LLM's cache), +slm-int8 or +slm-int4",
    )


def cmd_retrieval(args: argparse.Namespace) -> int:
    base, setups, configs = setups_of(args, args.configs)
    pair = read_configs(args.llm, args.slm, force=args.force)
    run = (args.tasks, args.tokens, args.n, args.seed, args.depths, args.filler)
    samples = retrieval.prepare(load_tokenizer(args.llm), *pair, setups, configs, *run)
    names = ["llm", "slm", "dtype", "seed", "protocol", "depths", "filler", "strategy", "blend", "metric"]
    names += ["establish_threshold", "truncation_threshold", "slm_cache", "calibration", "local_sinks"]
    settings = {k: vars(args)[k] for k in names}  # what an answer depends on, beside its key
    progress_path = retrieval.progress_file(args.out, settings)
    done = retrieval.read_progress(progress_path)
    llm, slm, tok = load(args, configs)
    result = retrieval.eval_retrieval(
        llm, slm, tok, base, setups, samples, args.protocol, done=done, record=retrieval.recorder(progress_path)
    )
    settings.update(tasks=args.tasks, tokens=args.tokens, n=args.n)
    result.update(settings, progress_file=str(progress_path))
    columns = ["method", "task", "tokens", "n", "accuracy", "ci_low", "ci_high", "llm_kv_dropped", "total_kv_dropped"]
    columns += ["total_kv_dropped_at_72b", "near_misses", "wrong_needle", "seconds_per_question"]
    columns += ["scoring_seconds_per_question", "on_frontier", "on_total_frontier", "on_72b_frontier"]
    save_figure(Path(args.out) / "retrieval-depth.png", depth_plot(result["rows"], result["depth_bins"]))
    return finish(args, "retrieval", result, columns, retrieval_plot(result["rows"]))
