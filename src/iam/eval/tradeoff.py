"""Quality against KV memory: the LLM alone with each eviction policy, IAM at each ratio (and with the exact local
window), and IAM composed with eviction, scored by the continuation protocol; and the Pareto front over them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..bench.costs import prefill_flops
from ..core.config import MappingConfig
from ..core.eviction import make_policy
from ..core.model import IAMForCausalLM
from ..models.presets import Arch
from .perplexity import check_context, perplexity
from .runs import Config, relative_to_first, side_by_side


def dominates(a: dict, b: dict, quality: Callable[[dict], float] = lambda r: -r["ppl_increase"]) -> bool:
    """Whether point ``a`` drops at least as much of the LLM's KV as ``b`` with at least its ``quality`` (higher is
    better; default: a smaller perplexity increase), and is strictly better in one."""
    more, better = a["llm_kv_dropped"] >= b["llm_kv_dropped"], quality(a) >= quality(b)
    return more and better and (a["llm_kv_dropped"], quality(a)) != (b["llm_kv_dropped"], quality(b))


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
    check_context(context, windows[0].shape[1], base, ratios)
    mapped = [r for r in ratios if r]
    points = [(0.0, 0, None, None)] + [(0.0, 0, p, b) for p in policies for b in budgets]
    points += [(r, 0, None, None) for r in mapped] + [(r, w, None, None) for w in local_windows if w for r in mapped]
    points += [(r, 0, p, b) for p in policies for b in combined_budgets for r in mapped]
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    configs: list[Config] = []
    for r, w, policy, budget in points:
        config = replace(base, ratio=r, local_window=w, local_sinks=base.local_sinks if w else None)
        method = ("IAM" if r else "LLM alone") + (f", exact window {w}" if w else "") + (f" + {policy}" if policy else "")
        label = {"method": method, "ratio": r, "local_window": w, "eviction": policy, "budget": budget}
        configs.append((label, config, make_policy(policy, budget)))

    def score(iam: IAMForCausalLM, label: dict) -> dict:
        ppl, units, kv = perplexity(iam, windows, progress=False, context=context)
        n = iam.resolved.layers_worth
        w = label["local_window"]
        local = iam.mapping_config.sinks + w if w else 0
        return {
            "ppl": ppl,
            "llm_kv_dropped": 1 - kv["llm"] / kv["baseline"],
            "total_kv": kv["total"] / kv["baseline"],
            "prefill_flops": prefill_flops(big, small, n, context, local) / prefill_flops(big, small, 0, context),
            "mapped_layers": units,
        }

    rows = relative_to_first(side_by_side(llm, slm, configs, score, progress=progress, desc="kv-tradeoff"), "ppl", "ppl_increase")
    for row in rows:
        row["on_frontier"] = not any(dominates(other, row) for other in rows)
    return {"rows": rows, "context": context, "tokens": windows[0].shape[1]}
