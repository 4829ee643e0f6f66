"""The two protocols a question is asked under: ``agnostic`` (the context prefilled, and compressed, before the
question arrives) and ``aware`` (the question ends the prefill); the prompt around a sample, its fit in the models'
positions, and the answer's check."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from .tasks import TASKS, Question, Sample, make_samples

PROTOCOLS = ("agnostic", "aware")


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
