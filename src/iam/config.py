"""User-facing configuration of the mapping."""

from __future__ import annotations

from dataclasses import dataclass

from .selection import STRATEGIES
from .similarity import METRICS

SLM_CACHES = ("native", "int8")


@dataclass
class MappingConfig:
    """How IAM maps LLM attention onto SLM attention.

    Parameters
    ----------
    ratio : fraction of LLM layers mapped, in ``[0, 1]``; the count is ``round(ratio * n_layers)``.
    strategy : which layers: ``"auto"`` (the pair's stored calibrated order, else ``"back"``), ``"calibrated"``,
        ``"back"``, ``"front"``, ``"two-region"`` or ``"similar"`` (see ``iam.selection``).
    layers : explicit LLM layer indices; overrides ``ratio`` and ``strategy``.
    metric : similarity used to match heads: ``"cosine"``, ``"pearson"``, ``"minkowski1"``, ``"minkowski2"``,
        ``"cosine-norm"`` (see ``iam.similarity``).
    establish_threshold : context length (tokens) at which the mapping is established.
    truncation_threshold : only the first this-many tokens' attention is compared.
    slm_cache : ``"native"`` (the SLM's own dtype) or ``"int8"`` (K and V as int8 with per-token scales, about
        half the SLM cache bytes in fp16).
    """

    ratio: float = 0.3
    strategy: str = "auto"
    layers: list[int] | None = None
    metric: str = "cosine"
    establish_threshold: int = 20
    truncation_threshold: int = 100
    slm_cache: str = "native"

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio must be a number in [0, 1] (fraction of LLM layers mapped), got {self.ratio!r}.")
        self.ratio = float(self.ratio)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}.")
        if self.slm_cache not in SLM_CACHES:
            raise ValueError(f"slm_cache must be one of {list(SLM_CACHES)}, got {self.slm_cache!r}.")
        if self.layers is not None:
            self.layers = _check_layer_list(self.layers)
        for name in ("establish_threshold", "truncation_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2 (tokens), got {value!r}.")

    def resolve_count(self, n_layers: int) -> int:
        """Number of LLM layers mapped for a model of depth ``n_layers``."""
        return len(self.layers) if self.layers is not None else round(self.ratio * n_layers)


def with_baseline(ratios: list[float]) -> list[float]:
    """``ratios`` with ratio 0 (the LLM alone) first and only once: side-by-side runs compare against it."""
    return [0.0] + [r for r in ratios if r != 0]


def _check_layer_list(layers: object) -> list[int]:
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layers must be a list of integer LLM layer indices, got {layers!r}.")
    if any(i < 0 for i in layers):
        raise ValueError(f"layers must be non-negative LLM layer indices, got {list(layers)}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat an index, got {list(layers)}.")
    return sorted(layers)


def check_layers_in_range(layers: list[int], n_layers: int) -> None:
    """Raise if an explicit layer index does not exist in an LLM of depth ``n_layers``."""
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the LLM has {n_layers} layers (0..{n_layers - 1}).")
