"""A ``MappingConfig`` resolved against one LLM/SLM pair: the pair's stored calibration (order and blend) filled in,
checked against the models' shapes, and the number of units the plan maps."""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from .calibration import find_calibration, read_calibration
from .config import MappingConfig, check_layers_in_range
from .fixed import FixedMapping, read_head_mapping
from .selection import STRATEGIES, CalibratedSelection, LayerSelection


@dataclass(frozen=True)
class Resolved:
    """A ``MappingConfig`` resolved for one LLM/SLM pair.

    Parameters
    ----------
    config : the config with ``blend`` resolved (the pair's stored blend where it was ``None``).
    strategy : the layer selection, with the calibrated order filled in where the strategy uses one.
    n_mapped : units the plan maps (whole layers, or KV groups under a per-group order).
    n_kv : the LLM's KV heads per layer.
    fixed : the fixed head mapping of ``config.head_mapping``, read and checked against the pair; else ``None``.
    """

    config: MappingConfig
    strategy: LayerSelection
    n_mapped: int
    n_kv: int
    fixed: FixedMapping | None = None

    @property
    def layers_worth(self) -> float:
        """Whole LLM layers' worth of K the plan drops: a mapped KV group is ``1 / n_kv`` of a layer."""
        if self.fixed is not None:
            return sum(map(len, self.fixed.plan.values())) / self.n_kv
        if self.config.layers is not None:
            return sum(self.n_kv if isinstance(u, int) else 1 for u in self.config.layers) / self.n_kv
        per_group = isinstance(self.strategy, CalibratedSelection) and self.strategy.per_group
        return self.n_mapped / self.n_kv if per_group else float(self.n_mapped)


def resolve(config: MappingConfig, llm: PretrainedConfig, slm: PretrainedConfig) -> Resolved:
    """Check ``config`` against the pair's configs (no weights needed) and resolve the stored order and blend.

    Raises ``ValueError`` for units outside the LLM, a blend above the SLM's head count, or a calibration file
    written for another pair."""
    n_layers, n_kv = llm.num_hidden_layers, llm.num_key_value_heads
    strategy = STRATEGIES[config.strategy]
    if config.head_mapping is not None:
        fixed = read_head_mapping(config.head_mapping, llm, slm)
        if config.blend not in (None, fixed.blend):
            raise ValueError(f"blend {config.blend} differs from the {fixed.blend} of head mapping file {config.head_mapping}.")
        return Resolved(replace(config, blend=fixed.blend), strategy, sum(map(len, fixed.plan.values())), n_kv, fixed)
    stored = None
    if isinstance(strategy, CalibratedSelection) and config.layers is None:
        file = config.calibration
        stored = read_calibration(file, llm, slm) if file else find_calibration(llm, slm, config.local_window)
        if stored is None and strategy.fallback is None:
            raise ValueError("no calibrated layer order is stored for this LLM: run `iam calibrate --llm ... --slm ...` first.")
        strategy = replace(strategy, order=stored.order if stored else ())
    # a copy in any case (the pair's stored blend goes with its stored order), sharing no list with the caller's
    config = replace(config, blend=(stored.blend if stored else 1) if config.blend is None else config.blend)
    slm_heads = slm.num_hidden_layers * slm.num_attention_heads
    if config.blend > slm_heads:
        raise ValueError(
            f"blend {config.blend} exceeds the SLM's {slm_heads} heads ({slm.num_hidden_layers} layers x "
            f"{slm.num_attention_heads}): each mapped head borrows that many distinct SLM heads."
        )
    if config.layers is not None:
        check_layers_in_range(config.layers, n_layers, n_kv)
        n_mapped = len(config.layers)
    else:
        n_mapped = strategy.count(n_layers, n_kv, config.ratio)
    return Resolved(config, strategy, n_mapped, n_kv)
