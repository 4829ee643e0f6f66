"""Which LLM layers are mapped: one small strategy class per rule, and a registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
    """Map layers in a measured order, least damaging first (``iam calibrate`` measures and stores it).

    Parameters
    ----------
    order : every LLM layer, least damaging to map first; filled in from the stored calibration of the LLM.
    fallback : strategy used when no order is stored for the LLM (``None``: raise).
    """

    order: tuple[int, ...] = ()
    fallback: str | None = None

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
