"""Generation tasks: questions answered (token F1, exact match), multiple choice (log-likelihood accuracy) and
summaries (ROUGE). Each has a scorer of one ``IAMForCausalLM`` and an ``eval_*`` that runs it side by side."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..core.config import MappingConfig, check_mapped, mapping_threshold
from ..core.model import IAMForCausalLM
from .runs import Config, ratio_configs, side_by_side
from .windows import lengths


def generate_texts(
    iam: IAMForCausalLM, tokenizer, prompts: Sequence[str], batch_size: int, progress: bool = False, desc: str = "", **kwargs
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches of ``batch_size``), ``kwargs`` going to ``generate``."""
    texts = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True)
        out = iam.generate(**batch, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)
        texts += tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def generated_side_by_side(
    llm,
    slm,
    configs: Sequence[Config],
    score: Callable[[IAMForCausalLM, dict], dict],
    texts: str,
    example: Callable[[int, str], dict],
    count: int,
    progress: bool = True,
) -> tuple[list[dict], dict[str, list[dict]]]:
    """``side_by_side`` for a generation task whose ``score`` also returns the generated texts (under ``texts``):
    the rows without them, and per ratio the first ``count`` as examples (``example(i, text)`` for input ``i``)."""
    rows = side_by_side(llm, slm, configs, score, progress=progress)
    examples = {str(row["ratio"]): [example(i, t.strip()) for i, t in enumerate(row.pop(texts)[:count])] for row in rows}
    return rows, examples


# ---- questions answered --------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> list[str]:
    """HotpotQA/SQuAD normalization: lower-case, drop punctuation and articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_prompts(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Each question in the tokenizer's chat template, asking for just the answer."""
    instruction = "Answer with just the answer, no explanation.\n\n"
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": instruction + q}], tokenize=False, add_generation_prompt=True)
        for q, _ in pairs
    ]


def qa_scores(
    iam: IAMForCausalLM,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    max_new_tokens: int = 24,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "qa",
) -> dict:
    """Generated answers to ``pairs`` scored by mean token F1 and exact match (as HotpotQA is scored)."""
    answers = generate_texts(
        iam, tokenizer, qa_prompts(tokenizer, pairs), batch_size, progress, desc, max_new_tokens=max_new_tokens
    )
    f1 = [token_f1(a, g) for a, (_, g) in zip(answers, pairs)]
    em = [float(normalize_answer(a) == normalize_answer(g)) for a, (_, g) in zip(answers, pairs)]
    return {"f1": sum(f1) / len(f1), "exact_match": sum(em) / len(em), "answers": answers}


