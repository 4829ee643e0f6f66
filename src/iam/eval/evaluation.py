"""Quality evaluations (paper §3 and §4.2): perplexity, multiple choice, QA, mapping consistency, layer sweep,
metric comparison and the similarity analysis. Every function runs the LLM alone and IAM side by side and
returns a dict with a ``rows`` list.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.alignment import token_spans
from ..core.config import MappingConfig, check_mapped, mapping_threshold
from ..core.eviction import EvictionPolicy
from ..core.model import IAMForCausalLM
from ..core.selection import layers_worth
from ..reporting import with_baseline


def window_starts(n: int, windows: int, tokens: int) -> list[int]:
    """First token of ``windows`` non-overlapping windows of ``tokens`` tokens, evenly spread over ``n`` tokens."""
    if n < windows * tokens:
        raise ValueError(f"text has {n} tokens, fewer than `windows` {windows} x `tokens` {tokens}.")
    stride = (n - tokens) // max(windows - 1, 1)
    return [i * stride for i in range(windows)]


def text_windows(tokenizer, text: str, windows: int, tokens: int) -> list[torch.Tensor]:
    """``windows`` non-overlapping windows of ``tokens`` tokens, evenly spread over ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[s : s + tokens][None] for s in window_starts(ids.numel(), windows, tokens)]


def window_texts(tokenizer, text: str, windows: int, tokens: int) -> list[str]:
    """The characters of ``windows`` windows of ``tokens`` tokens, evenly spread over ``text`` (the text itself, not
    decoded tokens: what another tokenizer reads too)."""
    _, spans = token_spans(tokenizer, text)
    return [text[spans[s][0] : spans[s + tokens - 1][1]] for s in window_starts(len(spans), windows, tokens)]


def lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens of each of ``texts``."""
    return [len(ids) for ids in tokenizer(list(texts)).input_ids]


@torch.inference_mode()
def perplexity(
    iam: IAMForCausalLM, windows: Sequence[torch.Tensor], progress: bool = True, desc: str = "", context: int | None = None
) -> tuple[float, list[int | str], dict[str, int]]:
    """Perplexity over ``windows``, the units the first window mapped, and its KV bytes at the end of the window.

    Without ``context`` each window is scored in one mapped prefill. With it, the continuation protocol: the first
    ``context`` tokens are prefilled (the mapping is set on them), then the rest is scored teacher-forced in one
    forward over that cache, so what the cache kept is what the continuation reads."""
    if min(w.shape[1] for w in windows) < 2:
        raise ValueError(f"a window of {min(w.shape[1] for w in windows)} token has nothing to score: use `tokens` >= 2.")
    losses, units, kv = [], None, {}
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        if context is None:
            out = iam(w, labels=w)
            loss = out.loss
        else:
            first = iam(w[:, :context], logits_to_keep=1)
            out = iam(w[:, context:], cache=first.cache)
            logits = torch.cat([first.logits[:, -1:], out.logits[:, :-1]], 1)  # position i predicts token i + 1
            loss = F.cross_entropy(logits.flatten(0, 1).float(), w[:, context:].flatten().to(logits.device))
        losses.append(loss.item())
        if units is None:
            units, kv = out.cache.mapping.units if out.cache.established else [], out.cache.kv_bytes()
    return math.exp(sum(losses) / len(losses)), units, kv


def _rows_over(
    configs: Sequence[tuple[dict, MappingConfig]],
    llm,
    slm,
    windows,
    progress: bool,
    context: int | None = None,
    eviction: EvictionPolicy | None = None,
) -> list[dict]:
    """Perplexity per config; the first config is the reference for ``ppl_increase``."""
    if context is None:
        check_mapped([w.shape[1] for w in windows], [c for _, c in configs])
    rows = []
    for label, cfg in tqdm(configs, desc="configs", disable=not progress):
        iam = IAMForCausalLM(llm, slm, cfg, eviction)
        ppl, units, _ = perplexity(iam, windows, progress, desc=str(label), context=context)
        row = dict(label, ppl=ppl, mapped_layers=units)
        row["blend"] = iam.mapping_config.blend if iam.resolved.n_mapped else None  # resolved: the pair's stored one
        rows.append(row)
    base = rows[0]["ppl"]
    for row in rows:
        row["ppl_increase"] = row["ppl"] / base - 1
    return rows


def eval_perplexity(
    llm,
    slm,
    windows,
    ratios: Sequence[float],
    base: MappingConfig,
    progress: bool = True,
    context: int | None = None,
    eviction: EvictionPolicy | None = None,
) -> dict:
    """Perplexity at each ratio, over whole windows or (``context``) their continuations; ratio 0 (the LLM alone)
    is always the first row. With ``eviction`` every row evicts, the LLM alone included; only a continuation reads
    an evicted cache."""
    if context is not None:
        check_context(context, windows[0].shape[1], base, ratios)
    ratios = with_baseline(ratios)
    configs = [({"ratio": r, "strategy": base.strategy, "metric": base.metric}, replace(base, ratio=r)) for r in ratios]
    rows = _rows_over(configs, llm, slm, windows, progress, context, eviction)
    return {"rows": rows, "context": context, "eviction": None if eviction is None else repr(eviction)}


def check_context(context: int, tokens: int, base: MappingConfig, ratios: Sequence[float]) -> None:
    """Raise unless a continuation protocol with ``context`` tokens prefilled is meaningful: tokens left to score,
    and, where IAM maps, a context that reaches ``establish_threshold`` (below it the mapping, and eviction with it,
    would only start in the continuation's own forward)."""
    if not 0 < context < tokens:
        raise ValueError(f"`context` {context} must leave tokens to score: 0 < `context` < {tokens} (`tokens`).")
    if any(r > 0 for r in ratios) and context < base.establish_threshold:
        raise ValueError(
            f"`context` {context} is below establish_threshold {base.establish_threshold}: IAM would map (and evict) only "
            "after the continuation is scored."
        )


def eval_kv_tradeoff(
    llm,
    slm,
    windows: Sequence[torch.Tensor],
    context: int,
    base: MappingConfig,
    ratios: Sequence[float],
    policies: Sequence[str],
    budgets: Sequence[float],
    combined_budgets: Sequence[float],
    local_windows: Sequence[int] = (),
    progress: bool = True,
) -> dict:
    """Quality against KV memory, by the continuation protocol: the LLM alone with each policy at each budget, IAM
    at each ratio (with each of ``local_windows``, the exact local window of the mapped layers, too), and IAM with
    each policy at each of ``combined_budgets``; every point against the LLM alone.

    Rows carry ``llm_kv_dropped`` (of the LLM's own KV, measured on the cache at the end of the first window),
    ``total_kv`` (LLM + SLM over the LLM alone), ``ppl_increase`` of the continuation, ``prefill_flops`` of the
    context relative to the LLM alone (mapping's arithmetic; eviction saves none and its scoring is not counted),
    and ``on_frontier``: no other point drops at least as much of the LLM's KV for a smaller increase."""
    from ..bench.costs import prefill_flops
    from ..core.eviction import make_policy
    from ..models.presets import Arch

    check_context(context, windows[0].shape[1], base, ratios)
    mapped = [r for r in ratios if r]
    points = [(0.0, 0, None, None)] + [(0.0, 0, p, b) for p in policies for b in budgets]
    points += [(r, 0, None, None) for r in mapped] + [(r, w, None, None) for w in local_windows if w for r in mapped]
    points += [(r, 0, p, b) for p in policies for b in combined_budgets for r in mapped]
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    rows = []
    for r, w, policy, budget in tqdm(points, desc="kv-tradeoff", disable=not progress):
        config = replace(base, ratio=r, local_window=w, local_sinks=base.local_sinks if w else None)
        iam = IAMForCausalLM(llm, slm, config, make_policy(policy, budget))
        ppl, units, kv = perplexity(iam, windows, progress=False, context=context)
        n = layers_worth(units, big.kv_heads)
        local = config.sinks + w if w else 0
        method = ("IAM" if r else "LLM alone") + (f", exact window {w}" if w else "") + (f" + {policy}" if policy else "")
        rows.append(
            {
                "method": method,
                "ratio": r,
                "local_window": w,
                "eviction": policy,
                "budget": budget,
                "ppl": ppl,
                "llm_kv_dropped": 1 - kv["llm"] / kv["baseline"],
                "total_kv": kv["total"] / kv["baseline"],
                "prefill_flops": prefill_flops(big, small, n, context, local) / prefill_flops(big, small, 0, context),
                "mapped_layers": units,
            }
        )
    for row in rows:
        row["ppl_increase"] = row["ppl"] / rows[0]["ppl"] - 1
    for row in rows:
        row["on_frontier"] = not any(dominates(other, row) for other in rows)
    return {"rows": rows, "context": context, "tokens": windows[0].shape[1]}


def dominates(a: dict, b: dict, quality: Callable[[dict], float] = lambda r: -r["ppl_increase"]) -> bool:
    """Whether point ``a`` drops at least as much of the LLM's KV as ``b`` with at least its ``quality`` (higher is
    better; default: a smaller perplexity increase), and is strictly better in one."""
    more, better = a["llm_kv_dropped"] >= b["llm_kv_dropped"], quality(a) >= quality(b)
    return more and better and (a["llm_kv_dropped"], quality(a)) != (b["llm_kv_dropped"], quality(b))


def eval_metrics(llm, slm, windows, ratio: float, base: MappingConfig, metrics: Sequence[str], progress: bool = True) -> dict:
    """Perplexity under each similarity metric at one ratio (paper Table 1)."""
    if not (ratio > 0 or base.layers):
        raise ValueError(f"`ratio` {ratio} maps nothing: every metric's row would be the LLM alone (use `ratio` > 0).")
    configs = [({"metric": "none (LLM alone)", "ratio": 0.0}, MappingConfig(ratio=0.0))]
    configs += [({"metric": m, "ratio": ratio}, replace(base, ratio=ratio, metric=m)) for m in metrics]
    return {"rows": _rows_over(configs, llm, slm, windows, progress)}


def sweep_configs(llm, block: int, base: MappingConfig, per_group: bool = False) -> list[tuple[dict, MappingConfig]]:
    """The LLM alone, then each block of ``block`` consecutive LLM layers mapped in turn (with ``per_group``, each KV
    group of each block; labels then carry ``kv_group``)."""
    n, n_kv = llm.config.num_hidden_layers, llm.config.num_key_value_heads
    configs = [({"block": "none", "first_layer": None}, MappingConfig(ratio=0.0))]
    for start in range(0, n, block):
        layers = list(range(start, min(start + block, n)))
        name = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(start)
        if not per_group:
            configs.append(({"block": name, "first_layer": start}, replace(base, layers=layers)))
            continue
        for g in range(n_kv):
            label = {"block": f"{name}:{g}", "first_layer": start, "kv_group": g}
            configs.append((label, replace(base, layers=[(i, g) for i in layers])))
    return configs


def eval_sweep(llm, slm, windows, block: int, base: MappingConfig, per_group: bool = False, progress: bool = True) -> dict:
    """Map each block of ``block`` consecutive LLM layers in turn (paper §3.2, Fig. 2); with ``per_group``, each KV
    group of each block in turn (rows then carry ``kv_group``)."""
    if block < 1:
        raise ValueError(f"`block` must be a whole number >= 1 (layers per block), got {block}.")
    rows = _rows_over(sweep_configs(llm, block, base, per_group), llm, slm, windows, progress)
    return {"rows": rows, "block": block, "per_group": per_group}


TASKS = {"perplexity": False, "choice": True, "qa": True, "summarize": True}
"""The tasks of a multi-task sweep, and whether a higher score is better (perplexity; accuracy; token F1; ROUGE-L)."""


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences; ``None`` where either is constant (it is undefined)."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return None if denominator == 0 else (a @ b).item() / denominator


def eval_task_sweep(
    llm,
    slm,
    tasks: dict[str, Callable[[IAMForCausalLM], float]],
    block: int,
    base: MappingConfig,
    per_group: bool = False,
    progress: bool = True,
) -> dict:
    """The block sweep on several tasks (paper Table 3): each block mapped in turn, every task scored (``tasks``:
    name in ``TASKS`` -> score of an ``IAMForCausalLM``); rows carry each task's score. ``correlation``: per task,
    the Pearson correlation over the blocks of its quality (perplexity negated) with the first task's: 1 where both
    rank the blocks' damage alike."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown sweep tasks {sorted(unknown)}; use some of {', '.join(TASKS)}.")
    rows = []
    for label, config in tqdm(sweep_configs(llm, block, base, per_group), desc="sweep", disable=not progress):
        iam = IAMForCausalLM(llm, slm, config)
        rows.append(dict(label, **{name: score(iam) for name, score in tasks.items()}))
    quality = {t: [v if TASKS[t] else -v for v in (r[t] for r in rows[1:])] for t in tasks}
    first = next(iter(tasks))
    correlation = {t: pearson(quality[t], quality[first]) for t in tasks}
    return {"rows": rows, "block": block, "per_group": per_group, "tasks": list(tasks), "correlation": correlation}


def kl_damage(llm, slm, windows: Sequence[torch.Tensor], base: MappingConfig) -> Callable[[list[int]], float]:
    """A damage function for calibration: mapping ``layers`` costs the mean per-token KL(LLM alone || IAM), in nats,
    over ``windows``. Unlike a perplexity difference it is never negative, so single-window noise does not cancel.
    The LLM-alone reference is computed on the first call."""
    reference: list[torch.Tensor] = []
    check_mapped([w.shape[1] for w in windows], [replace(base, layers=[0])])

    def damage(layers: list[int]) -> float:
        if not reference:
            with torch.inference_mode():
                reference.extend(llm(w.to(llm.device)).logits.float().log_softmax(-1) for w in windows)
        iam = IAMForCausalLM(llm, slm, replace(base, layers=layers))
        with torch.inference_mode():
            kls = [
                F.kl_div(iam(w).logits.float().log_softmax(-1), ref, log_target=True, reduction="none").sum(-1).mean().item()
                for w, ref in zip(windows, reference)
            ]
        return sum(kls) / len(kls)

    return damage


def eval_similarity(llm, slm, windows, base: MappingConfig, progress: bool = True) -> dict:
    """Per LLM layer, the mean best-match similarity, and the LLM-layer x SLM-layer heatmap (mean over heads of
    the best head in that SLM layer)."""
    check_mapped([w.shape[1] for w in windows], [replace(base, ratio=1.0)])  # a mapping's window: no fewer tokens
    iam = IAMForCausalLM(llm, slm, replace(base, ratio=0.0))
    sim = torch.cat([iam.head_similarity(w) for w in tqdm(windows, desc="similarity", disable=not progress)], 1)  # [L, B, H, S]
    return similarity_summary(sim, slm.config.num_attention_heads, base.metric)


def similarity_summary(sim: torch.Tensor, slm_heads: int, metric: str) -> dict:
    """The similarity report from ``sim`` ``[L, B, H, L_s * H_s]`` (every LLM head against every SLM (layer, head),
    per window): per LLM layer the mean best-match similarity and the best SLM layer, the heatmap and the mean."""
    heat = sim.unflatten(-1, (-1, slm_heads)).amax(-1).mean((1, 2))  # [L, L_s]
    best = sim.amax(-1).mean((1, 2))
    rows = [
        {"llm_layer": i, "mean_best_similarity": best[i].item(), "best_slm_layer": int(heat[i].argmax())}
        for i in range(len(best))
    ]
    return {"rows": rows, "heatmap": heat.tolist(), "metric": metric, "mean": best.mean().item()}


def eval_consistency(llm, slm, tokenizer, windows, ratio: float, steps: int, base: MappingConfig, progress: bool = True) -> dict:
    """Paper §3.3: as decoding proceeds, does each mapped head's best match (recomputed on the whole growing
    context) stay the one chosen at prefill? Per mapped layer, the fraction of steps where it does."""
    if not (ratio > 0 or base.layers):
        raise ValueError(f"`ratio` {ratio} maps nothing: consistency follows the mapped layers' matches (use `ratio` > 0).")
    if steps < 1:
        raise ValueError(f"`steps` must be a whole number >= 1 (decode steps followed), got {steps}.")
    check_mapped([w.shape[1] for w in windows], [replace(base, ratio=ratio)])
    iam = IAMForCausalLM(llm, slm, replace(base, ratio=ratio))
    probe = IAMForCausalLM(llm, slm, replace(base, ratio=0.0))
    agree: dict[int, list[float]] = {}
    for w in tqdm(windows, desc="consistency", disable=not progress):
        out = iam.generate(w, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
        mapping, seq = out.cache.mapping, out.sequences
        layers = mapping.mapped_layers
        best = [
            probe.head_similarity(seq[:, :k], truncation_threshold=k)[layers].argmax(-1)
            for k in range(w.shape[1], seq.shape[1] + 1)
        ]
        for j, layer in enumerate(layers):
            heads = mapping.layers[layer].heads  # a partly mapped layer: its mapped groups' heads only
            same = torch.stack([(b[j][:, heads] == best[0][j][:, heads]).float().mean() for b in best[1:]])
            agree.setdefault(layer, []).append(same.mean().item())
    rows = [{"llm_layer": layer, "consistency": sum(v) / len(v)} for layer, v in agree.items()]
    return {"rows": rows, "steps": steps, "ratio": ratio, "mean": sum(r["consistency"] for r in rows) / len(rows)}


# ---- generated answers and multiple choice ------------------------------------------------------------------------
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
    check_mapped(lengths(tokenizer, qa_prompts(tokenizer, pairs)), [replace(base, ratio=r) for r in ratios], "a prompt")
    rows, examples = [], {}
    for r in with_baseline(ratios):
        iam = IAMForCausalLM(llm, slm, replace(base, ratio=r))
        scores = qa_scores(iam, tokenizer, pairs, max_new_tokens, batch_size, progress, f"qa ratio {r}")
        answers = scores.pop("answers")
        rows.append({"ratio": r, "strategy": base.strategy, **scores, "n": len(pairs)})
        examples[str(r)] = [{"question": q, "gold": g, "answer": a.strip()} for (q, g), a in list(zip(pairs, answers))[:5]]
    return {"rows": rows, "examples": examples}


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
    items, short = mappable_choices(tokenizer, items, [replace(base, ratio=r) for r in ratios])
    items = items[:limit]
    rows = []
    for r in with_baseline(ratios):
        iam = IAMForCausalLM(llm, slm, replace(base, ratio=r))
        accuracy = choice_accuracy(iam, tokenizer, items, progress, f"choice ratio {r}")
        rows.append({"ratio": r, "strategy": base.strategy, "accuracy": accuracy, "n": len(items)})
    return {"rows": rows, "skipped": {"shorter than establish_threshold": short}}


# ---- summarization -------------------------------------------------------------------------------------------------
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
    check_mapped(lengths(tokenizer, prompts), [replace(base, ratio=r) for r in ratios], "a document prompt")
    references = [d["summary"] for d in kept]
    rows, examples = [], {}
    for r in with_baseline(ratios):
        iam = IAMForCausalLM(llm, slm, replace(base, ratio=r))
        scores = summary_scores(iam, tokenizer, prompts, references, max_new_tokens, progress, f"summarize ratio {r}")
        summaries = scores.pop("summaries")
        rows.append({"ratio": r, "strategy": base.strategy, **scores, "n": len(kept)})
        examples[str(r)] = [{"title": d["title"], "summary": s.strip()} for d, s in list(zip(kept, summaries))[:3]]
    settings = {"greedy": True, **SUMMARY_SETTINGS, "max_new_tokens": max_new_tokens, "context": context}
    return {"rows": rows, "examples": examples, "generation": settings, "skipped": {"shorter than --min-tokens": short}}
