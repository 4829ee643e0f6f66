from __future__ import annotations

import pytest
import torch

from iam.selection import STRATEGIES


def test_back_and_front():
    assert STRATEGIES["back"].select(10, 3) == [7, 8, 9]
    assert STRATEGIES["front"].select(10, 3) == [0, 1, 2]
    assert STRATEGIES["back"].select(10, 0) == []


def test_two_region_is_the_paper_rule_on_qwen2_72b():
    # 80 layers, 50%: layers 64..79 first, then from layer 16 onward.
    assert STRATEGIES["two-region"].select(80, 40) == list(range(16, 40)) + list(range(64, 80))
    assert STRATEGIES["two-region"].select(80, 10) == list(range(70, 80))
    assert STRATEGIES["two-region"].select(10, 10) == list(range(10))


def test_similar_needs_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8])
    assert STRATEGIES["similar"].select(4, 2, scores) == [1, 3]
    with pytest.raises(ValueError, match="one score per LLM layer"):
        STRATEGIES["similar"].select(4, 2, None)


def test_calibrated_order(pair, tmp_path, monkeypatch):
    from iam import IAMModel, MappingConfig
    from iam.calibration import write_order

    monkeypatch.setenv("IAM_CACHE", str(tmp_path))
    llm, slm = pair
    # no stored order: "calibrated" refuses, "auto" falls back to "back"
    with pytest.raises(ValueError, match="no calibrated layer order is stored for this LLM: run `iam calibrate"):
        _ = IAMModel(llm, slm, MappingConfig(ratio=0.5, strategy="calibrated")).mapped_layers
    assert IAMModel(llm, slm, MappingConfig(ratio=0.5)).mapped_layers == [2, 3]
    rows = [{"first_layer": None, "ppl_increase": 0.0}] + [
        {"first_layer": i, "ppl_increase": d} for i, d in enumerate([0.05, 0.30, 0.01, 0.10])
    ]
    path = write_order(llm.config, slm.config, rows, {"dataset": "test"})
    assert path.parent == tmp_path / "calibration" and not list(path.parent.glob("*.partial"))
    for strategy in ("calibrated", "auto"):
        assert IAMModel(llm, slm, MappingConfig(ratio=0.5, strategy=strategy)).mapped_layers == [0, 2]
        assert IAMModel(llm, slm, MappingConfig(ratio=0.75, strategy=strategy)).mapped_layers == [0, 2, 3]
