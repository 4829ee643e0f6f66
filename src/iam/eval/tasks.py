"""The registry of scored tasks: each names its scorer (a score of one ``IAMForCausalLM`` on prepared inputs), the
score a sweep compares, whether higher is better, and the columns of its side-by-side report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .generation import choice_accuracy, qa_scores, summary_scores
from .perplexity import COLUMNS as PERPLEXITY_COLUMNS
from .perplexity import perplexity_score


@dataclass(frozen=True)
class Task:
    """A scored task.

    Parameters
    ----------
    name : its name (``--tasks``, report names).
    scorer : ``scorer(iam, *inputs)``: the task's scores of one ``IAMForCausalLM`` (a dict, or the bare score).
    key : the score a multi-task sweep compares (a key of the scorer's dict; ``None``: the bare score).
    higher_is_better : whether a higher ``key`` means better quality.
    columns : the columns of its side-by-side report.
    """

    name: str
    scorer: Callable[..., dict | float]
    key: str | None
    higher_is_better: bool
    columns: tuple[str, ...]

    def score(self, iam, *inputs) -> float:
        """The one score a sweep compares."""
        scores = self.scorer(iam, *inputs)
        return scores if self.key is None else scores[self.key]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("perplexity", perplexity_score, "ppl", False, tuple(PERPLEXITY_COLUMNS)),
        Task("choice", choice_accuracy, None, True, ("ratio", "strategy", "accuracy", "n")),
        Task("qa", qa_scores, "f1", True, ("ratio", "strategy", "f1", "exact_match", "n")),
        Task("summarize", summary_scores, "rougeL", True, ("ratio", "strategy", "rouge1", "rouge2", "rougeL", "n")),
    )
}
"""Tasks by name: perplexity (lower is better), choice accuracy, QA token F1, summary ROUGE-L."""
