"""A configuration's answers summed up: accuracy with its Wilson interval, accuracy by depth, how wrong answers went
wrong, and the frontier of KV dropped against accuracy."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..setup import Setup
from ..tradeoff import mark_frontiers


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _like(prediction: str, expected: Sequence[str]) -> list[str]:
    """The words of ``prediction`` as long as the single expected answer (none where several are expected)."""
    if len(expected) != 1:
        return []
    return [word for word in re.findall(r"[\w-]+", prediction) if len(word) == len(expected[0])]


def near_miss(prediction: str, expected: Sequence[str]) -> bool:
    """Whether a wrong answer is one character off a single expected answer: a token of the same length that differs
    in one place (a copy gone slightly wrong, not a forgotten fact)."""
    return any(sum(a != b for a, b in zip(word, expected[0])) == 1 for word in _like(prediction, expected))


def copied_wrong(prediction: str, expected: Sequence[str], context: str) -> bool:
    """Whether a wrong answer to a single-answer question is another value of the context: a word as long as the
    expected answer that the context holds (the right kind of fact, from the wrong needle)."""
    return any(word in context for word in _like(prediction, expected))


def summarize(setup: Setup, task: str, answers: Sequence[dict], bins: int, contexts: Sequence[str]) -> dict:
    """One report row: accuracy with its 95% Wilson interval, KV and time, accuracy per depth bin, and how the wrong
    answers went wrong: one character off (``near_miss``), or another value of the context (``copied_wrong``);
    ``answers`` carry their ``sample``, the index into ``contexts``."""
    n, k = len(answers), sum(a["correct"] for a in answers)
    low, high = wilson(k, n)
    per_bin: list[float | None] = []
    for b in range(bins):
        inside = [a["correct"] for a in answers if min(int(a["depth"] * bins), bins - 1) == b]
        per_bin.append(sum(inside) / len(inside) if inside else None)
    mean = lambda key: sum(a[key] for a in answers) / n
    return {
        "method": setup.label,
        "task": task,
        "ratio": setup.ratio,
        "local_window": setup.local_window,
        "eviction": setup.policy,
        "budget": setup.budget,
        "scope": setup.scope if setup.policy else None,
        "llm_cache": setup.llm_cache,
        "n": n,
        "correct": k,
        "accuracy": k / n,
        "ci_low": low,
        "ci_high": high,
        "llm_kv_dropped": mean("llm_kv_dropped"),
        "total_kv": mean("total_kv"),
        "total_kv_dropped": 1 - mean("total_kv"),
        "total_kv_dropped_at_72b": mean("total_kv_dropped_at_72b"),
        "seconds_per_question": mean("seconds"),
        "scoring_seconds_per_question": mean("scoring_seconds"),
        "context_tokens": mean("context_tokens"),
        "accuracy_by_depth": per_bin,
        "near_misses": sum(not a["correct"] and near_miss(a["prediction"], a["expected"]) for a in answers),
        "wrong_needle": sum(
            not a["correct"] and copied_wrong(a["prediction"], a["expected"], contexts[a["sample"]]) for a in answers
        ),
    }


def frontier(rows: list[dict]) -> None:
    """Mark each row ``on_frontier`` (and ``on_total_frontier``, ``on_72b_frontier``: see ``tradeoff.AXES``) per task
    and length: no other configuration of the task drops at least as much KV on that axis with at least its
    accuracy, and is strictly better in one."""
    mark_frontiers(rows, lambda r: r["accuracy"], lambda a, b: (a["task"], a.get("tokens")) == (b["task"], b.get("tokens")))
