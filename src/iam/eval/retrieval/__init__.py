"""Long-context retrieval in the RULER family, generated offline and deterministically from a seed, and its two
protocols: ``agnostic`` (the context is prefilled, and compressed, before the question arrives, as for a cached
document or a long chat) and ``aware`` (the question ends the prefill, as RULER does).

A ``Sample`` is one context (filler text with needles at chosen depths) and its questions. Under ``agnostic`` the
context is prefilled once into a cache and every question is asked over its own copy of that cache: the context is
cached once and asked many times. Tasks (``TASKS``), one small dataclass each:

- ``passkey``: one pass key in the filler.
- ``multikey``: ``needles`` keyed access codes, each asked, among ``distractors`` codes of other keys never asked.
- ``multivalue``: one key with ``values`` codes; the answer must name them all.
- ``kv``: a JSON object of UUID pairs (no filler); ``queries`` keys asked.
- ``vartrack``: a chain of ``hops`` variable assignments from one value; the answer must name every variable.

The package, by idea: ``tasks`` (the generators), ``protocol`` (asking and checking), ``statistics`` (a row of
answers, the frontier), ``run`` (the side-by-side run) and ``resume`` (the progress file).
"""

from .protocol import PROTOCOLS, answer, correct, encode, prompt_parts, samples_for
from .resume import progress_file, read_progress, recorder
from .run import demo, eval_retrieval, prepare
from .statistics import copied_wrong, frontier, near_miss, summarize, wilson
from .tasks import FILLERS, LENGTH_TOLERANCE, TASKS, Question, RetrievalTask, Sample, make_samples

__all__ = [
    "FILLERS",
    "LENGTH_TOLERANCE",
    "PROTOCOLS",
    "TASKS",
    "Question",
    "RetrievalTask",
    "Sample",
    "answer",
    "copied_wrong",
    "correct",
    "demo",
    "encode",
    "eval_retrieval",
    "frontier",
    "make_samples",
    "near_miss",
    "prepare",
    "progress_file",
    "prompt_parts",
    "read_progress",
    "recorder",
    "samples_for",
    "summarize",
    "wilson",
]
