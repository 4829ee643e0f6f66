"""Measuring a pair's calibration: what mapping each unit (layer or KV group) costs, by a block-1 perplexity sweep
or by greedy forward selection on the KL to the LLM alone, and the order written for ``strategy="auto"``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core import calibration
from ..core.cache import slm_cache
from ..core.config import MappingConfig, check_mapped
from ..core.decoder import Pass, decoder_layers, positions
from ..core.eviction import repeat_scores
from ..core.model import IAMForCausalLM
from ..core.resolution import resolve
from ..core.selection import Unit, unit_label
from ..models.loading import user_calibrations
from .retrieval import Sample, encode, prompt_parts
from .sweep import eval_sweep

COLUMNS = {
    "single": ["block", "ppl", "ppl_increase"],
    "greedy": ["step", "layer", "damage", "measured"],
    "retrieval": ["layer", "retrieval_score"],
}
"""Report columns of each method."""


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


def greedy_order(
    damage: Callable[[list[Unit]], float], units: list[Unit], steps: int, shortlist: int = 4, progress: bool = True
) -> tuple[list[Unit], list[dict]]:
    """Forward selection of the layers to map first.

    Step 1 measures every layer mapped alone. Step k measures the k-1 layers already chosen plus one candidate and
    keeps the cheapest. After step 1 only the ``shortlist`` candidates with the lowest last-measured damage are
    re-measured (lazy greedy: a layer rarely gets cheaper as the mapped set grows). Layers not chosen within
    ``steps`` follow in their last-measured order.

    Parameters
    ----------
    damage : cost of mapping a sorted list of units (lower is better), e.g. mean KL to the LLM alone.
    units : every candidate: the LLM's layers, or its ``(layer, kv_group)`` pairs.
    steps : how many units to choose greedily (e.g. half of them for ratios up to 0.5).
    shortlist : candidates re-measured per step after the first.
    progress : show a progress bar over the measurements.

    Returns
    -------
    The full order of the units, and one row per step: ``step``, ``layer`` (the unit chosen), ``damage`` (of the
    chosen set), ``measured`` (candidates measured in that step).
    """
    n = len(units)
    if not 1 <= steps <= n or shortlist < 1:
        raise ValueError(f"need 1 <= steps <= {n} and shortlist >= 1, got steps={steps}, shortlist={shortlist}.")
    chosen: list[Unit] = []
    estimate: dict[Unit, float] = {}
    rows = []
    total = n + sum(min(shortlist, n - k) for k in range(1, steps))
    bar = tqdm(total=total, desc="calibration", disable=not progress)
    for step in range(1, steps + 1):
        rest = [u for u in units if u not in chosen]
        candidates = rest if step == 1 else sorted(rest, key=estimate.__getitem__)[:shortlist]
        for layer in candidates:
            estimate[layer] = damage(sorted([*chosen, layer]))
            bar.update()
        best = min(candidates, key=estimate.__getitem__)
        chosen.append(best)
        rows.append({"step": step, "layer": best, "damage": estimate[best], "measured": len(candidates)})
    bar.close()
    return chosen + sorted((u for u in units if u not in chosen), key=estimate.__getitem__), rows


def calibrate(
    llm,
    slm,
    windows: Sequence[torch.Tensor],
    base: MappingConfig,
    method: str = "single",
    per_group: bool = False,
    steps: int | None = None,
    shortlist: int = 4,
    source: dict | None = None,
    folder: str | Path | None = None,
) -> dict:
    """Measure the order in which to map the LLM's units, and write it as the pair's calibration.

    Parameters
    ----------
    windows : token windows the damage is measured on.
    base : the mapping settings measured under; its blend is resolved for the pair first (the pair's stored one
        where ``None``) and stored with the order, as is its ``local_window``.
    method : ``"single"``: each unit mapped alone, sorted by its perplexity increase; ``"greedy"``: grow the mapped
        set by the unit that adds least KL to the LLM alone (``greedy_order``).
    per_group : units are ``(layer, kv_group)`` pairs rather than whole layers.
    steps, shortlist : greedy only: units chosen greedily (default: half of them), candidates re-measured per step.
    source : what the windows came from, stored with the order.
    folder : where to write (default: the user's calibration folder, ``user_calibrations``).

    Returns
    -------
    ``rows`` (the sweep's, or one per greedy step), ``order``, ``calibration_file`` and ``method``.
    """
    if method not in COLUMNS:
        raise ValueError(f"method must be one of {sorted(COLUMNS)}, got {method!r}.")
    base = resolve(base, llm.config, slm.config).config  # blend resolved: measured under it, stored with it
    source = dict(source or {})
    if method == "single":
        result = eval_sweep(llm, slm, windows, 1, base, per_group)
        order = calibration.order_from_sweep(result["rows"])
        damage = {r["block"]: r["ppl_increase"] for r in result["rows"][1:]}
    else:
        n, n_kv = llm.config.num_hidden_layers, llm.config.num_key_value_heads
        units = [(i, g) for i in range(n) for g in range(n_kv)] if per_group else list(range(n))
        steps = len(units) // 2 if steps is None else steps
        source.update(steps=steps, shortlist=shortlist, damage="mean token KL(LLM || IAM), nats")
        order, rows = greedy_order(kl_damage(llm, slm, windows, base), units, steps, shortlist)
        for row in rows:  # named as in mapped_layers
            row["layer"] = unit_label(row["layer"])
        result = {"rows": rows}
        damage = {str(r["layer"]): r["damage"] for r in rows}
    path = calibration.write_order(
        llm.config, slm.config, order, damage, source, Path(folder or user_calibrations()), base.blend, base.local_window
    )
    result.update(order=order, calibration_file=str(path), method=method)
    return result


@torch.inference_mode()
def retrieval_scores(llm, tokenizer, samples: Sequence[Sample], progress: bool = True) -> torch.Tensor:
    """``[layers, KV heads]``: how much each KV group of the LLM alone reads the asked fact while it answers, on
    retrieval ``samples`` (the answer teacher-forced). Per question, each query head's score is the attention the
    queries predicting the answer give the answer's tokens in the context (the most any of them gives each token,
    summed over the tokens); a group scores its best head, averaged over the questions. Retrieval heads (DuoAttention,
    RazorAttention) score high."""
    n, n_kv = llm.config.num_hidden_layers, llm.config.num_key_value_heads
    attns = [layer.self_attn for layer in decoder_layers(llm)]
    total, head = torch.zeros(n, n_kv), prompt_parts(tokenizer)[0]
    questions = [(sample, question) for sample in samples for question in sample.questions]
    for sample, question in tqdm(questions, desc="retrieval heads", unit="question", disable=not progress):
        context, asked = encode(tokenizer, sample, question)
        spans = tokenizer(head + sample.context, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
        starts = [(head + sample.context).find(a) for a in question.answers]
        fact = [
            i
            for i, (a, b) in enumerate(spans)
            if any(s >= 0 and a < s + len(x) and b > s for s, x in zip(starts, question.answers))
        ]
        answer = tokenizer(" ".join(question.answers), add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([context, asked, answer[:, :-1]], -1).to(llm.device)
        mask = torch.ones_like(ids)
        cache = slm_cache(llm.config)
        queries = Pass(llm, ids, mask, positions(mask, ids.shape[1]), cache).queries(n)
        for i, attn in enumerate(attns):
            read = repeat_scores(queries[i][:, :, -answer.shape[1] :], cache.layers[i].keys, attn.scaling, mask, ids.shape[1])
            per_head = read[0, :, fact].sum(-1).float().cpu()
            total[i] += per_head.unflatten(0, (n_kv, -1)).amax(1)
    return total / len(questions)


def retrieval_order(scores: torch.Tensor) -> list[tuple[int, int]]:
    """Every ``(layer, kv_group)`` unit, the least retrieval-critical first (``retrieval_scores``; ties: earlier unit)."""
    units = [(i, g) for i in range(scores.shape[0]) for g in range(scores.shape[1])]
    return sorted(units, key=lambda u: (float(scores[u]), u))


RETRIEVAL_SEED = 1
"""Seed of the retrieval calibration's samples: not ``iam eval retrieval``'s default (0), so the order is not measured
on the contexts it is evaluated on."""


def calibrate_retrieval(
    llm,
    slm,
    tokenizer,
    samples: Sequence[Sample],
    base: MappingConfig,
    source: dict | None = None,
    folder: str | Path | None = None,
) -> dict:
    """Measure a retrieval-aware order (``retrieval_scores``: the KV groups that read the asked fact least are mapped
    first) and write it as the pair's calibration, under ``base``'s resolved blend and local window.

    Returns
    -------
    ``rows`` (one per unit, in order: ``layer``, ``retrieval_score``), ``order``, ``calibration_file``, ``method``.
    """
    base = resolve(base, llm.config, slm.config).config
    scores = retrieval_scores(llm, tokenizer, samples)
    order = retrieval_order(scores)
    rows = [{"layer": unit_label(u), "retrieval_score": float(scores[u])} for u in order]
    source = {
        **(source or {}),
        "method": "retrieval",
        "samples": len(samples),
        "questions": sum(len(s.questions) for s in samples),
    }
    damage = {r["layer"]: r["retrieval_score"] for r in rows}
    path = calibration.write_order(
        llm.config, slm.config, order, damage, source, Path(folder or user_calibrations()), base.blend, base.local_window
    )
    return {"rows": rows, "order": order, "calibration_file": str(path), "method": "retrieval"}
