"""A fixed head mapping (``MappingConfig(head_mapping=...)``, ``iam.core.fixed``), on tiny random pairs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import forward, iam, left_pad, prompt
from iam import MappingConfig
from iam.core.fixed import FixedMapping, read_head_mapping


def established(llm, slm, ids, **mapping):
    """The mapping one sequence establishes on its own, as a fixed mapping, and that forward's output."""
    out = forward(iam(llm, slm, **mapping), ids)
    return FixedMapping.of(out.cache.mapping, llm.config, slm.config), out


@pytest.mark.parametrize("mapping", [{"ratio": 0.5}, {"layers": [1, (3, 0)], "blend": 2}])
def test_fixed_mapping_equals_the_one_the_sequence_establishes(pair, tmp_path, mapping):
    llm, slm = pair
    ids = prompt(40, seed=3)
    fixed, own = established(llm, slm, ids, **mapping)
    path = tmp_path / "map.json"
    fixed.save(path)
    model = iam(llm, slm, head_mapping=str(path), ratio=0.9)  # the file's plan, not the ratio's
    out = forward(model, ids)
    assert out.cache.mapping.plan == own.cache.mapping.plan
    assert torch.equal(out.cache.mapping.head_mapping, own.cache.mapping.head_mapping)
    torch.testing.assert_close(out.cache.mapping.mixture[1], own.cache.mapping.mixture[1], equal_nan=True)
    torch.testing.assert_close(out.logits, own.logits, rtol=0, atol=1e-5)
    # decode continues identically
    a = iam(llm, slm, **mapping).generate(ids, max_new_tokens=8, do_sample=False)
    b = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_fixed_mapping_maps_every_row_from_its_first_token(pair, tmp_path):
    """No establishing window: a prompt shorter than establish_threshold is mapped too, and a left-padded batch
    equals its rows run alone."""
    llm, slm = pair
    fixed, _ = established(llm, slm, prompt(40, seed=3), ratio=0.5)
    fixed.save(tmp_path / "map.json")
    model = iam(llm, slm, head_mapping=str(tmp_path / "map.json"))
    short = prompt(6, seed=1)
    out = forward(model, short)
    assert out.cache.mapping is not None and out.cache.kv_bytes()["llm"] < out.cache.kv_bytes()["baseline"]
    rows = [prompt(n, seed=n) for n in (6, 13, 25)]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=6, do_sample=False)[:, row.shape[1] :]
        assert torch.equal(batch[i], alone[0])


def test_head_mapping_file_round_trips(pair, tmp_path):
    llm, slm = pair
    fixed, _ = established(llm, slm, prompt(40, seed=3), layers=[1, (3, 0)], blend=2)
    fixed.save(tmp_path / "map.json")
    again = read_head_mapping(tmp_path / "map.json", llm.config, slm.config)
    assert again.plan == fixed.plan and again.blend == 2
    assert again.borrow == {k: [[(s, h, pytest.approx(w)) for s, h, w in mix] for mix in v] for k, v in fixed.borrow.items()}


def edit(path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda r: r.update(llm="qwen2-L8-D64-H4-KV2-V97"), "not this pair"),
        (lambda r: r["layers"][0].update(layer=9), "outside the LLM's 4 layers"),
        (lambda r: r["layers"][0]["borrow"][0][0].__setitem__(1, 5), "outside the SLM's 2 x 2 heads"),
        (lambda r: r["layers"][0]["borrow"][0][0].__setitem__(2, 0.5), "sum 1"),
        (lambda r: r["layers"][0]["borrow"].pop(), "heads for"),
        (lambda r: r["layers"][0].update(kv_groups=[0, 0]), "not distinct"),
        (lambda r: r.pop("layers"), "incomplete"),
        (lambda r: r.update(format="other"), "not a head mapping"),
    ],
)
def test_corrupt_or_mismatched_mapping_file_is_refused_by_name(pair, tmp_path, change, says):
    llm, slm = pair
    path = tmp_path / "map.json"
    established(llm, slm, prompt(40, seed=3), ratio=0.5)[0].save(path)
    edit(path, change)
    with pytest.raises(ValueError, match=f"head mapping file {path}.*{says}"):
        iam(llm, slm, head_mapping=str(path))


def test_garbage_mapping_file_is_refused_by_name(pair, tmp_path):
    path = tmp_path / "map.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"head mapping file {path}"):
        iam(*pair, head_mapping=str(path))


def test_head_mapping_refuses_what_it_would_override(tmp_path):
    path = tmp_path / "map.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="layers would not be used"):
        MappingConfig(head_mapping=str(path), layers=[1])
    with pytest.raises(ValueError, match="does not exist"):
        MappingConfig(head_mapping=str(tmp_path / "none.json"))
