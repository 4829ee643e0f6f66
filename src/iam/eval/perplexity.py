"""Perplexity and its protocols (paper §4.2): whole windows in one mapped prefill, or a continuation read over the
cache a prefilled context left (what eviction is measured by); and the metric comparison (paper Table 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.config import MappingConfig, check_mapped
from ..core.eviction import EvictionPolicy
from ..core.model import IAMForCausalLM
from .runs import Config, ratio_configs, relative_to_first, side_by_side

COLUMNS = ["ratio", "strategy", "metric", "blend", "ppl", "ppl_increase", "mapped_layers"]


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


def perplexity_score(
    iam: IAMForCausalLM, windows: Sequence[torch.Tensor], progress: bool = False, desc: str = "", context: int | None = None
) -> dict:
    """A side-by-side row's perplexity columns: ``ppl``, ``mapped_layers`` and the ``blend`` the pair resolved
    (``None`` where nothing is mapped)."""
    ppl, units, _ = perplexity(iam, windows, progress, desc, context)
    return {"ppl": ppl, "mapped_layers": units, "blend": iam.mapping_config.blend if iam.resolved.n_mapped else None}


def perplexity_rows(
    llm,
    slm,
    configs: Sequence[Config],
    windows: Sequence[torch.Tensor],
    progress: bool = True,
    context: int | None = None,
    eviction: EvictionPolicy | None = None,
) -> list[dict]:
    """Perplexity per configuration, side by side; the first is the reference for ``ppl_increase``."""
    if context is None:
        check_mapped([w.shape[1] for w in windows], [c[1] for c in configs])

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        return perplexity_score(iam, windows, progress, str(label), context)

    return relative_to_first(side_by_side(llm, slm, configs, score, eviction, progress), "ppl", "ppl_increase")


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
    configs = ratio_configs(base, ratios, metric=base.metric)
    rows = perplexity_rows(llm, slm, configs, windows, progress, context, eviction)
    return {"rows": rows, "context": context, "eviction": None if eviction is None else repr(eviction)}


def eval_metrics(llm, slm, windows, ratio: float, base: MappingConfig, metrics: Sequence[str], progress: bool = True) -> dict:
    """Perplexity under each similarity metric at one ratio (paper Table 1)."""
    if not replace(base, ratio=ratio).maps:
        raise ValueError(f"`ratio` {ratio} maps nothing: every metric's row would be the LLM alone (use `ratio` > 0).")
    configs: list[Config] = [({"metric": "none (LLM alone)", "ratio": 0.0}, MappingConfig(ratio=0.0))]
    configs += [({"metric": m, "ratio": ratio}, replace(base, ratio=ratio, metric=m)) for m in metrics]
    return {"rows": perplexity_rows(llm, slm, configs, windows, progress)}
