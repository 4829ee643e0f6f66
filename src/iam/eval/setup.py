"""The one typed configuration of a run (``Setup``): a mapping, an exact local window, an eviction policy and the
caches' precision. Evaluations, benches and the GPU check build them from values; its label is derived from them,
and the text grammar (``llm|iam<ratio>``, then ``+w<window>``, ``+b<blend>``, ``+<policy>@<budget>[:unmapped]``,
``+int8``/``+int4``, ``+slm-int8``/``+slm-int4``: ``parse_setups``) is read only where a command line gives configurations."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

from ..core.config import MAX_BLEND, MappingConfig
from ..core.eviction import EvictionPolicy, make_policy, parse_budget
from ..core.kernels import Kernels
from ..core.model import IAMForCausalLM, check_eviction


@dataclass(frozen=True)
class Setup:
    """One configuration of a side-by-side run: a mapping (ratio 0: the LLM alone) and an eviction policy.

    Parameters
    ----------
    ratio, local_window : ``MappingConfig`` fields over the run's base config.
    policy, budget : the eviction policy's name and budget, if any.
    scope : which layers the policy evicts from (``EvictionPolicy.scope``).
    llm_cache : ``MappingConfig.llm_cache``: the LLM's cache in its dtype, as int8 or as int4.
    slm_cache : ``MappingConfig.slm_cache``: the SLM's, likewise.
    blend : ``MappingConfig.blend``: SLM heads per mapped head; ``None``: the run's base config's (``--blend``, else
        the pair's stored blend).
    local_sinks : ``MappingConfig.local_sinks`` of a configuration with a local window (set by ``arranged``, not by
        the label).
    written : the label as a command line wrote it (``parse_setup``), kept for its reports; ``None``: derived.
    """

    ratio: float = 0.0
    local_window: int = 0
    policy: str | None = None
    budget: float | int | None = None
    scope: str = "all"
    llm_cache: str = "native"
    slm_cache: str = "native"
    blend: int | None = None
    local_sinks: int | None = None
    written: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.slm_cache != "native" and not self.ratio and self.policy != "draft-kvzip":
            raise ValueError(
                f"configuration {self.label!r}: the LLM alone keeps no SLM cache; slm-int8/slm-int4 need iam<ratio>."
            )
        if self.local_window and not self.ratio:
            raise ValueError(f"configuration {self.label!r}: a local window needs mapped layers (iam<ratio> with ratio > 0).")
        if self.blend is not None and not self.ratio:
            raise ValueError(f"configuration {self.label!r}: a blend needs mapped layers (iam<ratio> with ratio > 0).")

    @property
    def label(self) -> str:
        """Its name in reports: as written, else its parts in the grammar's order, e.g. ``iam0.5+w64+h2o@0.5+int8``."""
        if self.written:
            return self.written
        parts = [f"iam{self.ratio}" if self.ratio else "llm"]
        parts += [f"w{self.local_window}"] if self.local_window else []
        parts += [f"b{self.blend}"] if self.blend is not None else []
        if self.policy is not None:
            parts.append(f"{self.policy}@{self.budget}" + (":unmapped" if self.scope == "unmapped" else ""))
        parts += [] if self.llm_cache == "native" else [self.llm_cache]
        parts += [] if self.slm_cache == "native" else [f"slm-{self.slm_cache}"]
        return "+".join(parts)

    @property
    def plain(self) -> bool:
        """Whether this is the LLM alone, as it runs without IAM (no mapping, eviction or quantized cache)."""
        return self.ratio == 0 and self.policy is None and self.llm_cache == "native"

    def eviction(self, prompt: tuple[int, ...] = ()) -> EvictionPolicy | None:
        """The eviction policy, if any; ``prompt``: the repeat instruction of KVzip's policies (``repeat_prompt``)."""
        return make_policy(self.policy, self.budget, self.scope, prompt)


MAPPED_FIELDS = tuple(f.name for f in fields(Setup) if f.name in {g.name for g in fields(MappingConfig)})
"""The ``MappingConfig`` fields a ``Setup`` sets (``configured``): the base config of a run leaves them to each row,
except ``BASE_DEFAULTS``."""

BASE_DEFAULTS = ("blend",)
"""Fields a run's base config may set for every configuration (``--blend``) that a configuration leaves at ``None``."""


def _part(part: str) -> tuple[str, dict]:
    """One ``+``-separated part of a configuration: its kind (each kind at most once per configuration) and the
    ``Setup`` fields it sets."""
    if part == "llm":
        return "mapping", {"ratio": 0.0}
    if part.startswith("iam"):
        ratio = float(part[3:])
        if not 0 < ratio <= 1:
            raise ValueError("iam<ratio> takes a ratio in (0, 1]; the LLM alone is llm")
        return "mapping", {"ratio": ratio}
    if part in ("int8", "int4"):
        return "cache", {"llm_cache": part}
    if part in ("slm-int8", "slm-int4"):
        return "SLM cache", {"slm_cache": part[4:]}
    if re.fullmatch(r"w\d+", part):
        if int(part[1:]) == 0:
            raise ValueError("a window of 0 tokens is no window: leave the part out")
        return "window", {"local_window": int(part[1:])}
    if re.fullmatch(r"b\d+", part):
        if not 1 <= int(part[1:]) <= MAX_BLEND:
            raise ValueError(f"b<blend> takes 1 to {MAX_BLEND} SLM heads per mapped head")
        return "blend", {"blend": int(part[1:])}
    if "@" in part:
        name, _, rest = part.partition("@")
        budget, _, scope = rest.partition(":")
        policy = make_policy(name, parse_budget(budget), scope or "all")  # checks them
        return "eviction", {"policy": name, "budget": policy.budget, "scope": policy.scope}
    raise ValueError("unknown part")


def parse_setup(text: str) -> Setup:
    """One configuration from ``+``-joined parts: ``llm`` (the LLM alone, also implied) or ``iam<ratio>``;
    ``w<window>``, the exact local window of the mapped layers; ``b<blend>``, the SLM heads each mapped head borrows;
    ``<policy>@<budget>``, eviction, ``:unmapped`` after it
    to evict only from the layers that keep K; ``int8`` or ``int4``, the LLM's cache so quantized; ``slm-int8`` or
    ``slm-int4``, the SLM's. E.g. ``llm+snapkv@0.7``, ``llm+kvzip@0.25+int4``, ``iam0.5+w64``,
    ``iam0.5+w64+streaming@0.5:unmapped``, ``iam0.5+w64+b1``, ``iam1.0+w64+int8+slm-int8``. ``ValueError`` naming the part for an
    unknown or bad part, or a second part of one kind (two mappings, windows, blends, evictions or caches)."""
    label = text.strip()
    given: dict = {}
    seen: dict[str, str] = {}  # each kind of part, and the part that gave it
    for part in label.split("+"):
        try:
            kind, values = _part(part)
            if kind in seen:
                raise ValueError(f"a second {kind} part after {seen[kind]!r}: give one")
        except ValueError as e:
            raise ValueError(
                f"configuration {label!r}, part {part!r}: {str(e).rstrip('.')}. Write llm or iam<ratio>, then +w<window>, "
                "+b<blend>, +<policy>@<budget>[:unmapped], +int8 or +int4, +slm-int8 or +slm-int4, each at most once."
            ) from None
        seen[kind] = part
        given.update(values)
    return Setup(**given, written=label)


def parse_setups(text: str, local_sinks: int | None = None) -> list[Setup]:
    """Comma-separated configurations (``parse_setup``), ``arranged``."""
    return arranged([parse_setup(t) for t in text.split(",") if t.strip()], local_sinks)


def arranged(setups: Sequence[Setup], local_sinks: int | None = None) -> list[Setup]:
    """``setups``, each at most once, the LLM alone first (added if missing); ``local_sinks`` goes to those with a
    local window (``ValueError`` where none has one)."""
    if not setups:
        raise ValueError("give at least one configuration.")
    labels = [s.label for s in setups]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"configurations {twice} are given more than once: give each once.")
    if local_sinks is not None:
        if not any(s.local_window for s in setups):
            raise ValueError(f"`local_sinks` {local_sinks} would not be used: no configuration has a local window (+w<window>).")
        setups = [replace(s, local_sinks=local_sinks) if s.local_window else s for s in setups]
    setups = list(setups)
    if not any(s.plain for s in setups):
        setups.insert(0, Setup())
    return sorted(setups, key=lambda s: not s.plain)


