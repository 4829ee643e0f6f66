"""Writing results: JSON, a Markdown table, and a PNG where a figure helps."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers

from . import __version__


def provenance(argv: Sequence[str]) -> dict:
    """What a result came from: the command line, the package versions, the time, and, when the package runs
    from a git checkout, its commit (``git_dirty``: tracked files differ from it)."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {
        "argv": shlex.join(["iam", *argv]),
        "iam": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no")),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
    plot: Callable[[Path], None] | None = None,
) -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.md`` (the ``rows`` as a table) and optionally ``<name>.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md")}
    Path(paths["markdown"]).write_text(markdown_table(result["rows"], columns))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        paths["png"] = str(out / f"{name}.png")
        plot(Path(paths["png"]))
    result["files"] = paths
    Path(paths["json"]).write_text(json.dumps(result, indent=2))
    return paths
