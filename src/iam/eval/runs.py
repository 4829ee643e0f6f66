"""Side-by-side runs: the LLM alone, then each configuration of IAM, on the same inputs. Every evaluation that
compares configurations builds its rows here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from tqdm.auto import tqdm

from ..core.config import MappingConfig
from ..core.eviction import EvictionPolicy
from ..core.model import IAMForCausalLM
from ..reporting import with_baseline
from .setup import Setup

Config = tuple[dict, MappingConfig] | tuple[dict, MappingConfig, Setup]
"""A configuration of a side-by-side run: its label (the row's identifying columns), its ``MappingConfig`` and,
optionally, the ``Setup`` it runs (its eviction policy)."""


def ratio_configs(base: MappingConfig, ratios: Sequence[float], **label: object) -> list[Config]:
    """``base`` at ratio 0 (the LLM alone), then at each of ``ratios``; labels carry ``ratio``, ``strategy`` and
    ``label``'s extra columns."""
    return [({"ratio": r, "strategy": base.strategy, **label}, replace(base, ratio=r)) for r in with_baseline(ratios)]


def side_by_side(
    llm,
    slm,
    configs: Sequence[Config],
    score: Callable[[IAMForCausalLM, dict], dict],
    eviction: EvictionPolicy | None = None,
    progress: bool = True,
    desc: str = "configs",
    prompt: tuple[int, ...] = (),
) -> list[dict]:
    """Run each configuration on the same inputs, in order (the first, usually the LLM alone, is the reference).

    Parameters
    ----------
    configs : ``(label, config)`` or ``(label, config, setup)``; see ``Config``.
    score : scores one ``IAMForCausalLM`` on the evaluation's inputs; it gets the label too (to name its progress).
    eviction : the policy of every configuration without a ``Setup``.
    prompt : the repeat instruction of KVzip's policies (``Setup.eviction``).

    Returns
    -------
    One row per configuration: its label, then what ``score`` returned.
    """
    rows = []
    for label, config, *setup in tqdm(configs, desc=desc, disable=not progress):
        iam = IAMForCausalLM(llm, slm, config, setup[0].eviction(prompt) if setup else eviction)
        rows.append({**label, **score(iam, label)})
    return rows


def relative_to_first(rows: list[dict], key: str, name: str) -> list[dict]:
    """Add ``name``: each row's ``key`` over the first row's, less one (e.g. the perplexity increase)."""
    for row in rows:
        row[name] = row[key] / rows[0][key] - 1
    return rows