def configured(base: MappingConfig, setup: Setup) -> MappingConfig:
    """``base`` (a ``MappingConfig``) with ``setup``'s ``MAPPED_FIELDS`` (a ``BASE_DEFAULTS`` field only where the
    setup gives it). ``ValueError`` where ``base`` sets one of them itself (one of ``BASE_DEFAULTS`` only where the
    setup gives it too), or ``layers`` (which would override every ratio): each configuration runs what its label
    says."""
    if base.layers is not None:
        raise ValueError(
            f"`layers` {base.layers} would map those layers in every configuration, the LLM alone's included, whatever "
            "its label says: configurations map iam<ratio>; give explicit layers without them."
        )
    default = MappingConfig()
    given = [name for name in MAPPED_FIELDS if name not in BASE_DEFAULTS or getattr(setup, name) is not None]
    clash = [  # a base's ratio is always replaced
        f"`{name}` {getattr(base, name)!r}" for name in given if name != "ratio" and getattr(base, name) != getattr(default, name)
    ]
    if clash:
        raise ValueError(
            f"{', '.join(clash)} would apply beside the configurations, whose labels set it: write it in the labels "
            "that take it (+w<window>, +b<blend>, +int8, +int4, +slm-int8, +slm-int4)."
        )
    return replace(base, **{name: getattr(setup, name) for name in given})


def checked_configs(base: MappingConfig, setups: list[Setup]) -> list[MappingConfig]:
    """Each setup's ``MappingConfig`` over ``base`` (``configured``), its eviction checked against it first
    (``check_eviction``), so a bad setup fails before any weights load."""
    configs = [configured(base, s) for s in setups]
    for setup, config in zip(setups, configs):
        check_eviction(config, setup.eviction())
    return configs


def build(
    llm, slm, base: MappingConfig, setup: Setup, prompt: tuple[int, ...] = (), kernels: Kernels = Kernels()
) -> IAMForCausalLM:
    """The ``IAMForCausalLM`` of ``setup`` over ``base`` on ``kernels``; ``prompt`` as for ``Setup.eviction``."""
    return IAMForCausalLM(llm, slm, configured(base, setup), setup.eviction(prompt), kernels)
