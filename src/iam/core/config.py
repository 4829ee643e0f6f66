"""User-facing configuration of the mapping: plain, checked values that read no file of the package (resolving one
against a pair, with its stored calibration, is ``iam.core.resolution``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from .errors import ConfigError
from .families import head_dim, local_windows
from .layers import SLM_CACHES
from .selection import STRATEGIES, CalibratedSelection, Unit
from .similarity import METRICS

MAX_BLEND = 8  # the exact blend fit solves 2^blend - 1 small systems per head


@dataclass(frozen=True)
class MappingConfig:
    """How IAM maps LLM attention onto SLM attention. Immutable: vary one with ``dataclasses.replace``.

    Parameters
    ----------
    ratio : fraction of the LLM's K cache dropped, in ``[0, 1]``: ``round(ratio * n_layers)`` whole layers, or
        ``round(ratio * n_layers * kv_heads)`` KV groups when the calibrated order is per KV group.
    strategy : which layers: ``"auto"`` (the pair's stored calibrated order, else ``"back"``), ``"calibrated"``,
        ``"back"``, ``"front"``, ``"two-region"`` or ``"similar"`` (see ``iam.core.selection``).
    layers : explicit units to map, overriding ``ratio`` and ``strategy``: whole LLM layers (``int``) and single KV
        groups (``(layer, kv_group)``: the group's query heads borrow SLM attention and its K is not cached, while
        the layer's other groups attend as usual).
    metric : similarity used to match heads: ``"cosine"``, ``"pearson"``, ``"minkowski1"``, ``"minkowski2"``,
        ``"cosine-norm"`` (see ``iam.core.similarity``).
    blend : SLM heads each mapped LLM head borrows. 1 is the paper's single best match; ``k > 1`` takes the ``k``
        most similar SLM heads and mixes their attention with non-negative weights summing to one (so every row is
        still a distribution), fit by least squares to the LLM head's window attention. No K either way; the mapped
        heads' prefill attention costs up to ``k`` times as much, and decode gathers ``k`` rows per head. ``None``
        (default): the blend stored with the pair's calibration under ``"auto"``/``"calibrated"`` (docs/results.md
        gives the shipped pair's), else 1. At most ``MAX_BLEND`` (8).
    establish_threshold : context length (tokens) at which the mapping is established.
    truncation_threshold : only the first this-many tokens' attention is compared.
    calibration : a calibration file (``iam calibrate`` writes them) whose order ``"auto"``/``"calibrated"`` use
        instead of the one stored for the pair (an error with any other strategy, or when the file is missing).
    calibrations : a folder of calibrations (``iam calibrate`` writes them) where ``"auto"``/``"calibrated"`` look for
        the pair's stored order before the shipped ones; ``None``: the shipped ones only. ``from_pretrained`` and the
        command line pass the user's folder (``iam.models.loading.user_calibrations``).
    slm_cache : ``"native"`` (the SLM's own dtype), ``"int8"`` (K and V as int8 with per-token scales, about
        half the SLM cache bytes in fp16) or ``"int4"`` (KIVI-style groups with a full-precision residual, see
        ``int4_group``; about a quarter in fp16 at long contexts).
    llm_cache : the same for the LLM's own cache: K and V of its unmapped KV groups, V of its mapped ones. ``"int8"``
        composes with mapping (a mapped layer's V, which its far tokens need, costs about half as much in fp16) and
        applies to the LLM alone too (ratio 0). ``"int4"`` likewise (V-only for mapped groups).
    int4_group : with an int4 cache: tokens per key block and channels per value group (divides the head dimension).
    int4_residual : with an int4 cache: the newest tokens kept in full precision (at least; KIVI's residual).
    local_window : 0 (default) for the paper's mapped layer. ``w > 0``: each mapped head attends exactly, with its
        own Q and K, to the first ``local_sinks`` tokens and the ``w`` most recent ones, and takes only the mass on
        older tokens, and its spread over them, from the borrowed SLM row (see ``iam.core.attention``). The layer
        then caches K for those ``local_sinks + w`` tokens instead of none, and projects Q and K again.
    local_sinks : first tokens of each sequence attended exactly when ``local_window > 0`` (``None``: 4, or
        ``establish_threshold`` if smaller); at most ``establish_threshold``, so that every sequence has them when the
        mapping is set.
    head_mapping : a fixed head mapping file (``iam.core.fixed``; ``iam export-vllm`` writes one): every sequence
        borrows the heads it names, from its first token on (no establishing window), as a served model does. Its
        plan and blend replace ``ratio`` and ``strategy`` (a ``blend`` given must be the file's); ``layers`` and
        ``calibration`` are refused beside it.
    """

    ratio: float = 0.3
    strategy: str = "auto"
    layers: list[Unit] | None = None
    metric: str = "cosine"
    blend: int | None = None
    establish_threshold: int = 20
    truncation_threshold: int = 100
    slm_cache: str = "native"
    llm_cache: str = "native"
    calibration: str | None = None
    calibrations: str | None = None
    local_window: int = 0
    local_sinks: int | None = None
    int4_group: int = 32
    int4_residual: int = 128
    head_mapping: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
            raise ConfigError(
                "ratio", f"{{param}} must be a number in [0, 1] (fraction of LLM layers mapped), got {self.ratio!r}."
            )
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.strategy not in STRATEGIES:
            raise ConfigError("strategy", f"{{param}} must be one of {sorted(STRATEGIES)}, got {self.strategy!r}.")
        if self.metric not in METRICS:
            raise ConfigError("metric", f"{{param}} must be one of {sorted(METRICS)}, got {self.metric!r}.")
        for name in ("slm_cache", "llm_cache"):
            if getattr(self, name) not in SLM_CACHES:
                raise ConfigError(name, f"{{param}} must be one of {list(SLM_CACHES)}, got {getattr(self, name)!r}.")
        for name, least in (("int4_group", 2), ("int4_residual", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(name, f"{{param}} must be an integer >= {least}, got {value!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", _check_layer_list(self.layers))  # a copy: the caller's list stays theirs
        if self.calibration is not None:
            if not isinstance(STRATEGIES[self.strategy], CalibratedSelection) or self.layers is not None:
                raise ConfigError(
                    "calibration",
                    f"{{param}}={self.calibration!r} would not be used: it sets the order of strategy 'auto' or "
                    f"'calibrated' without explicit layers (strategy is {self.strategy!r}"
                    f"{', layers are given' if self.layers is not None else ''}).",
                )
            if not Path(self.calibration).is_file():
                raise ConfigError("calibration", f"{{param}} file {self.calibration!r} does not exist.")
        if self.head_mapping is not None:
            given = [name for name in ("layers", "calibration") if getattr(self, name) is not None]
            if given:
                fixed = f"head_mapping={self.head_mapping!r} fixes the mapped heads"
                raise ConfigError(given[0], f"{fixed}: {', '.join(given)} would not be used.")
            if not Path(self.head_mapping).is_file():
                raise ConfigError("head_mapping", f"{{param}} file {self.head_mapping!r} does not exist.")
        if self.blend is not None and (isinstance(self.blend, bool) or not isinstance(self.blend, int) or self.blend < 1):
            raise ConfigError(
                "blend",
                f"{{param}} must be None (the pair's stored value) or an integer >= 1 (SLM heads mixed per mapped LLM head), "
                f"got {self.blend!r}.",
            )
        if self.blend is not None and self.blend > MAX_BLEND:
            raise ConfigError(
                "blend", f"{{param}} must be at most {MAX_BLEND} (the exact fit solves 2^blend - 1 systems), got {self.blend}."
            )
        for name in ("establish_threshold", "truncation_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(name, f"{{param}} must be an integer >= 2 (tokens), got {value!r}.")
        if not _is_index(self.local_window):
            raise ConfigError(
                "local_window", f"{{param}} must be an integer >= 0 (recent tokens attended exactly), got {self.local_window!r}."
            )
        if self.local_sinks is not None:
            if not self.local_window:
                raise ConfigError("local_sinks", f"{{param}}={self.local_sinks!r} would not be used: it needs local_window > 0.")
            if not _is_index(self.local_sinks) or self.local_sinks > self.establish_threshold:
                raise ConfigError(
                    "local_sinks",
                    f"{{param}} must be an integer in [0, establish_threshold={self.establish_threshold}] (first tokens "
                    f"attended exactly; every sequence has that many when the mapping is set), got {self.local_sinks!r}.",
                )

    @property
    def maps(self) -> bool:
        """Whether the config maps anything (a ratio above 0, explicit layers or a fixed head mapping); ratio 0 without
        either is the LLM alone."""
        return self.ratio > 0 or bool(self.layers) or self.head_mapping is not None

    @property
    def int4(self) -> tuple[int, int]:
        """``(int4_group, int4_residual)``."""
        return self.int4_group, self.int4_residual

    def check_head_dims(self, llm: PretrainedConfig, slm: PretrainedConfig) -> None:
        """Raise ``ValueError`` where an int4 cache's group does not divide its model's head dimension, or its model
        has sliding-window (local) layers, which keep their window only (Gemma)."""
        for role, kind, config in (("LLM", self.llm_cache, llm), ("SLM", self.slm_cache, slm)):
            if kind == "int4" and any(w is not None for w in local_windows(config)):
                raise ConfigError(
                    f"{role.lower()}_cache", f"{{param}}='int4' is not served on the {role}'s sliding-window layers: use int8."
                )
            d = head_dim(config)
            if kind == "int4" and (d % self.int4_group or d % 2):
                raise ConfigError(
                    "int4_group",
                    f"{{param}} {self.int4_group} must divide the {role}'s head dimension {d} ({role.lower()}_cache='int4'): "
                    f"use a divisor of {d}, e.g. {math.gcd(d, 32)}.",
                )

    @property
    def sinks(self) -> int:
        """The sinks the mapped layers attend exactly: ``local_sinks``, or 4 by default (0 without ``local_window``)."""
        if not self.local_window:
            return 0
        return min(4, self.establish_threshold) if self.local_sinks is None else self.local_sinks


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layer_list(layers: object) -> list[Unit]:
    if isinstance(layers, tuple):
        raise ConfigError(
            "layers",
            f"{{param}} must be a list, got the tuple {layers!r}, which reads as either whole layers or one (layer, kv_group) "
            f"unit: write {list(layers)!r} for whole layers, or [{layers!r}] for one KV group.",
        )
    units = [tuple(u) if isinstance(u, list) else u for u in layers] if isinstance(layers, list) else None
    if units is None or not all(_is_index(u) or (isinstance(u, tuple) and len(u) == 2 and all(map(_is_index, u))) for u in units):
        raise ConfigError(
            "layers",
            f"{{param}} must be a list of non-negative LLM layer indices (whole layers) or (layer, kv_group) pairs, got "
            f"{layers!r}.",
        )
    whole = {u for u in units if isinstance(u, int)}
    if len(set(units)) != len(units) or any(isinstance(u, tuple) and u[0] in whole for u in units):
        raise ConfigError("layers", f"{{param}} must name each layer or KV group once, got {list(layers)}.")
    return sorted(units, key=lambda u: (u, -1) if isinstance(u, int) else u)


def check_layers_in_range(layers: list[Unit], n_layers: int, n_kv: int) -> None:
    """Raise if an explicit layer or KV group does not exist in an LLM of depth ``n_layers`` with ``n_kv`` KV heads."""
    bad = [u for u in layers if (u if isinstance(u, int) else u[0]) >= n_layers]
    if bad:
        raise ConfigError("layers", f"{{param}} {bad} out of range: the LLM has {n_layers} layers (0..{n_layers - 1}).")
    bad = [u for u in layers if isinstance(u, tuple) and u[1] >= n_kv]
    if bad:
        raise ConfigError("layers", f"KV groups {bad} out of range: the LLM has {n_kv} KV heads per layer (0..{n_kv - 1}).")


def mapping_threshold(configs: Sequence[MappingConfig]) -> int:
    """Tokens from which each of ``configs`` that maps anything sets its mapping (0 where none maps)."""
    return max((c.establish_threshold for c in configs if c.maps), default=0)


def check_mapped(lengths: Sequence[int], configs: Sequence[MappingConfig], what: str = "a window") -> None:
    """Raise unless each of ``configs`` that maps anything would map on inputs of ``lengths`` tokens: every input
    (and so every batch's shortest row) reaches ``establish_threshold``. Else a row labelled IAM would be the LLM
    alone."""
    threshold = mapping_threshold(configs)
    if min(lengths) < threshold:
        raise ConfigError(
            "establish_threshold",
            f"{what} of {min(lengths)} tokens is below establish_threshold {threshold}: IAM would map nothing on it, and "
            "its row would report the LLM alone as IAM. Use longer inputs or a lower {param}.",
        )
