"""The retrieval tasks, generated offline and deterministically from a seed: filler text (prose or code) with needles
at chosen depths, and the questions about them (``TASKS``, one small dataclass each; ``make_samples``)."""

from __future__ import annotations

import random
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from .. import data

FILLERS = ("prose", "code")
INSTRUCTION = "Some facts are hidden in the text below. Memorize them: questions about them follow the text.\n\n"

WORDS_A = (
    "amber azure brave calm crimson dusty eager fancy gentle golden hidden icy jolly lucky misty noble olive "
    "proud quiet rapid silver sunny tidy velvet wild young"
).split()
WORDS_B = (
    "anchor badger canyon dragon engine falcon garden harbor island jungle kettle lantern meadow needle orchard "
    "pepper quarry river saddle tower valley walrus yacht zebra"
).split()


@dataclass(frozen=True)
class Question:
    """One question about a sample's context.

    Parameters
    ----------
    text : the question, appended after the context.
    prefix : the start of the answer, put in the assistant's mouth.
    answers : strings that must all appear in the generated answer.
    depth : where the asked needle sits in the context, as a fraction of its tokens (0: first token).
    """

    text: str
    prefix: str
    answers: tuple[str, ...]
    depth: float


@dataclass(frozen=True)
class Sample:
    """A context and its questions (see ``Question``); ``tokens``: the context's length in tokens, instruction included."""

    task: str
    context: str
    questions: tuple[Question, ...]
    tokens: int


@lru_cache(maxsize=2)
def filler_units(kind: str) -> tuple[str, ...]:
    """The filler's pieces, in order: sentences of the offline Wikipedia articles (``prose``) or lines of Python
    standard-library source (``code``). Digits are removed so that no filler number looks like an answer."""
    if kind == "prose":
        text = " ".join(data.wikipedia_articles())
        units = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    elif kind == "code":
        units = data.python_stdlib_text().splitlines()
    else:
        raise ValueError(f"filler must be one of {FILLERS}, got {kind!r}.")
    return tuple(u for u in (re.sub(r"\d", "", u).rstrip() for u in units) if u.strip())


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in WORDS_A for b in WORDS_B], n)
    return [f"{a} {b}" for a, b in pairs]


def depths_for(n: int, spread: str, rng: random.Random, low: float = 0.05, high: float = 0.95) -> list[float]:
    """``n`` needle depths in ``[low, high]``: evenly spaced (``even``, jittered within their slot) or uniform at random
    (``random``), in increasing order."""
    if spread == "even":
        width = (high - low) / n
        return [low + width * (i + rng.random()) for i in range(n)]
    if spread == "random":
        return sorted(rng.uniform(low, high) for _ in range(n))
    raise ValueError(f"depths must be 'even' or 'random', got {spread!r}.")


