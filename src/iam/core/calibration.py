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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
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


def greedy_order(
    damage: Callable[[list[Unit]], float], units: list[Unit], steps: int, shortlist: int = 4, progress: bool = True
) -> tuple[list[Unit], list[dict]]:
    """Forward selection of the layers to map first.

    Step 1 measures every layer mapped alone. Step k measures the k-1 layers already chosen plus one candidate and
    keeps the cheapest. After step 1 only the ``shortlist`` candidates with the lowest last-measured damage are
    re-measured (lazy greedy: a layer rarely gets cheaper as the mapped set grows). Layers not chosen within
    ``steps`` follow in their last-measured order.

    Parameters
    ----------
    damage : cost of mapping a sorted list of units (lower is better), e.g. mean KL to the LLM alone.
    units : every candidate: the LLM's layers, or its ``(layer, kv_group)`` pairs.
    steps : how many units to choose greedily (e.g. half of them for ratios up to 0.5).
    shortlist : candidates re-measured per step after the first.
    progress : show a progress bar over the measurements.

    Returns
    -------
    The full order of the units, and one row per step: ``step``, ``layer`` (the unit chosen), ``damage`` (of the
    chosen set), ``measured`` (candidates measured in that step).
    """
    n = len(units)
    if not 1 <= steps <= n or shortlist < 1:
        raise ValueError(f"need 1 <= steps <= {n} and shortlist >= 1, got steps={steps}, shortlist={shortlist}.")
    chosen: list[Unit] = []
    estimate: dict[Unit, float] = {}
    rows = []
    total = n + sum(min(shortlist, n - k) for k in range(1, steps))
    bar = tqdm(total=total, desc="calibration", disable=not progress)
    for step in range(1, steps + 1):
        rest = [u for u in units if u not in chosen]
        candidates = rest if step == 1 else sorted(rest, key=estimate.__getitem__)[:shortlist]
        for layer in candidates:
            estimate[layer] = damage(sorted([*chosen, layer]))
            bar.update()
        best = min(candidates, key=estimate.__getitem__)
        chosen.append(best)
        rows.append({"step": step, "layer": best, "damage": estimate[best], "measured": len(candidates)})
    bar.close()
    return chosen + sorted((u for u in units if u not in chosen), key=estimate.__getitem__), rows


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
