"""Which LLM layers are mapped: one small strategy class per rule, and a registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

Unit = int | tuple[int, int]
"""What can be mapped: a whole LLM layer (``int``) or one KV group of a layer (``(layer, kv_group)``)."""
Plan = dict[int, tuple[int, ...]]
"""Mapped KV groups per mapped LLM layer (all groups of a whole layer)."""


def units_for_ratio(ratio: float, n_layers: int, n_kv: int = 1) -> int:
    """How many units ratio ``ratio`` maps: of ``n_layers`` whole layers, or (``n_kv`` > 1) of their KV groups. The
    one place a ratio becomes a count: every strategy's ``count`` and the analytic bench (whole layers) use it.
    ``ValueError`` for a ratio above 0 that rounds to no unit (a row labelled IAM would be the LLM alone)."""
    units = n_layers * n_kv
    count = round(ratio * units)
    if ratio > 0 and count == 0:
        kind = "KV groups" if n_kv > 1 else "layers"
        raise ValueError(
            f"ratio {ratio} maps none of this LLM's {units} {kind} (it rounds to 0): IAM would be the LLM alone. "
            f"Use a ratio above {0.5 / units:.4g} (e.g. {1 / units:.4g}, one of them), or ratio 0 for the LLM alone."
        )
    return count


def plan_of(units: list[Unit], n_kv: int) -> Plan:
    """The plan mapping these whole layers and single ``(layer, kv_group)`` units."""
    plan: dict[int, list[int]] = {}
    for u in units:
        layer, groups = (u, range(n_kv)) if isinstance(u, int) else (u[0], [u[1]])
        plan.setdefault(layer, []).extend(groups)
    return {layer: tuple(sorted(plan[layer])) for layer in sorted(plan)}


def unit_name(unit: Unit) -> str:
    """``"20"`` for a whole layer, ``"20:1"`` for KV group 1 of layer 20 (the CLI's ``--layers`` syntax)."""
    return str(unit) if isinstance(unit, int) else f"{unit[0]}:{unit[1]}"


def unit_label(unit: Unit) -> int | str:
    """How results name a unit: a whole layer as its ``int``, a KV group as ``"layer:group"``."""
    return unit if isinstance(unit, int) else unit_name(unit)


def parse_unit(text: str) -> Unit:
    """The inverse of ``unit_name``."""
    layer, _, group = text.strip().partition(":")
    return int(layer) if not group else (int(layer), int(group))


def format_plan(plan: Plan, n_kv: int) -> list[int | str]:
    """A plan as the CLI writes it: whole layers as ``int``, single KV groups as ``"layer:group"``."""
    out: list[int | str] = []
    for layer, groups in plan.items():
        out += [layer] if len(groups) == n_kv else [unit_label((layer, g)) for g in groups]
    return out


@dataclass(frozen=True)
class LayerSelection(ABC):
    """Base class: picks ``n_mapped`` of ``n_layers`` LLM layers."""

    needs_scores = False  # whether ``select`` needs per-layer similarity measured on the current input

    @abstractmethod
    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        """
        Parameters
        ----------
        n_layers : depth of the LLM.
        n_mapped : how many layers to map, ``0 <= n_mapped <= n_layers``.
        scores : ``[n_layers]`` mean best-match similarity per layer (only for strategies with ``needs_scores``).

        Returns
        -------
        Sorted LLM layer indices.
        """

    def count(self, n_layers: int, n_kv: int, ratio: float) -> int:
        """How many units the plan at ``ratio`` maps (whole layers, unless the strategy maps KV groups)."""
        return units_for_ratio(ratio, n_layers)

    def plan(self, n_layers: int, n_kv: int, ratio: float, scores: torch.Tensor | None = None) -> Plan:
        """
        Parameters
        ----------
        n_layers, n_kv : depth of the LLM and its KV heads per layer.
        ratio : fraction of the LLM's K cache to drop.
        scores : as for ``select``.

        Returns
        -------
        The mapped KV groups per LLM layer.
        """
        return plan_of(self.select(n_layers, self.count(n_layers, n_kv, ratio), scores), n_kv)


@dataclass(frozen=True)
class BackSelection(LayerSelection):
    """Map the last layers: from the final layer backward (the paper's default)."""

    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        return list(range(n_layers - n_mapped, n_layers))


@dataclass(frozen=True)
class FrontSelection(LayerSelection):
    """Map the first layers, from layer 0 forward."""

    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        return list(range(n_mapped))


@dataclass(frozen=True)
class TwoRegionSelection(LayerSelection):
    """The paper's Qwen2 rule scaled to depth: from the last layer back to ``high`` depth, then from ``low`` onward.

    Parameters
    ----------
    low : fraction of depth where the second region starts (paper: layer 16 of 80).
    high : fraction of depth where the first region stops (paper: layer 64 of 80).
    """

    low: float = 0.2
    high: float = 0.8

    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        top = math.ceil(self.high * n_layers)
        order = list(range(n_layers - 1, top - 1, -1))
        order += [i for i in range(int(self.low * n_layers), n_layers) if i not in order]
        order += [i for i in range(n_layers) if i not in order]
        return sorted(order[:n_mapped])


@dataclass(frozen=True)
class SimilarSelection(LayerSelection):
    """Map the layers whose heads find the most similar SLM heads on the current input."""

    needs_scores = True

    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        if scores is None or scores.shape != (n_layers,):
            raise ValueError(f"'similar' selection needs one score per LLM layer ({n_layers}).")
        return sorted(scores.topk(n_mapped).indices.tolist())


@dataclass(frozen=True)
class CalibratedSelection(LayerSelection):
    """Map layers, or single KV groups, in a measured order, least damaging first (``iam calibrate`` measures and
    stores it).

    Parameters
    ----------
    order : every LLM layer, or every ``(layer, kv_group)``, least damaging to map first; filled in from the
        stored calibration of the pair. With KV groups, ``ratio`` maps ``round(ratio * layers * kv_heads)`` of them.
    fallback : strategy used when no order is stored for the LLM (``None``: raise).
    """

    order: tuple[Unit, ...] = ()
    fallback: str | None = None

    @property
    def per_group(self) -> bool:
        return bool(self.order) and not isinstance(self.order[0], int)

    def count(self, n_layers: int, n_kv: int, ratio: float) -> int:
        return units_for_ratio(ratio, n_layers, n_kv) if self.per_group else super().count(n_layers, n_kv, ratio)

    def plan(self, n_layers: int, n_kv: int, ratio: float, scores: torch.Tensor | None = None) -> Plan:
        if not self.per_group:
            return super().plan(n_layers, n_kv, ratio, scores)
        if sorted(self.order) != [(i, g) for i in range(n_layers) for g in range(n_kv)]:
            raise ValueError(f"the calibrated order does not cover the LLM's {n_layers} layers x {n_kv} KV groups.")
        return plan_of(list(self.order[: self.count(n_layers, n_kv, ratio)]), n_kv)

    def select(self, n_layers: int, n_mapped: int, scores: torch.Tensor | None = None) -> list[int]:
        if not self.order:
            if self.fallback is None:
                raise ValueError(
                    "no calibrated layer order is stored for this LLM: run `iam calibrate --llm ... --slm ...` first."
                )
            return STRATEGIES[self.fallback].select(n_layers, n_mapped, scores)
        if sorted(self.order) != list(range(n_layers)):
            raise ValueError(f"the calibrated order {list(self.order)} does not cover the LLM's {n_layers} layers.")
        return sorted(self.order[:n_mapped])


STRATEGIES: dict[str, LayerSelection] = {
    "back": BackSelection(),
    "front": FrontSelection(),
    "two-region": TwoRegionSelection(),
    "similar": SimilarSelection(),
    "calibrated": CalibratedSelection(),
    "auto": CalibratedSelection(fallback="back"),  # the calibrated order where one is stored, else "back"
}