def build_context(
    tokenizer, units: Sequence[str], needles: Sequence[str], depths: Sequence[float], tokens: int, rng: random.Random, sep: str
) -> tuple[str, list[float], int]:
    """Filler pieces from a random start, joined by ``sep``, with ``needles`` inserted at ``depths`` (fractions of the
    context's tokens), the whole at most ``tokens`` tokens with the instruction. Returns the context, each needle's
    actual depth, and the context's token count."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
    budget = tokens - count(INSTRUCTION) - sum(count(n + sep) for n in needles)
    start = rng.randrange(len(units))
    pieces, used = [], 0
    for i in range(len(units)):
        piece = units[(start + i) % len(units)]
        cost = count(piece + sep)
        if used + cost <= budget:  # a piece too long for what is left is skipped
            pieces.append(piece)
            used += cost
        if budget - used < 8:
            break
    while True:  # joined, pieces may tokenize otherwise than alone: drop the last until the whole fits
        if not pieces:
            raise ValueError(f"tokens {tokens} leaves no room for filler around {len(needles)} needles.")
        context, at, n = _place(count, pieces, needles, depths, used, sep)
        if n <= tokens:
            return context, at, n
        used -= count(pieces.pop() + sep)


def _place(count, pieces: list[str], needles: Sequence[str], depths: Sequence[float], used: int, sep: str):
    """``build_context``'s context of ``pieces`` (``used`` tokens) with the needles at the depths, their actual
    depths and its token count."""
    cumulative = [0]
    for piece in pieces:
        cumulative.append(cumulative[-1] + count(piece + sep))
    slots = [min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - d * used)) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (slots[j], j))
    parts: list[str] = []
    placed = {}
    for i in range(len(pieces) + 1):
        for j in order:
            if slots[j] == i:
                placed[j] = count(INSTRUCTION + sep.join(parts) + (sep if parts else ""))
                parts.append(needles[j])
        if i < len(pieces):
            parts.append(pieces[i])
    context = INSTRUCTION + sep.join(parts)
    n = count(context)
    return context, [placed[j] / n for j in range(len(needles))], n


@dataclass(frozen=True)
class RetrievalTask(ABC):
    """One task of the family: makes a ``Sample`` from a seeded ``random.Random``."""

    name = ""
    max_new_tokens = 16

    @abstractmethod
    def sample(self, tokenizer, rng: random.Random, tokens: int, spread: str, filler: str) -> Sample: ...


@dataclass(frozen=True)
class Passkey(RetrievalTask):
    """A single pass key (``digits`` digits) hidden once in the filler."""

    digits: int = 5
    name = "passkey"
    max_new_tokens = 10

    def sample(self, tokenizer, rng, tokens, spread, filler):
        key = _digits(rng, self.digits)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        (depth,) = depths_for(1, spread, rng)
        context, (at,), n = build_context(tokenizer, filler_units(filler), [needle], [depth], tokens, rng, _sep(filler))
        question = Question("What is the pass key?", "The pass key is ", (key,), at)
        return Sample(self.name, context, (question,), n)


@dataclass(frozen=True)
class MultiKey(RetrievalTask):
    """``needles`` access codes of ``digits`` digits for distinct keys, each asked once, among ``distractors`` codes
    of other keys that are never asked."""

    needles: int = 4
    distractors: int = 4
    digits: int = 7
    name = "multikey"
    max_new_tokens = 12

    def sample(self, tokenizer, rng, tokens, spread, filler):
        n = self.needles + self.distractors
        keys, codes = _keys(rng, n), [_digits(rng, self.digits) for _ in range(n)]
        needles = [f"The access code for the {k} is {c}." for k, c in zip(keys, codes)]
        order = rng.sample(range(n), n)  # asked and distractor needles interleaved at the depths
        depths = depths_for(n, spread, rng)
        placed = [depths[order.index(i)] for i in range(n)]
        context, at, length = build_context(tokenizer, filler_units(filler), needles, placed, tokens, rng, _sep(filler))
        questions = tuple(
            Question(
                f"What is the access code for the {keys[i]}? Answer with the number only.",
                f"The access code for the {keys[i]} is ",
                (codes[i],),
                at[i],
            )
            for i in range(self.needles)
        )
        return Sample(self.name, context, questions, length)


@dataclass(frozen=True)
class MultiValue(RetrievalTask):
    """One key with ``values`` access codes at different depths; the answer must name them all."""

    values: int = 4
    digits: int = 7
    name = "multivalue"
    max_new_tokens = 40

    def sample(self, tokenizer, rng, tokens, spread, filler):
        (key,), codes = _keys(rng, 1), [_digits(rng, self.digits) for _ in range(self.values)]
        needles = [f"One of the access codes for the {key} is {c}." for c in codes]
        depths = depths_for(self.values, spread, rng)
        context, at, n = build_context(tokenizer, filler_units(filler), needles, depths, tokens, rng, _sep(filler))
        question = Question(
            f"What are all the access codes for the {key}? List the numbers only.",
            f"The access codes for the {key} are ",
            tuple(codes),
            sum(at) / len(at),
        )
        return Sample(self.name, context, (question,), n)


@dataclass(frozen=True)
class KeyValue(RetrievalTask):
    """A JSON object of random UUID keys and values filling the context; ``queries`` keys asked."""

    queries: int = 4
    name = "kv"
    max_new_tokens = 40

    def sample(self, tokenizer, rng, tokens, spread, filler):
        new_id = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
        pairs = [(new_id(), new_id()) for _ in range(tokens // 8 + self.queries)]  # more than can fit
        text = lambda m: INSTRUCTION + "JSON data:\n{" + ",\n".join(f'"{k}": "{v}"' for k, v in pairs[:m]) + "}"
        count = lambda m: len(tokenizer(text(m), add_special_tokens=False).input_ids)
        low, high = 0, len(pairs)  # the most pairs that fit: count(low) <= tokens < count(high + 1)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if count(mid) <= tokens else (low, mid - 1)
        if low < self.queries:
            raise ValueError(f"tokens {tokens} is too short for task kv: its {self.queries} pairs take {count(self.queries)}.")
        pairs = pairs[:low]
        asked: list[int] = []  # the pair nearest each depth, each asked once
        for d in depths_for(self.queries, spread, rng):
            at = min(int(d * len(pairs)), len(pairs) - 1)
            asked.append(min((j for j in range(len(pairs)) if j not in asked), key=lambda j: abs(j - at)))
        questions = tuple(
            Question(
                f'What is the value of the key "{pairs[i][0]}" in the JSON data? Answer with the value only.',
                f'The value of "{pairs[i][0]}" is "',
                (pairs[i][1],),
                (i + 0.5) / len(pairs),
            )
            for i in asked
        )
        return Sample(self.name, text(low), questions, count(low))


@dataclass(frozen=True)
class VariableTracking(RetrievalTask):
    """A chain of ``hops`` assignments, ``VAR A = 12345.`` then ``VAR B = VAR A.`` and so on, at increasing depths;
    the answer must name every variable that holds the value."""

    hops: int = 4
    name = "vartrack"
    max_new_tokens = 40

    def sample(self, tokenizer, rng, tokens, spread, filler):
        names = rng.sample(["".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ", k=5)) for _ in range(4 * self.hops)], self.hops)
        value = _digits(rng, 5)
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        depths = depths_for(self.hops, spread, rng)
        context, at, n = build_context(tokenizer, filler_units(filler), needles, depths, tokens, rng, _sep(filler))
        question = Question(
            f"Which variables are assigned the value {value}, directly or through other variables? List their names only.",
            f"The variables assigned the value {value} are: ",
            tuple(names),
            at[0],
        )
        return Sample(self.name, context, (question,), n)


def _sep(filler: str) -> str:
    return " " if filler == "prose" else "\n"


TASKS: dict[str, type[RetrievalTask]] = {t.name: t for t in (Passkey, MultiKey, MultiValue, KeyValue, VariableTracking)}
"""Retrieval tasks by name (``--tasks``)."""


LENGTH_TOLERANCE = 0.2
"""How far below the tokens asked a context may fall, as a share of them (whole filler pieces or JSON pairs fill it);
it never exceeds them."""


def make_samples(
    tokenizer, task: str, n: int, tokens: int, seed: int = 0, spread: str = "even", filler: str = "prose"
) -> list[Sample]:
    """``n`` samples of ``task`` with contexts of ``tokens`` tokens (at most, within ``LENGTH_TOLERANCE``), the same
    for the same arguments, sample ``i`` the same for any ``n``; ``ValueError`` where ``task`` cannot fill them."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}.")
    rng = random.Random(f"{task}/{tokens}/{seed}/{spread}/{filler}")
    samples = [TASKS[task]().sample(tokenizer, rng, tokens, spread, filler) for _ in range(n)]
    shortest = min(s.tokens for s in samples)
    if shortest < (1 - LENGTH_TOLERANCE) * tokens:
        raise ValueError(
            f"task {task} fills only {shortest} of tokens {tokens} (less than {1 - LENGTH_TOLERANCE:.0%}): its pieces "
            "are too long for this length; ask for a longer one."
        )
    return samples
