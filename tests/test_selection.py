from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import pytest
import torch

from conftest import prompt
from iam.core.selection import STRATEGIES


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
    from iam import IAMForCausalLM, MappingConfig
    from iam.core.calibration import order_from_sweep, write_order

    folder = tmp_path / "calibration"
    llm, slm = pair
    # no stored order: "calibrated" refuses, "auto" falls back to "back"
    with pytest.raises(ValueError, match="no calibrated layer order is stored for this LLM: run `iam calibrate"):
        _ = list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, strategy="calibrated", calibrations=str(folder))).planned)
    assert list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibrations=str(folder))).planned) == [2, 3]
    rows = [{"first_layer": None, "ppl_increase": 0.0}] + [
        {"first_layer": i, "ppl_increase": d} for i, d in enumerate([0.05, 0.30, 0.01, 0.10])
    ]
    order = order_from_sweep(rows)
    assert order == [2, 0, 3, 1]
    path = write_order(llm.config, slm.config, order, {}, {"dataset": "test"}, folder)
    assert path.parent == folder and [p.name for p in path.parent.iterdir()] == [path.name]
    for strategy in ("calibrated", "auto"):
        config = MappingConfig(ratio=0.5, strategy=strategy, calibrations=str(folder))
        assert list(IAMForCausalLM(llm, slm, config).planned) == [0, 2]
        assert list(IAMForCausalLM(llm, slm, replace(config, ratio=0.75)).planned) == [0, 2, 3]
    # the config names the folder: without it the shipped orders only, whatever the environment
    monkeypatch.setenv("IAM_CACHE", str(tmp_path))
    assert list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5)).planned) == [2, 3]


def test_an_order_measured_with_a_local_window_serves_that_window(pair, tmp_path):
    from iam import IAMForCausalLM, MappingConfig
    from iam.core.calibration import write_order

    llm, slm = pair
    write_order(llm.config, slm.config, [2, 0, 3, 1], {}, {"dataset": "test"}, tmp_path)
    path = write_order(llm.config, slm.config, [1, 3, 0, 2], {}, {"dataset": "test"}, tmp_path, local_window=16)
    assert path.name.endswith("__local16.json")

    def planned(**kwargs) -> list:
        return list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibrations=str(tmp_path), **kwargs)).planned)

    assert planned() == [0, 2]
    assert planned(local_window=16) == [1, 3]
    assert planned(local_window=32) == [0, 2]  # no order for that window: the plain one


def test_the_stored_blend_goes_with_the_stored_order(pair, tmp_path):
    from iam import IAMForCausalLM
    from iam import MappingConfig as Config
    from iam.core.calibration import write_order

    llm, slm = pair
    MappingConfig = partial(Config, calibrations=str(tmp_path))
    assert IAMForCausalLM(llm, slm, MappingConfig()).mapping_config.blend == 1  # nothing stored: the paper's best match
    path = write_order(llm.config, slm.config, [2, 0, 3, 1], {}, {"dataset": "test"}, tmp_path, blend=3)
    config = MappingConfig(ratio=0.5)
    iam = IAMForCausalLM(llm, slm, config)
    assert (iam.mapping_config.blend, config.blend, list(iam.planned)) == (3, None, [0, 2])  # the user's config is untouched
    assert IAMForCausalLM(llm, slm, MappingConfig(strategy="calibrated")).mapping_config.blend == 3
    assert IAMForCausalLM(llm, slm, MappingConfig(blend=2)).mapping_config.blend == 2  # an explicit blend wins
    assert IAMForCausalLM(llm, slm, MappingConfig(strategy="back")).mapping_config.blend == 1  # no stored order in use
    out = iam.generate(prompt(30, seed=1), max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 32)
    assert out.cache.mapping.mixture[0].shape[-2] == 3 and out.cache.mapping.summary()["blend"] == 3
    record = json.loads(path.read_text())
    del record["blend"]  # files written before blends were stored measured the paper's best match
    path.write_text(json.dumps(record))
    assert IAMForCausalLM(llm, slm, MappingConfig()).mapping_config.blend == 1
    path.write_text(json.dumps({**record, "blend": 0}))
    with pytest.raises(ValueError, match="is not a calibration file written by `iam calibrate` .blend 0 is not"):
        IAMForCausalLM(llm, slm, MappingConfig())


def test_greedy_order_accounts_for_interactions():
    from iam.eval.calibrate import greedy_order

    cost = [1.0, 2.0, 3.0, 4.0, 9.0]
    calls = []

    def damage(layers: list[int]) -> float:
        calls.append(layers)
        # layers 0 and 1 are cheap alone but clash when mapped together
        return sum(cost[i] for i in layers) + (10.0 if {0, 1} <= set(layers) else 0.0)

    order, rows = greedy_order(damage, list(range(5)), steps=3, shortlist=2, progress=False)
    # single-layer sorting would give [0, 1, ...] and a 2-layer set costing 13; greedy finds {0, 2} at 4
    assert order[:3] == [0, 2, 3] and sorted(order) == list(range(5))
    assert [r["damage"] for r in rows] == [1.0, 4.0, 8.0]
    assert [r["measured"] for r in rows] == [5, 2, 2] and len(calls) == 9
    assert all(c == sorted(c) for c in calls)
    with pytest.raises(ValueError, match="steps"):
        greedy_order(damage, list(range(5)), steps=0)


def test_kl_damage_is_zero_unmapped_and_positive_mapped(pair):
    from iam import MappingConfig
    from iam.eval.calibrate import kl_damage

    llm, slm = pair
    damage = kl_damage(llm, slm, [prompt(24)], MappingConfig(ratio=0.0))
    assert damage([]) == pytest.approx(0.0, abs=1e-6)
    assert damage([3]) > 1e-4


def test_cosine_norm_prefers_the_candidate_of_matching_magnitude():
    from iam.core.similarity import METRICS

    llm = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    same = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    scaled = 3 * same  # same direction, wrong magnitude: cosine cannot tell them apart
    slm = torch.cat([scaled, same])
    assert torch.allclose(METRICS["cosine"].score(llm, slm), torch.ones(1, 2))
    assert METRICS["cosine-norm"].score(llm, slm).argmax().item() == 1
    assert METRICS["cosine-norm"].score(llm, slm)[0, 0].item() == pytest.approx(1 / 3)


def test_a_calibration_file_can_be_chosen(pair, tmp_path, monkeypatch):
    from iam import IAMForCausalLM, MappingConfig
    from iam.core.calibration import write_order

    monkeypatch.setenv("IAM_CACHE", str(tmp_path / "cache"))
    llm, slm = pair
    path = write_order(llm.config, slm.config, [1, 3, 0, 2], {}, {"dataset": "test"}, tmp_path)
    assert list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibration=str(path))).planned) == [1, 3]
    assert list(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5)).planned) == [2, 3]  # nothing stored: "back"
    other = write_order(slm.config, slm.config, [0, 1], {}, {}, tmp_path / "other")
    with pytest.raises(ValueError, match=r"calibrates \w+-L2-.* with .*, not this pair"):
        IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibration=str(other)))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a calibration file written by `iam calibrate`"):
        IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibration=str(tmp_path / "bad.json")))
