"""Damage-calibrated layer orders: which LLM layers to map first, measured on real text and stored per pair.

Two ways to measure an order: ``single`` maps each layer alone and sorts by the perplexity it costs; ``greedy``
(forward selection) grows the mapped set one layer at a time, each time adding the layer that costs least given the
layers already mapped, so interactions between mapped layers count.

Orders shipped with the library live in ``iam/core/calibrations/*.json``; ``iam calibrate`` writes new ones into a
folder (the user's, ``iam.models.loading.user_calibrations``), which ``MappingConfig.calibrations`` names to look in
first. This module reads no environment: the loader passes the user's folder in. An order is keyed by the LLM's
architecture (and the SLM it was measured with), and carries the ``blend`` to use with it (``iam calibrate`` stores
the one it measured under): ``MappingConfig(blend=None)``, the default, takes it with the order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from ..io import write_atomic
from .selection import Unit

SHIPPED = Path(__file__).parent / "calibrations"


def arch_key(config: PretrainedConfig) -> str:
    """A name for an architecture: family, depth, width, heads, KV heads and vocabulary."""
    return (
        f"{config.model_type}-L{config.num_hidden_layers}-D{config.hidden_size}-H{config.num_attention_heads}"
        f"-KV{config.num_key_value_heads}-V{config.vocab_size}"
    )


def pair_key(llm: PretrainedConfig, slm: PretrainedConfig) -> str:
    return f"{arch_key(llm)}__{arch_key(slm)}"


@dataclass(frozen=True)
class Calibration:
    """A stored calibration.

    Parameters
    ----------
    order : every LLM layer, or every ``(layer, kv_group)``, least damaging to map first.
    blend : SLM heads mixed per mapped LLM head with this order, the pair's default ``blend`` (1 where the file has
        none, as in files written before blends were stored).
    """

    order: tuple[Unit, ...]
    blend: int = 1


def read_calibration(path: Path, llm: PretrainedConfig, slm: PretrainedConfig) -> Calibration:
    """The calibration in a file written by ``iam calibrate``; it must be for this pair."""
    try:
        record = json.loads(Path(path).read_text())
        order, llm_key, slm_key, blend = record["order"], record["llm"], record["slm"], record.get("blend", 1)
        if not (isinstance(blend, int) and blend >= 1):
            raise ValueError(f"blend {blend!r} is not an integer >= 1")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a calibration file written by `iam calibrate` ({e}).") from None
    if (llm_key, slm_key) != (arch_key(llm), arch_key(slm)):
        raise ValueError(f"{path} calibrates {llm_key} with {slm_key}, not this pair ({arch_key(llm)} with {arch_key(slm)}).")
    return Calibration(tuple(u if isinstance(u, int) else tuple(u) for u in order), blend)


def file_name(llm: PretrainedConfig, slm: PretrainedConfig, local_window: int = 0) -> str:
    """The stored order's file name: per pair, and per ``MappingConfig.local_window`` where one was measured with it."""
    return pair_key(llm, slm) + (f"__local{local_window}" if local_window else "") + ".json"


def find_calibration(
    llm: PretrainedConfig, slm: PretrainedConfig, local_window: int = 0, folder: str | Path | None = None
) -> Calibration | None:
    """The stored calibration for this pair, in ``folder`` first, then among the shipped ones; ``None`` where neither
    holds one. With ``local_window`` an order measured with that window comes first, then the pair's plain one."""
    names = dict.fromkeys([file_name(llm, slm, local_window), file_name(llm, slm)])
    folders = [SHIPPED] if folder is None else [Path(folder), SHIPPED]
    for name in names:
        for folder in folders:
            if (folder / name).is_file():
                return read_calibration(folder / name, llm, slm)
    return None


def order_from_sweep(rows: list[dict]) -> list[Unit]:
    """Layers, or ``(layer, kv_group)`` units, sorted by the perplexity increase of mapping each alone (rows of a
    block-1 sweep)."""
    measured = sorted((r for r in rows if r.get("first_layer") is not None), key=lambda r: r["ppl_increase"])
    return [r["first_layer"] if r.get("kv_group") is None else (r["first_layer"], r["kv_group"]) for r in measured]


def write_order(
    llm: PretrainedConfig,
    slm: PretrainedConfig,
    order: list[Unit],
    damage: dict,
    source: dict,
    folder: Path,
    blend: int = 1,
    local_window: int = 0,
) -> Path:
    """Write the calibration atomically into ``folder``; returns its path. ``damage`` and ``source`` document how the
    order was measured, ``blend`` and ``local_window`` the settings it was measured under (an order measured with a local
    window is stored apart, for that window)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(llm, slm, local_window)
    record = {"llm": arch_key(llm), "slm": arch_key(slm), "order": order, "blend": blend, "local_window": local_window}
    record.update(damage=damage, source=source)
    write_atomic(path, json.dumps(record, indent=2))
    return path
