"""Writing results: JSON, a Markdown table, provenance, and a PNG where a figure helps (every file written
atomically: a temporary file renamed into place)."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
import transformers

from .io import atomic_file, write_atomic


def with_baseline(ratios: Sequence[float]) -> list[float]:
    """``ratios`` with ratio 0 (the LLM alone) first and only once: side-by-side runs compare against it."""
    return [0.0] + [r for r in ratios if r != 0]


def provenance(argv: Sequence[str]) -> dict:
    """What a result came from: the command line, the package versions, the time, and, when the package runs
    from a git checkout, its commit (``git_dirty``: tracked files differ from it). Taken when a command starts."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {
        "argv": shlex.join(["iam", *argv]),
        "iam": version("iam-llm"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no")),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **machine(),
    }


def machine() -> dict:
    """The CPU a timing ran on: absolute times differ several-fold between machines of one kind, so timed rows
    carry ``cpu`` (its model name), ``cpu_isa`` (the widest bfloat16 path: ``amx``, ``avx512_bf16``, else torch's
    vector capability, e.g. ``AVX2``) and ``threads`` (torch's intra-op threads); ``cuda`` names the GPU, if any."""
    flags, name = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else torch.backends.cpu.get_cpu_capability()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": name, "cpu_isa": isa, "threads": torch.get_num_threads(), "cuda": gpu}


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list):
            return ",".join(map(str, v)) if len(v) <= 8 else f"{v[0]}..{v[-1]} ({len(v)})"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    name: str,
    result: dict,
    columns: Sequence[str],
    plot: Callable | None = None,
) -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.md`` (the ``rows`` as a table) and, with ``plot`` (called with
    ``matplotlib.pyplot`` to draw one figure), ``<name>.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    write_atomic(Path(paths["markdown"]), markdown_table(result["rows"], columns))
    if plot is not None:
        paths["png"] = str(save_figure(out / f"{name}.png", plot))
    result["files"] = paths
    write_atomic(Path(paths["json"]), json.dumps(result, indent=2))
    return paths


def save_figure(path: Path, plot: Callable) -> Path:
    """Draw one figure with ``plot`` (called with ``matplotlib.pyplot``) and write it to ``path`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            plot(plt)
            plt.tight_layout()
            plt.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close("all")
    return path


KV_AXES = (
    ("llm_kv_dropped", "on_frontier", "LLM's own KV dropped (%)"),
    ("total_kv_dropped", "on_total_frontier", "total KV dropped, the SLM's included (%)"),
    ("total_kv_dropped_at_72b", "on_72b_frontier", "total KV dropped projected to Qwen2-72B + 0.5B (%, arithmetic)"),
)
"""The KV axes of ``retrieval_plot`` and ``tradeoff_plot``: the row's key, its frontier mark, the axis label."""


def retrieval_plot(rows: Sequence[dict]) -> Callable:
    """Accuracy (with its 95% interval) against KV dropped, one panel per task and length (columns) and per KV axis
    (rows: ``KV_AXES``): eviction alone, a quantized cache alone, IAM alone and IAM composed with eviction in
    their own markers, the LLM alone as a line; a large marker sits on that axis's frontier."""

    def plot(plt) -> None:
        panels = list(dict.fromkeys((r["task"], r.get("tokens")) for r in rows))
        axes_in = [a for a in KV_AXES if all(a[0] in r for r in rows)]
        fig, axes = plt.subplots(len(axes_in), len(panels), figsize=(6.5 * len(panels), 4.8 * len(axes_in)), squeeze=False)
        for (key, mark, label), line in zip(axes_in, axes):
            for ax, (task, tokens) in zip(line, panels):
                for r in (r for r in rows if (r["task"], r.get("tokens")) == (task, tokens)):
                    quantized = r.get("llm_cache", "native") != "native"
                    kind = "IAM" if r["ratio"] else "eviction" if r["eviction"] else "quantized" if quantized else "LLM alone"
                    style = {"IAM": ("o", "tab:blue"), "eviction": ("s", "tab:red"), "LLM alone": ("*", "black")}.get(
                        kind, ("^", "tab:green")
                    )
                    if r["ratio"] and r["eviction"]:
                        style = ("D", "tab:purple")
                    x, y = 100 * r[key], 100 * r["accuracy"]
                    err = [[y - 100 * r["ci_low"]], [100 * r["ci_high"] - y]]
                    ax.errorbar(x, y, yerr=err, fmt=style[0], color=style[1], ms=8 if r[mark] else 5, capsize=3, alpha=0.8)
                    ax.annotate(r["method"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
                    if kind == "LLM alone":
                        ax.axhline(y, color="black", lw=0.8, ls=":")
                ax.set_title(f"{task}, {tokens} tokens (n = {rows[0]['n']} per point; large marker: on the frontier)", fontsize=9)
                ax.set_xlabel(label)
                ax.set_ylabel("exact match (%), 95% Wilson interval")
                ax.set_ylim(-5, 105)
                ax.grid(alpha=0.3)

    return plot


def depth_plot(rows: Sequence[dict], bins: int) -> Callable:
    """Accuracy per needle-depth bin (columns) for each configuration (rows), one panel per task and length."""

    def plot(plt) -> None:
        panels = list(dict.fromkeys((r["task"], r.get("tokens")) for r in rows))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 + 4 * len(panels), 0.4 * len(rows) / len(panels) + 2), squeeze=False)
        for ax, (task, tokens) in zip(axes[0], panels):
            mine = [r for r in rows if (r["task"], r.get("tokens")) == (task, tokens)]
            grid = torch.tensor([[float("nan") if a is None else a for a in r["accuracy_by_depth"]] for r in mine])
            image = ax.imshow(100 * grid.numpy(), vmin=0, vmax=100, cmap="viridis", aspect="auto")
            ax.set_yticks(
                range(len(mine)), [f"{r['method']} ({100 * r['llm_kv_dropped']:.0f}% dropped)" for r in mine], fontsize=7
            )
            ax.set_xticks(range(bins), [f"{i / bins:.1f}-{(i + 1) / bins:.1f}" for i in range(bins)], fontsize=7)
            ax.set_xlabel("needle depth (fraction of the context)")
            ax.set_title(f"{task}, {tokens} tokens: exact match (%) by depth", fontsize=9)
            plt.colorbar(image, ax=ax)

    return plot


