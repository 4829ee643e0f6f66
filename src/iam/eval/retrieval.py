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
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..core.eviction import repeat_prompt
from ..core.model import IAMForCausalLM
from . import data
from .runs import side_by_side
from .setup import Setup, build, configured, parse_setup, parse_setups  # noqa: F401  (re-exported)
from .tradeoff import AXES, kv_shares, mark_frontiers  # noqa: F401  (AXES, kv_shares: re-exported)

PROTOCOLS = ("agnostic", "aware")
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


def samples_for(
    tokenizer,
    tasks: Sequence[str],
    tokens: Sequence[int],
    n: int,
    limit: int,
    seed: int = 0,
    spread: str = "even",
    filler: str = "prose",
) -> dict[tuple[str, int], list[Sample]]:
    """Every sample of a run by task and context length (``make_samples``), checked before any model loads: each
    context, with each of its questions and the longest answer, fits the models' ``limit`` positions."""
    samples = {(task, t): make_samples(tokenizer, task, n, t, seed, spread, filler) for task in tasks for t in tokens}
    for (task, t), sample_list in samples.items():
        for sample in sample_list:
            for question in sample.questions:
                worst = sum(ids.shape[1] for ids in encode(tokenizer, sample, question)) + TASKS[task].max_new_tokens
                if worst > limit:
                    raise ValueError(
                        f"tokens {t}: a {task} context with its question and answer ({worst} tokens) exceeds the "
                        f"models' {limit} positions."
                    )
    return samples


# ---- running ---------------------------------------------------------------------------------------------------


def prompt_parts(tokenizer) -> tuple[str, str]:
    """The chat template around one user message: what comes before it and what comes after it, the assistant's
    turn opened."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return head, tail


def encode(tokenizer, sample: Sample, question: Question) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[1, c]`` of the context (the template's head first) and ``[1, q]`` of the question, the template's
    tail and the answer's prefix; the context ids are the same for every question of a sample."""
    head, tail = prompt_parts(tokenizer)
    ids = lambda text: torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    return ids(head + sample.context), ids("\n\n" + question.text + tail + question.prefix)


