"""Damage-calibrated layer orders: map each LLM layer alone, measure the perplexity it costs, store the order.

Orders shipped with the library live in ``iam/calibration/*.json``; ``iam calibrate`` writes new ones under
``$IAM_CACHE/calibration``. An order is keyed by the LLM's architecture (and the SLM it was measured with).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from transformers import PretrainedConfig

from .loading import cache_root

SHIPPED = Path(__file__).parent / "calibration"


def arch_key(config: PretrainedConfig) -> str:
    """A name for an architecture: family, depth, width, heads, KV heads and vocabulary."""
    return (
        f"{config.model_type}-L{config.num_hidden_layers}-D{config.hidden_size}-H{config.num_attention_heads}"
        f"-KV{config.num_key_value_heads}-V{config.vocab_size}"
    )


def pair_key(llm: PretrainedConfig, slm: PretrainedConfig) -> str:
    return f"{arch_key(llm)}__{arch_key(slm)}"


def find_order(llm: PretrainedConfig, slm: PretrainedConfig) -> tuple[int, ...]:
    """The stored order for this pair (user calibrations first), or ``()``."""
    name = pair_key(llm, slm) + ".json"
    for folder in (cache_root() / "calibration", SHIPPED):
        path = folder / name
        if path.is_file():
            return tuple(json.loads(path.read_text())["order"])
    return ()


def order_from_sweep(rows: list[dict]) -> list[int]:
    """Layers sorted by the perplexity increase of mapping each alone (rows of a block-1 sweep)."""
    measured = [r for r in rows if r.get("first_layer") is not None]
    return [r["first_layer"] for r in sorted(measured, key=lambda r: r["ppl_increase"])]


def write_order(llm: PretrainedConfig, slm: PretrainedConfig, rows: list[dict], source: dict, folder: Path | None = None) -> Path:
    """Write the calibration atomically; returns its path."""
    folder = folder or cache_root() / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pair_key(llm, slm)}.json"
    record = {
        "llm": arch_key(llm),
        "slm": arch_key(slm),
        "order": order_from_sweep(rows),
        "damage": {str(r["first_layer"]): r["ppl_increase"] for r in rows if r.get("first_layer") is not None},
        "source": source,
    }
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return path
