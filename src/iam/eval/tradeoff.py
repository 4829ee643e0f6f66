"""Quality against KV memory: the LLM alone with each eviction policy, IAM at each ratio (and with the exact local
window), and IAM composed with eviction, scored by the continuation protocol; and the Pareto front over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..core.config import MappingConfig
from ..core.model import IAMForCausalLM
from ..models.presets import Arch, total_kept_at
from .costs import prefill_flops
from .perplexity import check_context, perplexity
from .runs import Config, relative_to_first, side_by_side
from .setup import Setup


def dominates(a: dict, b: dict, quality: Callable[[dict], float] = lambda r: -r["ppl_increase"]) -> bool:
    """Whether point ``a`` drops at least as much of the LLM's KV as ``b`` with at least its ``quality`` (higher is
    better; default: a smaller perplexity increase), and is strictly better in one."""
    more, better = a["llm_kv_dropped"] >= b["llm_kv_dropped"], quality(a) >= quality(b)
    return more and better and (a["llm_kv_dropped"], quality(a)) != (b["llm_kv_dropped"], quality(b))


AXES = {"on_frontier": "llm_kv_dropped", "on_total_frontier": "total_kv_dropped", "on_72b_frontier": "total_kv_dropped_at_72b"}
"""The frontier marks of a row, each on its own KV axis: the LLM's own KV dropped, the total (the SLM's included)
dropped, and the total projected to the paper's pair (``kv_shares``)."""


def kv_shares(kv: dict) -> dict:
    """A cache's KV shares from its ``kv_bytes``: ``llm_kv_dropped``, ``total_kv`` (kept, the SLM's included, over the
    LLM alone's) and ``total_kv_dropped_at_72b``, the total the same configuration would drop at Qwen2-72B with
    Qwen2-0.5B (``presets.total_kept_at``: a projection, arithmetic from the presets)."""
    slm_kept = kv["slm"] / kv["slm_baseline"] if kv["slm_baseline"] else 0.0
    return {
        "llm_kv_dropped": 1 - kv["llm"] / kv["baseline"],
        "total_kv": kv["total"] / kv["baseline"],
        "total_kv_dropped_at_72b": 1 - total_kept_at(kv["llm"] / kv["baseline"], slm_kept),
    }


def mark_frontiers(
    rows: list[dict], quality: Callable[[dict], float], rivals: Callable[[dict, dict], bool] = lambda a, b: True
) -> None:
    """Mark each row on each KV axis of ``AXES``: no rival (``rivals(other, row)``) drops at least as much KV on that
    axis with at least its ``quality`` (higher is better), and is strictly better in one."""
    for row in rows:
        others = [r for r in rows if rivals(r, row)]
        for mark, axis in AXES.items():
            on = lambda r, axis=axis: {"llm_kv_dropped": r[axis], "quality": quality(r)}
            row[mark] = not any(dominates(on(r), on(row), lambda x: x["quality"]) for r in others)


def method(setup: Setup) -> str:
    """A tradeoff row's name, derived from its ``Setup``: ``LLM alone`` or ``IAM``, then its exact window and its
    policy, e.g. ``IAM, exact window 64 + h2o``."""
    window = f", exact window {setup.local_window}" if setup.local_window else ""
    return ("IAM" if setup.ratio else "LLM alone") + window + (f" + {setup.policy}" if setup.policy else "")


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
    ``total_kv`` (LLM + SLM over the LLM alone) and ``total_kv_dropped``, ``total_kv_dropped_at_72b`` (``kv_shares``),
    ``ppl_increase`` of the continuation, ``prefill_flops`` of the context relative to the LLM alone (mapping's
    arithmetic; eviction saves none and its scoring is not counted), and a frontier mark per KV axis (``AXES``):
    ``on_frontier`` when no other point drops at least as much of the LLM's KV for a smaller increase, and so on."""
    check_context(context, windows[0].shape[1], base, ratios)
    mapped = [r for r in ratios if r]
    points = [Setup()] + [Setup(policy=p, budget=b) for p in policies for b in budgets]
    points += [Setup(r) for r in mapped] + [Setup(r, w) for w in local_windows if w for r in mapped]
    points += [Setup(r, policy=p, budget=b) for p in policies for b in combined_budgets for r in mapped]
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    configs: list[Config] = []
    for s in points:  # the base's caches apply to every point, so not ``setup.configured``, which refuses them
        config = replace(
            base, ratio=s.ratio, local_window=s.local_window, local_sinks=base.local_sinks if s.local_window else None
        )
        label = {"method": method(s), "ratio": s.ratio, "local_window": s.local_window, "eviction": s.policy, "budget": s.budget}
        configs.append((label, config, s))

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        ppl, units, kv = perplexity(iam, windows, progress=False, context=context)
        n = iam.resolved.layers_worth
        w = label["local_window"]
        local = iam.mapping_config.sinks + w if w else 0
        shares = kv_shares(kv)
        return {
            "ppl": ppl,
            **shares,
            "total_kv_dropped": 1 - shares["total_kv"],
            "prefill_flops": prefill_flops(big, small, n, context, local) / prefill_flops(big, small, 0, context),
            "mapped_layers": units,
        }

    rows = relative_to_first(side_by_side(llm, slm, configs, score, progress=progress, desc="kv-tradeoff"), "ppl", "ppl_increase")
    mark_frontiers(rows, lambda r: -r["ppl_increase"])
    return {"rows": rows, "context": context, "tokens": windows[0].shape[1]}