def correct(prediction: str, answers: Sequence[str]) -> bool:
    """Whether every expected string appears in the prediction (RULER's string match, all of them required)."""
    return all(a.lower() in prediction.lower() for a in answers)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of ``k`` successes in ``n`` trials."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def answer(iam, tokenizer, sample: Sample, protocol: str, max_new_tokens: int | None = None) -> list[tuple[str, dict, float]]:
    """Each question of ``sample`` answered greedily by ``iam`` (an ``IAMForCausalLM``) under ``protocol``; returns
    ``(prediction, kv_bytes, seconds)`` per question, the prediction being the answer's first line, ``kv_bytes`` the
    cache's (``IAMCache.kv_bytes``) with ``scoring_s``, its seconds of eviction scoring by a repeat pass, per question.
    Under ``agnostic`` the context is prefilled once (and, with an eviction policy, compressed) and every question
    continues a copy of that cache through ``generate()``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    task = TASKS[sample.task]
    limit = max_new_tokens or task.max_new_tokens
    out = []
    context_cache, prefill_s = None, 0.0
    for question in sample.questions:
        context, asked = encode(tokenizer, sample, question)
        ids = torch.cat([context, asked], -1).to(iam.device)
        start = time.perf_counter()
        if protocol == "agnostic":
            if context_cache is None:
                context_cache = iam.new_cache()
                iam(context.to(iam.device), cache=context_cache, logits_to_keep=1)
                prefill_s = time.perf_counter() - start
                start = time.perf_counter()
            cache = copy.deepcopy(context_cache)
        else:
            cache = iam.new_cache()
        generated = iam.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        seconds = time.perf_counter() - start + prefill_s / len(sample.questions)
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        share = len(sample.questions) if protocol == "agnostic" else 1  # one scoring pass serves every question
        kv = {**cache.kv_bytes(), "scoring_s": cache.scoring_s / share}
        out.append((text.strip().split("\n")[0], kv, seconds))  # the answer's first line
    return out


# ---- configurations and the side-by-side run --------------------------------------------------------------------


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


def eval_retrieval(
    llm,
    slm,
    tokenizer,
    base,
    setups: Sequence[Setup],
    samples: dict[tuple[str, int], list[Sample]],
    protocol: str = "agnostic",
    bins: int = 5,
    done: dict | None = None,
    record=None,
    progress: bool = True,
) -> dict:
    """Every configuration of ``setups`` on the same samples of each task at each context length, side by side.

    Parameters
    ----------
    base : the ``MappingConfig`` every setup varies (ratio and local window).
    samples : the samples by task and context length (``samples_for``).
    done : answers already measured, by ``(label, task, tokens, sample)``: reused, not run again (resuming), where
        they answer each of the sample's questions.
    record : called with ``(key, answers)`` after each sample is measured (e.g. to append it to a file).

    Returns
    -------
    A dict with ``rows`` (one per configuration, task and length; see ``summarize``) and ``examples``.
    """
    from tqdm.auto import tqdm

    done = dict(done or {})
    total = len(setups) * sum(len(s.questions) for ss in samples.values() for s in ss)
    bar = tqdm(total=total, desc="retrieval", unit="question", disable=not progress)
    rows, examples = [], {}
    for setup in setups:
        iam = None
        for (task, t), sample_list in samples.items():
            answers = []
            for i, sample in enumerate(sample_list):
                key = (setup.label, task, t, i)
                if len(done.get(key, ())) != len(sample.questions):
                    iam = iam or build(llm, slm, base, setup, repeat_prompt(tokenizer))
                    result = []
                    for j, (question, (text, kv, seconds)) in enumerate(
                        zip(sample.questions, answer(iam, tokenizer, sample, protocol))
                    ):
                        result.append(
                            {
                                "question": j,
                                "depth": question.depth,
                                "correct": correct(text, question.answers),
                                "prediction": text,
                                "expected": list(question.answers),
                                **kv_shares(kv),
                                "seconds": seconds,
                                "scoring_seconds": kv["scoring_s"],
                                "context_tokens": sample.tokens,
                            }
                        )
                    done[key] = result
                    if record is not None:
                        record(key, result)
                bar.update(len(sample.questions))
                bar.set_postfix_str(setup.label)
                answers += [dict(a, sample=i) for a in done[key]]
            row = summarize(setup, task, answers, bins, [s.context for s in sample_list])
            row["tokens"] = t
            rows.append(row)
            examples.setdefault(setup.label, {})[f"{task}/{t}"] = answers[:4]
    bar.close()
    frontier(rows)
    return {"rows": rows, "examples": examples, "protocol": protocol, "depth_bins": bins}


def demo(llm, slm, tokenizer, base, setups: Sequence[Setup], tokens: int = 1024, seed: int = 0) -> list[dict]:
    """One multikey context of about ``tokens`` tokens, cached and then asked about each of its needles, by each of
    ``setups``: per setup its answers, how many are right, and the LLM KV it dropped."""
    sample = make_samples(tokenizer, "multikey", 1, tokens, seed)[0]
    configs = [({"method": s.label}, configured(base, s), s.eviction(repeat_prompt(tokenizer))) for s in setups]

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        answers = answer(iam, tokenizer, sample, "agnostic")
        kv = answers[-1][1]
        return {
            "answers": [text for text, _, _ in answers],
            "expected": [q.answers[0] for q in sample.questions],
            "correct": sum(correct(text, q.answers) for (text, _, _), q in zip(answers, sample.questions)),
            "llm_kv_dropped": 1 - kv["llm"] / kv["baseline"],
            "seconds": sum(sec for _, _, sec in answers),
        }

    return side_by_side(llm, slm, configs, score, progress=False)


# ---- resuming ---------------------------------------------------------------------------------------------------


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
