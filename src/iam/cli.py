"""The ``iam`` command line: ``generate``, ``demo``, ``eval ...``, ``similarity``, ``calibrate``, ``bench`` and ``tune``. Each
command parses, checks its mapping configs against the pair's configs, loads, and hands over to the library.

Exit codes: 0 done; 2 a user error (``USER_ERRORS``: one line ``iam: error: ...``, as argparse's own errors exit);
130 interrupted (Ctrl-C or SIGTERM while a model is being converted); 1 an internal error (its traceback, then a
one-line request to report it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TextStreamer

from .bench import costs, measure, projection
from .bench.timing import GenerationTimer, allocator_note, timing_environment
from .core.config import MappingConfig, check_mapped
from .core.eviction import POLICIES, SCOPES, EvictionPolicy, make_policy, parse_budget
from .core.model import IAMForCausalLM, check_eviction, check_family, check_pair_configs, check_scope
from .core.resolution import resolve
from .core.selection import STRATEGIES, Unit, parse_unit, units_for_ratio
from .core.similarity import METRICS
from .eval import analysis, calibrate, data, generation, retrieval, sweep, tradeoff
from .eval.perplexity import eval_metrics, eval_perplexity
from .eval.tasks import TASKS
from .eval.windows import text_windows, window_texts
from .io import write_atomic
from .models.loading import check_device, load_model, load_pair, load_tokenizer, read_configs
from .models.placement import Placement
from .models.presets import PRESETS, load_arch
from .reporting import (
    attention_maps_plot,
    depth_plot,
    heatmap_plot,
    markdown_table,
    provenance,
    retrieval_plot,
    save_figure,
    sweep_plot,
    task_sweep_plot,
    tradeoff_plot,
    usage_plot,
    write_report,
)

# What a user can act on: the library raises ValueError for every bad input or setting, FileNotFoundError for a
# missing file, package or model. Anything else escaping a command is a bug in iam-llm.
USER_ERRORS = (ValueError, FileNotFoundError)

DEMO_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences what a hash map is.",
    "What does the SQL keyword JOIN do? Answer briefly.",
]


def layer_list(text: str) -> list[Unit]:
    try:
        return [parse_unit(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated layers or layer:kv_group units, e.g. 20,21,22:1; got {text!r}"
        ) from None


def task_list(text: str) -> list[str]:
    tasks = [x.strip() for x in text.split(",") if x.strip()]
    if not tasks or set(tasks) - set(TASKS) or len(set(tasks)) < len(tasks):
        raise argparse.ArgumentTypeError(f"--tasks takes distinct comma-separated tasks of {','.join(TASKS)}; got {text!r}")
    return tasks


def retrieval_tasks(text: str) -> list[str]:
    tasks = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not tasks or set(tasks) - set(retrieval.TASKS):
        raise argparse.ArgumentTypeError(f"--tasks takes comma-separated tasks of {','.join(retrieval.TASKS)}; got {text!r}")
    return tasks


RETRIEVAL_CONFIGS = (
    "llm,streaming@0.7,snapkv@0.7,h2o@0.7,streaming@0.5,snapkv@0.5,h2o@0.5,iam0.5+w64,iam1.0+w64,"
    "iam0.5+w64+streaming@0.5:unmapped"
)
"""``iam eval retrieval``'s default configurations."""

