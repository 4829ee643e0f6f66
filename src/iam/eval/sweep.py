"""Layer sweeps (paper §3.2, Fig. 2 and Table 3): each block of consecutive LLM layers mapped in turn, scored by
perplexity or by several tasks, whose rankings of the blocks are then correlated."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..core.config import MappingConfig, check_mapped
from ..core.model import IAMForCausalLM
from . import data
from .generation import mappable_choices, qa_prompts, summary_prompts
from .perplexity import perplexity_rows
from .runs import Config, side_by_side
from .tasks import TASKS
from .windows import lengths


def sweep_configs(llm, block: int, base: MappingConfig, per_group: bool = False) -> list[Config]:
    """The LLM alone, then each block of ``block`` consecutive LLM layers mapped in turn (with ``per_group``, each KV
    group of each block; labels then carry ``kv_group``)."""
    n, n_kv = llm.config.num_hidden_layers, llm.config.num_key_value_heads
    configs: list[Config] = [({"block": "none", "first_layer": None}, MappingConfig(ratio=0.0))]
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
    rows = perplexity_rows(llm, slm, sweep_configs(llm, block, base, per_group), windows, progress)
    return {"rows": rows, "block": block, "per_group": per_group}


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences; ``None`` where either is constant (it is undefined)."""
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.norm() * b.norm()).item()
    return None if denominator == 0 else (a @ b).item() / denominator


def sweep_scorers(
    tokenizer,
    tasks: Sequence[str],
    base: MappingConfig,
    windows: Sequence[torch.Tensor],
    limit: int,
    tokens: int,
    max_new_tokens: int,
) -> dict[str, Callable[[IAMForCausalLM], float]]:
    """Each of ``tasks`` (names in ``TASKS``) as the score of an ``IAMForCausalLM``, on its data: perplexity on
    ``windows``; choice (trivia with distractors), qa (trivia, token F1) and summarize (Wikipedia body -> lead,
    ROUGE-L, the body cut to ``tokens`` tokens) on their first ``limit`` items, generating up to ``max_new_tokens``.
    Raises where an input would be too short for a mapping (every block of a sweep maps)."""
    mapped = [replace(base, ratio=1.0)]
    scorers = {}
    for name in tasks:
        task = TASKS[name]
        if name == "perplexity":
            check_mapped([w.shape[1] for w in windows], mapped)
            inputs: tuple = (windows,)
        elif name == "choice":
            inputs = (tokenizer, mappable_choices(tokenizer, data.load_items(None, None), mapped)[0][:limit])
        elif name == "qa":
            pairs = data.trivia()[:limit]
            check_mapped(lengths(tokenizer, qa_prompts(tokenizer, pairs)), mapped, "a prompt")
            inputs = (tokenizer, pairs, max_new_tokens)
        else:
            docs, _ = data.load_summaries("wikipedia")
            prompts, kept, _ = summary_prompts(tokenizer, docs[:limit], tokens, min(64, tokens))
            check_mapped(lengths(tokenizer, prompts), mapped, "a document prompt")
            inputs = (tokenizer, prompts, [d["summary"] for d in kept], max_new_tokens)
        scorers[name] = lambda iam, task=task, inputs=inputs: task.score(iam, *inputs)
    return scorers


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
    name in ``TASKS`` -> score of an ``IAMForCausalLM``, e.g. from ``sweep_scorers``); rows carry each task's
    score. ``correlation``: per task, the Pearson correlation over the blocks of its quality (perplexity negated)
    with the first task's: 1 where both rank the blocks' damage alike."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown sweep tasks {sorted(unknown)}; use some of {', '.join(TASKS)}.")

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        return {name: scorer(iam) for name, scorer in tasks.items()}

    rows = side_by_side(llm, slm, sweep_configs(llm, block, base, per_group), score, progress=progress, desc="sweep")
    quality = {t: [v if TASKS[t].higher_is_better else -v for v in (r[t] for r in rows[1:])] for t in tasks}
    first = next(iter(tasks))
    correlation = {t: pearson(quality[t], quality[first]) for t in tasks}
    return {"rows": rows, "block": block, "per_group": per_group, "tasks": list(tasks), "correlation": correlation}