def eval_qa(
    llm,
    slm,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    ratios: Sequence[float],
    base: MappingConfig,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Generated answers scored by token F1 and exact match, at each ratio."""
    configs = ratio_configs(base, ratios)
    check_mapped(lengths(tokenizer, qa_prompts(tokenizer, pairs)), [c for _, c in configs], "a prompt")

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        desc = f"qa ratio {label['ratio']}"
        return {**qa_scores(iam, tokenizer, pairs, max_new_tokens, batch_size, progress, desc), "n": len(pairs)}

    rows, examples = generated_side_by_side(
        llm, slm, configs, score, "answers", lambda i, a: {"question": pairs[i][0], "gold": pairs[i][1], "answer": a}, 5, progress
    )
    return {"rows": rows, "examples": examples}


# ---- multiple choice -----------------------------------------------------------------------------------------------
@torch.inference_mode()
def choice_logprob(iam: IAMForCausalLM, tokenizer, prompt: str, options: Sequence[str]) -> list[float]:
    """Length-normalised log-likelihood of each option after ``prompt`` (one left-padded batch)."""
    n_prompt = len(tokenizer(prompt).input_ids)
    batch = tokenizer([prompt + " " + o for o in options], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    logp = iam(ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    starts = ids.shape[1] - mask.sum(-1) + n_prompt  # first option token of each row
    pos = torch.arange(1, ids.shape[1])[None]
    scored = (pos >= starts[:, None]) & mask[:, 1:].bool()
    return ((token_logp * scored).sum(-1) / scored.sum(-1).clamp_min(1)).tolist()


def choice_prompt(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer:"


def choice_lengths(tokenizer, items: Sequence[dict]) -> list[int]:
    """Tokens of each item's prompt with each of its options (what ``choice_logprob`` reads)."""
    return lengths(tokenizer, [choice_prompt(item) + " " + o for item in items for o in item["choices"]])


def choice_accuracy(iam: IAMForCausalLM, tokenizer, items: Sequence[dict], progress: bool = False, desc: str = "choice") -> float:
    """Multiple-choice accuracy by length-normalised log-likelihood (MMLU-style items)."""
    correct = 0
    for item in tqdm(items, desc=desc, disable=not progress):
        scores = choice_logprob(iam, tokenizer, choice_prompt(item), item["choices"])
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return correct / len(items)


def mappable_choices(tokenizer, items: Sequence[dict], configs: Sequence[MappingConfig]) -> tuple[list[dict], int]:
    """The items on which each of ``configs`` that maps anything sets its mapping (the question with every option
    reaches ``establish_threshold``), and how many others were skipped; ``ValueError`` where none is left."""
    threshold = mapping_threshold(configs)
    kept = [item for item in items if min(choice_lengths(tokenizer, [item])) >= threshold]
    if not kept:
        check_mapped(choice_lengths(tokenizer, items), configs, "a question with an option")
    return kept, len(items) - len(kept)


def eval_choice(
    llm,
    slm,
    tokenizer,
    items: Sequence[dict],
    ratios: Sequence[float],
    base: MappingConfig,
    progress: bool = True,
    limit: int | None = None,
) -> dict:
    """Multiple-choice accuracy at each ratio, on the first ``limit`` items where IAM sets a mapping (the LLM alone
    scores the same ones; the others are counted in ``skipped``)."""
    configs = ratio_configs(base, ratios)
    items, short = mappable_choices(tokenizer, items, [c for _, c in configs])
    items = items[:limit]

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        return {"accuracy": choice_accuracy(iam, tokenizer, items, progress, f"choice ratio {label['ratio']}"), "n": len(items)}

    rows = side_by_side(llm, slm, configs, score, progress=progress)
    return {"rows": rows, "skipped": {"shorter than establish_threshold": short}}


# ---- summaries -----------------------------------------------------------------------------------------------------
SUMMARY_INSTRUCTION = "Summarize the following article in a few sentences.\n\n"
SUMMARY_SETTINGS = {"repetition_penalty": 1.2}
"""The paper's generation settings for summaries: greedy (as every generation here) with a repetition penalty."""


def summary_prompts(tokenizer, docs: Sequence[dict], context: int, min_tokens: int) -> tuple[list[str], list[dict], int]:
    """Chat prompts asking for a summary of each document, cut to its first ``context`` tokens. A document of fewer
    than ``min_tokens`` tokens is skipped. Returns the prompts, their documents and how many were skipped."""
    if not 0 < min_tokens <= context:
        raise ValueError(f"need 0 < `min_tokens` {min_tokens} <= `context` {context}.")
    prompts, kept = [], []
    for doc in docs:
        ids = tokenizer(doc["document"], add_special_tokens=False).input_ids
        if len(ids) < min_tokens:
            continue
        message = SUMMARY_INSTRUCTION + tokenizer.decode(ids[:context])
        prompts.append(
            tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        )
        kept.append(doc)
    return prompts, kept, len(docs) - len(kept)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 by Google's ``rouge-score`` (Porter stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise FileNotFoundError("ROUGE needs the rouge-score package: pip install 'iam-llm[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def summary_scores(
    iam: IAMForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    max_new_tokens: int = 512,
    progress: bool = False,
    desc: str = "summarize",
) -> dict:
    """Summaries of ``prompts`` (one at a time: documents differ much in length) scored by ROUGE against
    ``references``; also returns the summaries."""
    summaries = generate_texts(iam, tokenizer, prompts, 1, progress, desc, max_new_tokens=max_new_tokens, **SUMMARY_SETTINGS)
    return {**rouge(summaries, references), "summaries": summaries}


def eval_summarize(
    llm,
    slm,
    tokenizer,
    docs: Sequence[dict],
    ratios: Sequence[float],
    base: MappingConfig,
    max_new_tokens: int = 512,
    context: int = 1024,
    min_tokens: int = 64,
    progress: bool = True,
) -> dict:
    """Summaries of ``docs`` (``document``, reference ``summary``; see ``iam.eval.data.load_summaries``) by the LLM
    alone and at each ratio, scored by ROUGE; documents shorter than ``min_tokens`` tokens are skipped (counted
    in ``skipped``)."""
    prompts, kept, short = summary_prompts(tokenizer, docs, context, min_tokens)
    if not kept:
        raise ValueError(f"no document left to summarize: {short} of {len(docs)} are shorter than `min_tokens` {min_tokens}.")
    configs = ratio_configs(base, ratios)
    check_mapped(lengths(tokenizer, prompts), [c for _, c in configs], "a document prompt")
    references = [d["summary"] for d in kept]

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        desc = f"summarize ratio {label['ratio']}"
        return {**summary_scores(iam, tokenizer, prompts, references, max_new_tokens, progress, desc), "n": len(kept)}

    rows, examples = generated_side_by_side(
        llm, slm, configs, score, "summaries", lambda i, s: {"title": kept[i]["title"], "summary": s}, 3, progress
    )
    settings = {"greedy": True, **SUMMARY_SETTINGS, "max_new_tokens": max_new_tokens, "context": context}
    return {"rows": rows, "examples": examples, "generation": settings, "skipped": {"shorter than --min-tokens": short}}