DEMO_RETRIEVAL = "llm,snapkv@0.7,streaming@0.7,iam0.5+w64"
"""``iam demo``'s cached-document example: the LLM alone, score-based and positional eviction, and IAM with its exact
window, at similar shares of the LLM's KV dropped."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1; got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"takes a number above 0; got {text!r}")
    return value


def count_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated whole numbers of at least 1, e.g. 512,8192; got {text!r}")
    return values


def ratio_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers, e.g. 0,0.3,0.5; got {text!r}")
    return values


def add_pair_args(
    p: argparse.ArgumentParser, llm: str | None = "qwen2.5-coder-1.5b", slm: str | None = "qwen2.5-coder-0.5b"
) -> None:
    p.add_argument("--llm", default=llm, help="alias, .gguf file or transformers folder of the large model")
    p.add_argument("--slm", default=slm, help="alias, .gguf file or transformers folder of the small model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="pair an SLM tuned through another LLM (iam tune) anyway")


def add_eviction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eviction", default=None, choices=sorted(POLICIES), help="token eviction policy (with IAM or alone)")
    p.add_argument(
        "--budget", type=parse_budget, default=None, help="tokens kept per sequence: a fraction (0.8) or a count (256)"
    )
    p.add_argument(
        "--eviction-scope",
        default="all",
        choices=SCOPES,
        help="evict from every layer of both models, or only from the LLM's layers that keep K and V (unmapped)",
    )


def eviction(args: argparse.Namespace) -> EvictionPolicy | None:
    return make_policy(getattr(args, "eviction", None), getattr(args, "budget", None), getattr(args, "eviction_scope", "all"))


def memory_map(text: str) -> dict:
    """``--max-memory``: ``0=70GiB,1=70GiB,cpu=200GiB`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}``."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        device, _, size = part.partition("=")
        if not device or not size:
            raise argparse.ArgumentTypeError(f"--max-memory takes device=size pairs, e.g. 0=70GiB,cpu=200GiB; got {text!r}")
        out[int(device) if device.isdigit() else device] = size
    return out


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Spreading the LLM over devices (``iam.models.placement``); ``--device`` is then unused."""
    p.add_argument(
        "--tp",
        nargs="?",
        const=0,
        type=positive_int,
        default=None,
        metavar="N",
        help="tensor parallelism over the torchrun processes (torchrun --nproc-per-node N -m iam ... --tp); "
        "bench --analytic --tp N: the memory per device",
    )
    p.add_argument(
        "--device-map", default=None, help="accelerate dispatch of the LLM: auto, balanced, sequential, or a JSON file of one"
    )
    p.add_argument("--max-memory", type=memory_map, default=None, help="with --device-map: e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights placed on 'disk' go")


def placement(args: argparse.Namespace) -> Placement:
    """The ``Placement`` the command line asks for (all ``None`` where it has no placement flags)."""
    device_map, tp = getattr(args, "device_map", None), getattr(args, "tp", None)
    if tp and tp != int(os.environ.get("WORLD_SIZE", "1")):
        raise ValueError(f"--tp {tp} differs from the {os.environ.get('WORLD_SIZE', 1)} processes torchrun started.")
    if device_map is not None and device_map.endswith(".json"):
        device_map = json.loads(Path(device_map).read_text())
    return Placement(
        tp_plan=None if tp is None else "auto",
        device_map=device_map,
        max_memory=getattr(args, "max_memory", None),
        offload_folder=getattr(args, "offload_folder", None),
    )


def secondary_rank() -> bool:
    """Whether this is a torchrun process other than rank 0 (which alone prints and writes reports)."""
    return int(os.environ.get("RANK", "0")) != 0


def add_mapping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="auto", choices=sorted(STRATEGIES))
    p.add_argument("--metric", default="cosine", choices=sorted(METRICS))
    p.add_argument(
        "--blend",
        type=int,
        default=None,
        help="SLM heads mixed per mapped LLM head (1: the paper's best match; default: the value stored with the pair's "
        "calibration under --strategy auto/calibrated, else 1)",
    )
    p.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        help="explicit LLM layers, or layer:kv_group for one KV group of a layer, e.g. 20,21,22:1 (overrides ratio)",
    )
    p.add_argument("--establish-threshold", type=int, default=20)
    p.add_argument("--truncation-threshold", type=int, default=100)
    p.add_argument("--slm-cache", default="native", choices=["native", "int8"], help="SLM cache precision")
    p.add_argument(
        "--llm-cache", default="native", choices=["native", "int8"], help="LLM cache precision (K and V, or V where mapped)"
    )
    p.add_argument(
        "--calibration", default=None, metavar="FILE", help="order for --strategy auto/calibrated, instead of the stored one"
    )
    p.add_argument(
        "--local-window",
        type=int,
        default=0,
        help="mapped heads attend exactly to the sinks and this many latest tokens; the SLM row covers older ones (0: off)",
    )
    p.add_argument("--local-sinks", type=int, default=None, help="first tokens attended exactly with --local-window (4)")


def mapping_config(args: argparse.Namespace, ratio: float) -> MappingConfig:
    return MappingConfig(
        ratio=ratio,
        strategy=args.strategy,
        layers=args.layers,
        metric=args.metric,
        blend=args.blend,
        establish_threshold=args.establish_threshold,
        truncation_threshold=args.truncation_threshold,
        slm_cache=args.slm_cache,
        llm_cache=args.llm_cache,
        calibration=args.calibration,
        local_window=args.local_window,
        local_sinks=args.local_sinks,
    )


def load(args: argparse.Namespace, configs: Sequence[MappingConfig] = ()):
    """Check the device, ``configs`` with the eviction flags, and ``configs`` against the pair's configs (no weights
    loaded yet), then load ``(llm, slm, tokenizer)``."""
    check_device(args.device)
    policy = eviction(args)
    for config in configs:
        check_eviction(config, policy)
    llm_config, slm_config = read_configs(args.llm, args.slm, force=args.force)
    check_pair_configs(llm_config, slm_config)
    placed = placement(args)
    placed.check(llm_config)
    for config in configs:
        check_scope(resolve(config, llm_config, slm_config), llm_config, policy)
    dtype = getattr(torch, args.dtype)
    return load_pair(args.llm, args.slm, dtype=dtype, device=args.device, force=args.force, placement=placed)


def prompt_batch(tokenizer, prompts: Sequence[str], chat: bool) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``prompts``, each wrapped in the tokenizer's chat template with ``chat``."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none.")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """``generate()`` arguments from the command line."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    for name in ("repetition_penalty", "do_sample", "temperature", "top_p", "top_k"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "stop", None):
        kwargs.update(stop_strings=args.stop, tokenizer=tokenizer)
    return kwargs


def run_generation(iam: IAMForCausalLM, tokenizer, batch: dict[str, torch.Tensor], kwargs: dict, streamer=None) -> dict:
    """Generate for one batch with ``generate(**kwargs)``; report texts, mapping, KV bytes and timings, read off the
    call's cache."""
    timer = GenerationTimer(iam.device, then=streamer)
    out = iam.generate(**batch, streamer=timer.start(), return_dict_in_generate=True, **kwargs)
    texts = tokenizer.batch_decode(out.sequences[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    mapping = out.cache.mapping
    return {
        "ratio": iam.mapping_config.ratio if iam.mapping_config.layers is None else None,
        "texts": texts,
        "mapped_layers": mapping.units if mapping else [],
        "mapping_summary": mapping.summary() if mapping else None,
        "kv_cache_bytes": out.cache.kv_bytes(),
        "timings": timer.timings,
    }


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


def cmd_demo(args: argparse.Namespace) -> int:
    configs = [mapping_config(args, r) for r in args.ratios]
    base = mapping_config(args, 0.0)
    setups = retrieval.parse_setups(args.retrieval) if args.retrieval else []
    for setup in setups:
        check_eviction(retrieval.configured(base, setup), make_policy(setup.policy, setup.budget, setup.scope))
    llm, slm, tok = load(args, configs + [retrieval.configured(base, s) for s in setups])
    batch = prompt_batch(tok, DEMO_PROMPTS, chat=True)
    kwargs = {"do_sample": False, "pad_token_id": tok.pad_token_id}
    # The first pass pages the weights in from disk (seconds per GB); keep that out of the timings below.
    run_generation(IAMForCausalLM(llm, slm, configs[-1]), tok, batch, {**kwargs, "max_new_tokens": 2})
    runs = []
    for ratio, config in zip(args.ratios, configs):
        print(f"\n=== {'LLM alone' if ratio == 0 else f'IAM, ratio {ratio}'} ===", flush=True)
        run = run_generation(IAMForCausalLM(llm, slm, config), tok, batch, {**kwargs, "max_new_tokens": args.max_new_tokens})
        runs.append(run)
        for prompt, text in zip(DEMO_PROMPTS, run["texts"]):
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
        result = {"llm": args.llm, "slm": args.slm, "provenance": args.provenance, "prompts": DEMO_PROMPTS, "runs": runs}
        result["retrieval"] = cached
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2))
        print(f"\nwrote {path}")
    return 0


def finish(args: argparse.Namespace, name: str, result: dict, columns: list[str], plot=None) -> int:
    result.update(command=name, llm=args.llm, slm=args.slm, provenance=args.provenance)
    if secondary_rank():
        return 0
    paths = write_report(args.out, name, result, columns, plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(open(paths["markdown"]).read())
        print("wrote " + ", ".join(paths.values()))
    return 0


def named_windows(args: argparse.Namespace, tok, cut=text_windows) -> list[tuple[str, torch.Tensor]]:
    """``--windows`` windows of ``--tokens`` tokens from each of the comma-separated ``--dataset`` names (or from
    ``--text``), each with its text's name; ``cut`` makes them (token ids, or with ``window_texts`` the text)."""
    names = [args.text] if args.text else args.dataset.split(",")
    return [(name, w) for name in names for w in cut(tok, data.load_text(name), args.windows, args.tokens)]


def eval_windows(args: argparse.Namespace, tok) -> list[torch.Tensor]:
    """The windows of ``named_windows``, without names."""
    return [w for _, w in named_windows(args, tok)]


def check_eval_inputs(args: argparse.Namespace, base: MappingConfig) -> None:
    """Before loading: refuse a ratio that maps nothing where an evaluation measures the mapped layers, and windows
    that cannot be scored or, where IAM maps, stay below establish_threshold (rows labelled IAM would be the LLM
    alone)."""
    kind = args.eval_command
    if kind in ("metrics", "consistency", "mapping-stats", "attention-maps") and not (args.ratio > 0 or base.layers):
        raise ValueError(f"--ratio {args.ratio} maps nothing: iam eval {kind} measures mapped layers (use --ratio > 0).")
    if not hasattr(args, "tokens") or kind == "kv-tradeoff" or getattr(args, "context", None) is not None:
        return
    if kind in ("perplexity", "metrics", "sweep") and args.tokens < 2:
        raise ValueError(f"--tokens {args.tokens}: a window needs at least 2 tokens to score one.")
    ratios = [1.0] if kind == "sweep" else getattr(args, "ratios", None) or [args.ratio]
    check_mapped([args.tokens], [replace(base, ratio=r) for r in ratios], "a --tokens window")


def cmd_eval(args: argparse.Namespace) -> int:
    kind = args.eval_command
    if kind == "kv-tradeoff" and (args.local_window or args.local_sinks is not None):
        raise ValueError("iam eval kv-tradeoff takes --local-windows (a list; 4 sinks), not --local-window/--local-sinks.")
    base = mapping_config(args, 0.0)
    check_eval_inputs(args, base)
    ratios = getattr(args, "ratios", None) or [getattr(args, "ratio", 0.0)]
    windows = [0, *getattr(args, "local_windows", ())]
    llm, slm, tok = load(args, [replace(base, ratio=r, local_window=w) for r in ratios for w in windows])
    if kind == "perplexity":
        windows = eval_windows(args, tok)
        result = eval_perplexity(llm, slm, windows, args.ratios, base, context=args.context, eviction=eviction(args))
        result["text"] = args.text or args.dataset
        columns = ["ratio", "strategy", "metric", "blend", "ppl", "ppl_increase", "mapped_layers"]
        return finish(args, "perplexity", result, columns)
    if kind == "metrics":
        result = eval_metrics(llm, slm, eval_windows(args, tok), args.ratio, base, args.metrics)
        return finish(args, "metrics", result, ["metric", "ratio", "ppl", "ppl_increase"])
    if kind == "sweep":
        per_group = args.granularity == "kv-group"
        if args.tasks != ["perplexity"]:
            windows = eval_windows(args, tok) if "perplexity" in args.tasks else []
            tasks = sweep.sweep_scorers(tok, args.tasks, base, windows, args.limit, args.tokens, args.max_new_tokens)
            result = sweep.eval_task_sweep(llm, slm, tasks, args.block, base, per_group)
            plot = task_sweep_plot(result["rows"], args.tasks, args.block)
            return finish(args, "sweep-tasks", result, ["block", *args.tasks], plot)
        result = sweep.eval_sweep(llm, slm, eval_windows(args, tok), args.block, base, per_group)
        plot = sweep_plot(result["rows"][1:], args.block, per_group)
        return finish(args, "sweep", result, ["block", "ppl", "ppl_increase"], plot)
    if kind == "mapping-stats":
        result = analysis.eval_mapping_stats(llm, slm, named_windows(args, tok), args.ratio, base)
        columns = ["text", "window", "slm_layers_used", "deepest_slm_layer", "never_needed"]
        return finish(args, "mapping-stats", result, columns, usage_plot(result["usage"]))
    if kind == "attention-maps":
        result = analysis.eval_attention_maps(llm, slm, eval_windows(args, tok)[0], args.ratio, base)
        result["text"] = args.text or args.dataset
        columns = ["map", "matrices", "cosine_to_llm_mapped", "first_token_share", "diagonal_share"]
        return finish(args, "attention-maps", result, columns, attention_maps_plot(result["maps"]))
    if kind == "summarize":
        docs, skipped = data.load_summaries(args.dataset)
        docs = docs[: args.limit]
        result = generation.eval_summarize(
            llm, slm, tok, docs, args.ratios, base, args.max_new_tokens, args.context, args.min_tokens
        )
        result.update(dataset=args.dataset, skipped={**skipped, **result["skipped"]})
        return finish(args, "summarize", result, ["ratio", "strategy", "rouge1", "rouge2", "rougeL", "n"])
    if kind == "consistency":
        result = analysis.eval_consistency(llm, slm, tok, eval_windows(args, tok), args.ratio, args.steps, base)
        return finish(args, "consistency", result, ["llm_layer", "consistency"])
    if kind == "qa":
        pairs = data.load_qa(args.dataset)[: args.limit]
        result = generation.eval_qa(llm, slm, tok, pairs, args.ratios, base, args.max_new_tokens)
        return finish(args, "qa", result, ["ratio", "strategy", "f1", "exact_match", "n"])
    if kind == "kv-tradeoff":
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
        columns = ["method", "ratio", "budget", "llm_kv_dropped", "total_kv", "ppl_increase", "prefill_flops", "on_frontier"]
        return finish(args, "kv-tradeoff", result, columns, tradeoff_plot(result["rows"]))
    if kind == "harness":
        try:
            from .eval import harness
        except ImportError as e:
            raise FileNotFoundError(f"iam eval harness needs lm-eval ({e}): pip install 'iam-llm[harness]'") from None

        result = harness.evaluate(llm, slm, tok, args.tasks, args.ratios, base, args.limit)
        return finish(args, "harness", result, ["ratio", "task", "metric", "value", "change"])
    items = data.load_items(args.dataset, None)
    result = generation.eval_choice(llm, slm, tok, items, args.ratios, base, limit=args.limit)
    return finish(args, "choice", result, ["ratio", "strategy", "accuracy", "n"])


def cmd_retrieval(args: argparse.Namespace) -> int:
    setups = retrieval.parse_setups(args.configs)
    base = mapping_config(args, 0.0)
    configs = [retrieval.configured(base, s) for s in setups]
    for setup, config in zip(setups, configs):
        check_eviction(config, make_policy(setup.policy, setup.budget, setup.scope))
    llm_config, slm_config = read_configs(args.llm, args.slm, force=args.force)
    for setup, config in zip(setups, configs):
        policy = make_policy(setup.policy, setup.budget, setup.scope)
        check_scope(resolve(config, llm_config, slm_config), llm_config, policy)
    limit = min(llm_config.max_position_embeddings, slm_config.max_position_embeddings)
    retrieval.check_lengths(args.tokens, max(retrieval.TASKS[t].max_new_tokens for t in args.tasks), limit)
    names = ["llm", "slm", "dtype", "tasks", "tokens", "n", "seed", "protocol", "depths", "filler", "strategy", "blend"]
    names += ["metric", "layers", "establish_threshold", "truncation_threshold", "slm_cache", "calibration", "local_sinks"]
    settings = {k: getattr(args, k) for k in names}
    progress_path = retrieval.progress_file(args.out, settings)
    llm, slm, tok = load(args, configs)
    result = retrieval.eval_retrieval(
        llm,
        slm,
        tok,
        base,
        setups,
        args.tasks,
        args.tokens,
        args.n,
        args.protocol,
        args.seed,
        args.depths,
        args.filler,
        done=retrieval.read_progress(progress_path),
        record=retrieval.recorder(progress_path),
    )
    result.update(settings, progress_file=str(progress_path))
    columns = ["method", "task", "tokens", "n", "accuracy", "ci_low", "ci_high", "llm_kv_dropped", "total_kv"]
    columns += ["near_misses", "wrong_needle", "seconds_per_question", "on_frontier"]
    save_figure(Path(args.out) / "retrieval-depth.png", depth_plot(result["rows"], result["depth_bins"]))
    return finish(args, "retrieval", result, columns, retrieval_plot(result["rows"]))


def load_each(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Load ``--llm`` and ``--slm`` each on its own, of any supported families and tokenizers (for analysis only)."""
    check_device(args.device)
    for role, config in zip(("LLM", "SLM"), read_configs(args.llm, args.slm)):
        check_family(role, config)
    dtype = getattr(torch, args.dtype)
    return load_model(args.llm, dtype, args.device)[0], load_model(args.slm, dtype, args.device)[0]


def cmd_similarity(args: argparse.Namespace) -> int:
    config = mapping_config(args, 0.0)
    check_mapped([args.tokens], [replace(config, ratio=1.0)], "a --tokens window")  # a mapping's window
    llm_tok, slm_tok = load_tokenizer(args.llm), load_tokenizer(args.slm)
    if llm_tok.get_vocab() == slm_tok.get_vocab():
        llm, slm, tok = load(args, [config])
        result = analysis.eval_similarity(llm, slm, eval_windows(args, tok), config)
    else:  # another tokenizer: analysis only (mapping refuses the pair), on the tokens the two align
        llm, slm = load_each(args)
        texts = [text for _, text in named_windows(args, llm_tok, window_texts)]
        result = analysis.eval_cross_similarity(llm, slm, llm_tok, slm_tok, texts, config)
    plot = heatmap_plot(result["heatmap"], f"mean best {result['metric']} similarity")
    return finish(args, "similarity", result, ["llm_layer", "mean_best_similarity", "best_slm_layer"], plot)


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tuning

    mapping = mapping_config(args, args.ratio)
    config = tuning.TuneConfig(
        mapping=mapping,
        method=args.method,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        seed=args.seed,
        save_every=args.save_every,
        eval_examples=args.eval_examples,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if mapping.slm_cache != "native":
        raise ValueError("iam tune keeps the SLM cache in the model's dtype: int8 would cut the gradient (drop --slm-cache).")
    llm_config, slm_config = read_configs(args.llm, args.slm, force=args.force)
    positions = min(llm_config.max_position_embeddings, slm_config.max_position_embeddings)
    if not mapping.establish_threshold <= args.seq_len <= positions:
        raise ValueError(
            f"--seq-len {args.seq_len} must lie between --establish-threshold {mapping.establish_threshold} (shorter "
            f"sequences set no mapping) and the models' {positions} positions."
        )
    tokenizer = load_tokenizer(args.llm)
    examples = tuning.load_tuning_data(
        tokenizer, args.data, args.objective, args.seq_len, positions, args.limit, mapping.establish_threshold
    )
    llm, slm, tok = load(args, [mapping])
    result = tuning.tune_slm(llm, slm, tok, examples, args.out, args.llm, config, resume=args.resume, provenance=args.provenance)
    last = result["rows"][-1] if result["rows"] else {}
    print(
        f"tuned {result['steps']} steps ({result['train_seconds'] / 60:.1f} min, peak RSS {result['peak_rss_gib']:.1f} GiB), "
        f"last loss {last.get('loss', float('nan')):.4f}\nwrote {result['model']} (use it with --slm) and {args.out}/tune.json"
    )
    return 0


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


def cmd_calibrate(args: argparse.Namespace) -> int:
    base = mapping_config(args, 0.0)
    check_mapped([args.tokens], [replace(base, ratio=1.0)], "a --tokens window")
    llm, slm, tok = load(args, [base])
    source = {k: getattr(args, k) for k in ("method", "granularity", "windows", "tokens", "llm", "slm")}
    source["dataset"] = args.text or args.dataset
    per_group = args.granularity == "kv-group"
    windows = eval_windows(args, tok)
    result = calibrate.calibrate(llm, slm, windows, base, args.method, per_group, args.steps, args.shortlist, source, args.to)
    return finish(args, "calibrate", result, calibrate.COLUMNS[args.method])


def add_granularity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--granularity",
        choices=["layer", "kv-group"],
        default="layer",
        help="map whole layers, or each KV group (its query heads and K) of a layer on its own",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results", help="folder for the JSON, Markdown and PNG files")
    p.add_argument("--json", action="store_true", help="print the JSON result")


def add_text_args(p: argparse.ArgumentParser, windows: int = 3, tokens: int = 512) -> None:
    p.add_argument(
        "--dataset",
        default="wikipedia",
        help="wikipedia, lee-news, python-docs, python-stdlib, python-stdlib-calib (offline), wikitext2, govreport (online); "
        "comma-separate to mix",
    )
    p.add_argument("--text", default=None, metavar="FILE", help="any text file instead of --dataset")
    p.add_argument("--windows", type=positive_int, default=windows)
    p.add_argument("--tokens", type=positive_int, default=tokens)


class Parser(argparse.ArgumentParser):
    """argparse, its errors in the one-line form of every other user error (no usage block), with a hint to
    ``--help``; its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"iam: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="iam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text with IAM")
    add_pair_args(p)
    add_placement_args(p)
    add_mapping_args(p)
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the shipped pair: LLM alone vs IAM side by side")
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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("similarity", help="per LLM layer mean best-match similarity, and an LLM x SLM layer heatmap")
    add_pair_args(p)
    add_mapping_args(p)
    add_text_args(p, windows=2, tokens=256)
    add_output_args(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("calibrate", help="measure which LLM layers cost least to map; store the order for --strategy auto")
    add_pair_args(p)
    add_mapping_args(p)
    add_text_args(p, windows=3, tokens=256)
    p.set_defaults(dataset="lee-news")
    add_output_args(p)
    p.add_argument("--to", default=None, metavar="FOLDER", help="where to write the order (default: $IAM_CACHE/calibration)")
    p.add_argument(
        "--method",
        choices=["single", "greedy"],
        default="single",
        help="single: each layer mapped alone, sorted by perplexity cost; greedy: grow the mapped set by the layer "
        "that adds least KL to the LLM alone",
    )
    add_granularity_arg(p)
    p.add_argument("--steps", type=int, default=None, help="greedy: units chosen greedily (default: half of them)")
    p.add_argument("--shortlist", type=int, default=4, help="greedy: candidates re-measured per step after the first")
    p.set_defaults(func=cmd_calibrate)

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

    p = sub.add_parser("tune", help="tune the SLM through the mapped LLM's loss (paper Appendix A)")
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
    p.set_defaults(func=cmd_tune)

    ev = sub.add_parser("eval", help="quality evaluations, LLM alone vs IAM side by side").add_subparsers(
        dest="eval_command", required=True
    )
    for name, help_text in [
        ("perplexity", "sliding-window perplexity"),
        ("metrics", "perplexity under each similarity metric (paper Table 1)"),
        ("sweep", "map each block of layers in turn (paper Fig. 2)"),
        ("consistency", "does the prefill mapping stay the best during decode (paper Fig. 3)"),
        ("qa", "generated answers scored by token F1 (chatterbot trivia by default)"),
        ("choice", "multiple-choice accuracy by length-normalised log-likelihood"),
        ("harness", "lm-evaluation-harness tasks (local ones offline, any lm-eval task online)"),
        ("kv-tradeoff", "continuation perplexity against KV kept: token eviction, IAM, and both"),
        ("mapping-stats", "which SLM heads the mapping borrows, how concentrated, SLM layers never needed (paper Fig. 12)"),
        ("attention-maps", "mean attention of the SLM, the LLM and IAM's mapped layers on one context (paper Fig. 9)"),
        ("summarize", "summaries scored by ROUGE: Wikipedia body -> lead (offline) or GovReport (online)"),
    ]:
        p = ev.add_parser(name, help=help_text)
        add_pair_args(p)
        add_placement_args(p)
        add_mapping_args(p)
        add_output_args(p)
        p.set_defaults(func=cmd_eval)
        if name == "kv-tradeoff":
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
        if name in ("perplexity", "metrics", "sweep", "consistency"):
            add_text_args(p, windows=2 if name == "consistency" else 3, tokens=64 if name == "consistency" else 512)
        if name == "mapping-stats":
            add_text_args(p, windows=6, tokens=128)
            p.set_defaults(dataset="wikipedia,python-stdlib")
        if name == "attention-maps":
            add_text_args(p, windows=1, tokens=64)
        if name in ("perplexity", "qa", "choice", "harness", "summarize"):
            p.add_argument("--ratios", type=ratio_list, default=[0.0, 0.3, 0.5])
        if name in ("metrics", "consistency", "mapping-stats", "attention-maps"):
            p.add_argument("--ratio", type=float, default=0.5)
        if name == "perplexity":
            add_eviction_args(p)
            p.add_argument(
                "--context",
                type=int,
                default=None,
                metavar="N",
                help="continuation protocol: prefill the first N tokens of each window, score the rest over that cache",
            )
        if name == "metrics":
            p.add_argument("--metrics", type=lambda t: t.split(","), default=sorted(METRICS))
        if name == "sweep":
            p.add_argument("--block", type=positive_int, default=4)
            add_granularity_arg(p)
            p.add_argument(
                "--tasks",
                type=task_list,
                default=["perplexity"],
                help="comma-separated tasks scored per block, e.g. perplexity,choice,qa,summarize; each is correlated with "
                "the first (paper Table 3)",
            )
            p.add_argument("--limit", type=positive_int, default=8, help="items per task for choice, qa and summarize")
            p.add_argument("--max-new-tokens", type=positive_int, default=48, help="qa and summarize")
        if name == "summarize":
            p.add_argument(
                "--dataset", default="wikipedia", help="wikipedia (offline: article body -> lead) or govreport (online)"
            )
            p.add_argument("--limit", type=positive_int, default=20, help="number of documents")
            p.add_argument("--max-new-tokens", type=positive_int, default=512, help="the paper's 512; less for CPU runs")
            p.add_argument(
                "--context", type=positive_int, default=1024, help="document tokens given to the model (the rest is cut)"
            )
            p.add_argument(
                "--min-tokens", type=positive_int, default=64, help="documents with fewer tokens are skipped (counted)"
            )
        if name == "consistency":
            p.add_argument("--steps", type=positive_int, default=16)
        if name in ("qa", "choice"):
            p.add_argument("--limit", type=positive_int, default=40, help="number of questions")
        if name == "qa":
            p.add_argument("--max-new-tokens", type=int, default=24)
            p.add_argument("--dataset", default="trivia", help="trivia (offline), hotpotqa or alpaca (online)")
        if name == "choice":
            p.add_argument("--dataset", default=None, help="MMLU-format JSONL file, or 'mmlu' (online); default: trivia")
        if name == "harness":
            p.add_argument(
                "--tasks",
                type=lambda t: [x for x in t.split(",") if x],
                default=["iam_trivia_mc", "iam_wikipedia_ppl", "iam_trivia_qa"],
                help="lm-eval task names: the local iam_trivia_mc, iam_wikipedia_ppl, iam_trivia_qa, or any lm-eval task",
            )
            p.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all)")
    p = ev.add_parser("retrieval", help="long-context retrieval (RULER family) with the context compressed before the question")
    add_pair_args(p)
    add_mapping_args(p)
    add_output_args(p)
    p.add_argument("--tasks", type=retrieval_tasks, default=["multikey"], help=f"comma-separated: {', '.join(retrieval.TASKS)}")
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
        help="comma-separated configurations: llm or iam<ratio>, then +w<window>, +<policy>@<budget>[:unmapped], +int8 "
        "(the LLM's cache as int8)",
    )
    p.set_defaults(func=cmd_retrieval)
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every folder a command will write into (``--out``, ``--to``, the folder of ``--json FILE``)
    must be a folder we may write in, or one we may create; else ``ValueError`` naming it."""
    folders = [("--out", getattr(args, "out", None)), ("--to", getattr(args, "to", None))]
    if isinstance(getattr(args, "json", None), str):
        folders.append(("--json", str(Path(args.json).parent)))
    for flag, folder in folders:
        if folder is None:
            continue
        existing = Path(folder).absolute()
        while not existing.exists() and existing != existing.parent:  # created later: its first existing ancestor
            existing = existing.parent
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise ValueError(f"{flag} {folder} is not a writable folder ({err.strerror or err}); nothing was run.") from None


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's parameter name (its ``dest``) and its long flag, over ``parser`` and its subcommands."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags = option_flags(sub) | flags
        elif action.option_strings:
            flags.setdefault(action.dest, max(action.option_strings, key=len))
    return flags


def as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library error in the command line's words: each parameter it names in backticks becomes its flag
    (`min_tokens` -> --min-tokens); any other name just loses the backticks."""
    flags = option_flags(parser)
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.provenance = provenance(argv)  # the code as it was when the command started, which is what it ran
    try:
        check_outputs(args)
        if secondary_rank():  # under torchrun only rank 0 prints
            with contextlib.redirect_stdout(io.StringIO()):
                return args.func(args)
        return args.func(args)
    except USER_ERRORS as err:
        print(f"iam: error: {as_flags(str(err), parser)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iam: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("iam: internal error; please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
