"""The resolved run spec: a ``MappingConfig`` resolved against one LLM/SLM pair (the pair's stored calibration,
order and blend, filled in; checked against the models' shapes; the number of units the plan maps) with the run's
eviction policy and kernels. Built once per model, at load (``iam.core.checks.checked`` validates it), and handed by
``IAMForCausalLM`` to its cache and to each ``MappedAttention``."""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from .calibration import find_calibration, read_calibration
from .config import MappingConfig, check_layers_in_range
from .errors import ConfigError
from .eviction import EvictionPolicy
from .fixed import FixedMapping, read_head_mapping
from .kernels import Kernels
from .selection import STRATEGIES, CalibratedSelection, LayerSelection, Plan


@dataclass(frozen=True)
class Resolved:
    """A ``MappingConfig`` resolved for one LLM/SLM pair, with the run's eviction policy and kernels: everything a
    paired run reads of its settings.

    Parameters
    ----------
    config : the config with ``blend`` resolved (the pair's stored blend where it was ``None``).
    strategy : the layer selection, with the calibrated order filled in where the strategy uses one.
    n_mapped : units the plan maps (whole layers, or KV groups under a per-group order).
    n_kv : the LLM's KV heads per layer.
    fixed : the fixed head mapping of ``config.head_mapping``, read and checked against the pair; else ``None``.
    eviction : the token eviction policy (``iam.core.eviction``), if any.
    kernels : which kernels the mapped layers run.
    """

    config: MappingConfig
    strategy: LayerSelection
    n_mapped: int
    n_kv: int
    fixed: FixedMapping | None = None
    eviction: EvictionPolicy | None = None
    kernels: Kernels = Kernels()

    @property
    def local(self) -> tuple[int, int] | None:
        """``(sinks, window)`` of the exact local window where the mapped layers attend with one; else ``None``."""
        config = self.config
        return (config.sinks, config.local_window) if config.local_window and config.maps else None

    @property
    def partial(self) -> bool:
        """Whether the policy evicts from some layers only (``scope="unmapped"``): the mapped layers and the SLM keep
        every token, and their mask is the caller's."""
        return self.eviction is not None and self.eviction.partial

    def evicts(self, layer: int, plan: Plan | None) -> bool:
        """Whether LLM layer ``layer`` follows the kept set, under the mapping's ``plan`` (``None`` before one)."""
        if self.eviction is None:
            return False
        return not (self.partial and plan is not None and layer in plan)

    @property
    def layers_worth(self) -> float:
        """Whole LLM layers' worth of K the plan drops: a mapped KV group is ``1 / n_kv`` of a layer."""
        if self.fixed is not None:
            return sum(map(len, self.fixed.plan.values())) / self.n_kv
        if self.config.layers is not None:
            return sum(self.n_kv if isinstance(u, int) else 1 for u in self.config.layers) / self.n_kv
        per_group = isinstance(self.strategy, CalibratedSelection) and self.strategy.per_group
        return self.n_mapped / self.n_kv if per_group else float(self.n_mapped)


def resolve(
    config: MappingConfig,
    llm: PretrainedConfig,
    slm: PretrainedConfig,
    eviction: EvictionPolicy | None = None,
    kernels: Kernels = Kernels(),
) -> Resolved:
    """Check ``config`` against the pair's configs (no weights needed) and resolve the stored order and blend; the
    spec carries ``eviction`` and ``kernels`` as they are (``iam.core.checks.checked`` checks them against the rest).

    Raises ``ValueError`` for units outside the LLM, a blend above the SLM's head count, or a calibration file
    written for another pair."""
    n_layers, n_kv = llm.num_hidden_layers, llm.num_key_value_heads
    strategy = STRATEGIES[config.strategy]
    if config.head_mapping is not None:
        fixed = read_head_mapping(config.head_mapping, llm, slm)
        if config.blend not in (None, fixed.blend):
            raise ConfigError(
                "blend", f"{{param}} {config.blend} differs from the {fixed.blend} of head mapping file {config.head_mapping}."
            )
        n_mapped = sum(map(len, fixed.plan.values()))
        return Resolved(replace(config, blend=fixed.blend), strategy, n_mapped, n_kv, fixed, eviction, kernels)
    stored = None
    if isinstance(strategy, CalibratedSelection) and config.layers is None:
        file = config.calibration
        stored = (
            read_calibration(file, llm, slm) if file else find_calibration(llm, slm, config.local_window, config.calibrations)
        )
        if stored is None and strategy.fallback is None:
            raise ValueError("no calibrated layer order is stored for this LLM: run `iam calibrate --llm ... --slm ...` first.")
        strategy = replace(strategy, order=stored.order if stored else ())
    # a copy in any case (the pair's stored blend goes with its stored order), sharing no list with the caller's
    config = replace(config, blend=(stored.blend if stored else 1) if config.blend is None else config.blend)
    slm_heads = slm.num_hidden_layers * slm.num_attention_heads
    if config.blend > slm_heads:
        raise ConfigError(
            "blend",
            f"{{param}} {config.blend} exceeds the SLM's {slm_heads} heads ({slm.num_hidden_layers} layers x "
            f"{slm.num_attention_heads}): each mapped head borrows that many distinct SLM heads.",
        )
    if config.layers is not None:
        check_layers_in_range(config.layers, n_layers, n_kv)
        n_mapped = len(config.layers)
    else:
        n_mapped = strategy.count(n_layers, n_kv, config.ratio)
    return Resolved(config, strategy, n_mapped, n_kv, None, eviction, kernels)
