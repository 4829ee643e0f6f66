"""``python -m iam_vllm.bench LLM IAM``: output tokens per second of the LLM alone and of an IAM folder in vLLM,
each the median of ``--repeats`` timed generations with their min and max, interleaved (one engine, then the other,
their order alternating per round), every generation in a fresh process (``iam_vllm.run``) so that each engine has
the machine to itself. Writes ``<out>/vllm-throughput.json`` and ``.md`` atomically after every round, with the
provenance (commit, CPU, environment)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

from iam.reporting import provenance, write_report

from .run import logged_capacity

ENVIRONMENT = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
"""The variables that set the engines' threads, their cores and KV space, recorded with the result."""
COLUMNS = ["engine", "runs", "tokens_per_s", "min", "max", "vs_llm", "vs_llm_min", "vs_llm_max", "seconds", "kv_tokens"]


def generate(model: str, args: argparse.Namespace) -> dict:
    """One timed generation of ``model`` in a fresh engine: its seconds, output tokens per second and the KV
    capacity (tokens) the engine logged."""
    argv = [sys.executable, "-m", "iam_vllm.run", model, "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens)]
    argv += ["--new-tokens", str(args.new_tokens), "--repeats", "1", "--max-model-len", str(args.max_model_len)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{shlex.join(argv)} failed (exit {done.returncode}):\n{log[-3000:]}")
    result = json.loads(lines[-1])
    return {
        "seconds": result["seconds"][0],
        "tokens_per_s": result["output_tokens_per_s"],
        "kv_tokens": logged_capacity(log),
    }


def summary(name: str, model: str, runs: list[dict], baseline: list[dict]) -> dict:
    """A row: the engine's median output tokens per second with min and max, and its ratio to the LLM alone's in the
    same rounds (median, min, max)."""
    rates = [r["tokens_per_s"] for r in runs]
    ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, baseline)]
    return {
        "engine": name,
        "model": model,
        "runs": len(runs),
        "tokens_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "vs_llm": statistics.median(ratios),
        "vs_llm_min": min(ratios),
        "vs_llm_max": max(ratios),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "kv_tokens": runs[-1]["kv_tokens"],
        "each": runs,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m iam_vllm.bench", description=__doc__)
    p.add_argument("llm", help="the LLM's folder (vLLM's own model class serves it)")
    p.add_argument("iam", help="an IAM folder of the same LLM (iam export-vllm)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each times every engine once")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--timeout", type=int, default=3600, help="seconds one engine's process may take")
    p.add_argument("--out", default="results", help="folder of vllm-throughput.json and .md")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    meta = provenance([])
    meta["argv"] = shlex.join(["python", "-m", "iam_vllm.bench", *(sys.argv[1:] if argv is None else argv)])
    meta["environment"] = {name: os.environ.get(name) for name in ENVIRONMENT}
    engines = {"llm": args.llm, "iam": args.iam}
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for round_ in range(args.repeats):
        for name in list(engines)[:: 1 if round_ % 2 == 0 else -1]:
            runs[name].append({"round": round_, **generate(engines[name], args)})
        rows = [summary(name, engines[name], runs[name], runs["llm"]) for name in engines]
        settings = {k: getattr(args, k) for k in ("batch", "prompt_tokens", "new_tokens", "max_model_len")}
        result = {"provenance": meta, "settings": settings, "rounds": round_ + 1, "rows": rows}
        write_report(args.out, "vllm-throughput", result, COLUMNS)
        print(json.dumps({r["engine"]: round(r["tokens_per_s"], 3) for r in rows} | {"round": round_}), flush=True)


if __name__ == "__main__":
    main()