def sweep_plot(rows: Sequence[dict], block: int, per_group: bool) -> Callable:
    """Bar chart of the perplexity increase of each mapped block (paper Fig. 2)."""

    def plot(plt) -> None:
        plt.figure(figsize=(7, 3.5))
        plt.bar([r["block"] for r in rows], [100 * r["ppl_increase"] for r in rows])
        plt.xticks(rotation=90 if len(rows) > 10 else 0)
        plt.ylabel("perplexity increase (%)")
        plt.xlabel(f"mapped LLM layers (blocks of {block}{', layer:kv_group' if per_group else ''})")

    return plot


def heatmap_plot(heatmap: Sequence[Sequence[float]], label: str) -> Callable:
    """LLM layer x SLM layer heatmap of mean best-match similarity (paper Fig. 10)."""

    def plot(plt) -> None:
        plt.figure(figsize=(6, 5))
        plt.imshow(heatmap, aspect="auto", origin="lower", cmap="viridis")
        plt.colorbar(label=label)
        plt.xlabel("SLM layer")
        plt.ylabel("LLM layer")

    return plot


def tradeoff_plot(rows: Sequence[dict]) -> Callable:
    """Continuation perplexity increase against KV dropped on each axis of ``KV_AXES`` (one panel each), one line per
    method; a large marker sits on that axis's frontier."""

    def plot(plt) -> None:
        axes_in = [a for a in KV_AXES if all(a[0] in r for r in rows)]
        fig, axes = plt.subplots(1, len(axes_in), figsize=(5.5 * len(axes_in), 4), sharey=True, squeeze=False)
        for ax, (key, mark, label) in zip(axes[0], axes_in):
            for method in dict.fromkeys(r["method"] for r in rows[1:]):
                points = sorted((r for r in rows[1:] if r["method"] == method), key=lambda r: r[key])
                line = ax.plot([100 * r[key] for r in points], [100 * r["ppl_increase"] for r in points], "-", label=method)
                for r in points:
                    ax.plot(100 * r[key], 100 * r["ppl_increase"], "o", color=line[0].get_color(), ms=8 if r[mark] else 4)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("continuation perplexity increase (%)")
        axes[0, -1].legend(fontsize=8)

    return plot


def usage_plot(usage: Sequence[Sequence[float]]) -> Callable:
    """How often each SLM (layer, head) is borrowed (paper Fig. 12): a layer x head heatmap of the share of use, and
    every head's share, largest first (how concentrated the use is)."""

    def plot(plt) -> None:
        shares = torch.tensor(usage, dtype=torch.float64)
        shares = shares / shares.sum()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        image = axes[0].imshow(100 * shares.T.numpy(), aspect="auto", origin="lower", cmap="viridis")
        fig.colorbar(image, ax=axes[0], label="share of use (%)")
        axes[0].set_xlabel("SLM layer")
        axes[0].set_ylabel("SLM head")
        ranked = 100 * shares.flatten().sort(descending=True).values.numpy()
        axes[1].bar(range(len(ranked)), ranked, width=1.0)
        axes[1].set_xlabel("SLM (layer, head), most used first")
        axes[1].set_ylabel("share of use (%)")

    return plot


def attention_maps_plot(maps: dict[str, Sequence[Sequence[float]]]) -> Callable:
    """Mean attention matrices side by side, on one logarithmic colour scale (paper Fig. 9)."""

    def plot(plt) -> None:
        from matplotlib.colors import LogNorm

        fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4))
        norm = LogNorm(vmin=1e-4, vmax=1.0)
        for ax, (name, matrix) in zip(axes, maps.items()):
            image = ax.imshow(torch.tensor(matrix).clamp_min(1e-4).numpy(), cmap="viridis", norm=norm)
            ax.set_title(name)
            ax.set_xlabel("key token")
        axes[0].set_ylabel("query token")
        fig.colorbar(image, ax=axes[-1], label="mean attention")

    return plot


def task_sweep_plot(rows: Sequence[dict], tasks: Sequence[str], block: int) -> Callable:
    """One bar chart per task of its score with each block mapped, the LLM alone as a line (paper Table 3)."""

    def plot(plt) -> None:
        fig, axes = plt.subplots(len(tasks), 1, figsize=(7, 2.2 * len(tasks)), sharex=True, squeeze=False)
        for ax, task in zip(axes[:, 0], tasks):
            ax.bar([r["block"] for r in rows[1:]], [r[task] for r in rows[1:]])
            ax.axhline(rows[0][task], color="black", linestyle="--", label="LLM alone")
            ax.set_ylabel(task)
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].set_xlabel(f"mapped LLM layers (blocks of {block})")

    return plot
