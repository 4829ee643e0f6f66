"""Resuming a run: answers appended to a progress file as they are measured, and read back."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path


def progress_file(out: str | Path, settings: dict) -> Path:
    """The file in ``out`` where answers are appended as they are measured, one per ``settings`` (a digest of them
    names it: whatever changes an answer, not the tasks, lengths or sample count, since sample ``i`` is the same for
    any of them); created here, so an unwritable ``out`` fails before any work."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"retrieval-{digest}.jsonl"
    with path.open("a+b") as f:  # a line an interrupt cut short is ended, so the next one starts on its own
        if f.tell() and (f.seek(-1, 2) or f.read(1) != b"\n"):
            f.write(b"\n")
    return path


ANSWER = {
    "question": int,
    "depth": (int, float),
    "correct": bool,
    "prediction": str,
    "expected": list,
    "llm_kv_dropped": (int, float),
    "total_kv": (int, float),
    "total_kv_dropped_at_72b": (int, float),
    "seconds": (int, float),
    "scoring_seconds": (int, float),
    "context_tokens": (int, float),
}
"""A recorded answer's fields and their JSON types (``eval_retrieval`` writes them, ``summarize`` reads them)."""


def _recorded(line: bytes) -> tuple[tuple, list[dict]]:
    """One progress line's key and answers; ``ValueError`` for anything else (cut short, not UTF-8, another shape)."""
    entry = json.loads(line.decode())
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    key, answers = entry.get("key"), entry.get("answers")
    kinds = (str, str, int, int)
    if not (isinstance(key, list) and len(key) == 4 and all(isinstance(k, t) for k, t in zip(key, kinds))):
        raise ValueError("no key")
    if not (isinstance(answers, list) and answers and all(isinstance(a, dict) for a in answers)):
        raise ValueError("no answers")
    if not all(isinstance(a.get(f), t) for a in answers for f, t in ANSWER.items()):
        raise ValueError("answers of another shape")
    return tuple(key), answers


def read_progress(path: Path) -> dict:
    """Answers recorded in ``path`` by ``(label, task, tokens, sample)``. Any other line (cut short by an interrupt,
    not UTF-8, of another shape) is skipped with a warning naming it: its sample is measured again."""
    done, skipped = {}, []
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            key, answers = _recorded(line)
        except ValueError:
            skipped.append(number)
            continue
        done[key] = answers
    if skipped:
        warnings.warn(
            f"{path}: skipped line(s) {skipped}, not a recorded answer (their samples are measured again).", stacklevel=2
        )
    return done


def recorder(path: Path):
    """A ``record`` callback for ``eval_retrieval`` that appends each measured sample to ``path`` and flushes it."""

    def record(key: tuple, answers: list[dict]) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"key": list(key), "answers": answers}) + "\n")
            f.flush()

    return record
