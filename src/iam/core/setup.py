"""Configurations of a side-by-side run, written as text: ``llm|iam<ratio>``, then ``+w<window>``,
``+<policy>@<budget>[:unmapped]``, ``+int8``/``+int4``, ``+slm-int8``/``+slm-int4`` (``parse_setup``). Evaluations and
benchmarks share them."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .config import MappingConfig
from .eviction import POLICIES, EvictionPolicy, make_policy, parse_budget
from .model import IAMForCausalLM, check_eviction


@dataclass(frozen=True)
class Setup:
    """One configuration of a side-by-side run: a mapping (ratio 0: the LLM alone) and an eviction policy.

    Parameters
    ----------
    label : its name in reports, as written in ``--configs`` (see ``parse_setups``).
    ratio, local_window : ``MappingConfig`` fields over the run's base config.
    policy, budget : the eviction policy's name and budget, if any.
    scope : which layers the policy evicts from (``EvictionPolicy.scope``).
    llm_cache : ``MappingConfig.llm_cache``: the LLM's cache in its dtype, as int8 or as int4.
    slm_cache : ``MappingConfig.slm_cache``, or ``None`` for the run's base config's.
    """

    label: str
    ratio: float = 0.0
    local_window: int = 0
    policy: str | None = None
    budget: float | int | None = None
    scope: str = "all"
    llm_cache: str = "native"
    slm_cache: str | None = None

    @property
    def plain(self) -> bool:
        """Whether this is the LLM alone, as it runs without IAM (no mapping, eviction or quantized cache)."""
        return self.ratio == 0 and self.policy is None and self.llm_cache == "native"

    def eviction(self, prompt: tuple[int, ...] = ()) -> EvictionPolicy | None:
        """The eviction policy, if any; ``prompt``: the repeat instruction of KVzip's policies (``repeat_prompt``)."""
        return make_policy(self.policy, self.budget, self.scope, prompt)


def parse_setup(text: str) -> Setup:
    """One configuration from ``+``-joined parts: ``llm`` (the LLM alone, also implied) or ``iam<ratio>``;
    ``w<window>``, the exact local window of the mapped layers; ``<policy>@<budget>``, eviction, ``:unmapped`` after it
    to evict only from the layers that keep K; ``int8`` or ``int4``, the LLM's cache so quantized; ``slm-int8`` or
    ``slm-int4``, the SLM's. E.g. ``llm+snapkv@0.7``, ``llm+kvzip@0.25+int4``, ``iam0.5+w64``,
    ``iam0.5+w64+streaming@0.5:unmapped``, ``iam1.0+w64+int8+slm-int8``."""
    label = text.strip()
    fields: dict = {}
    for part in label.split("+"):
        try:
            if part == "llm":
                fields["ratio"] = 0.0
            elif part.startswith("iam"):
                fields["ratio"] = float(part[3:])
            elif part in ("int8", "int4"):
                fields["llm_cache"] = part
            elif part in ("slm-int8", "slm-int4"):
                fields["slm_cache"] = part[4:]
            elif re.fullmatch(r"w\d+", part):
                fields["local_window"] = int(part[1:])
            elif "@" in part:
                name, _, rest = part.partition("@")
                budget, _, scope = rest.partition(":")
                if name not in POLICIES:
                    raise ValueError(f"eviction policy must be one of {sorted(POLICIES)}, got {name!r}")
                fields.update(policy=name, budget=parse_budget(budget), scope=scope or "all")
            else:
                raise ValueError(f"unknown part {part!r}")
        except ValueError as e:
            raise ValueError(
                f"configuration {label!r}: {e}. Write llm or iam<ratio>, then +w<window>, +<policy>@<budget>[:unmapped], "
                "+int8 or +int4, +slm-int8 or +slm-int4."
            ) from None
    if fields.get("local_window") and not fields.get("ratio"):
        raise ValueError(f"configuration {label!r}: a local window needs mapped layers (iam<ratio> with ratio > 0).")
    return Setup(label, **fields)


def parse_setups(text: str) -> list[Setup]:
    """Comma-separated configurations (``parse_setup``), the LLM alone first (added if missing)."""
    setups = [parse_setup(t) for t in text.split(",") if t.strip()]
    if not setups:
        raise ValueError("give at least one configuration.")
    if not any(s.plain for s in setups):
        setups.insert(0, Setup("llm"))
    return sorted(setups, key=lambda s: not s.plain)


def configured(base: MappingConfig, setup: Setup) -> MappingConfig:
    """``base`` (a ``MappingConfig``) with ``setup``'s ratio, local window and caches."""
    slm = base.slm_cache if setup.slm_cache is None else setup.slm_cache
    return replace(base, ratio=setup.ratio, local_window=setup.local_window, llm_cache=setup.llm_cache, slm_cache=slm)


def checked_configs(base: MappingConfig, setups: list[Setup]) -> list[MappingConfig]:
    """Each setup's ``MappingConfig`` over ``base``, its eviction checked against it first (``check_eviction``), so a
    bad setup fails before any weights load."""
    configs = [configured(base, s) for s in setups]
    for setup, config in zip(setups, configs):
        check_eviction(config, setup.eviction())
    return configs


def build(llm, slm, base: MappingConfig, setup: Setup, prompt: tuple[int, ...] = ()) -> IAMForCausalLM:
    """The ``IAMForCausalLM`` of ``setup`` over ``base``; ``prompt`` as for ``Setup.eviction``."""
    return IAMForCausalLM(llm, slm, configured(base, setup), setup.eviction(prompt))
