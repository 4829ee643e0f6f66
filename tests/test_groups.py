"""KV-group granularity: one KV group of a layer (its query heads and its K) mapped while the others attend as usual."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, iam, left_pad, prompt
from iam import IAMForCausalLM, MappingConfig
from iam.core.decoder import decoder_layers

PLAN = [(0, 1), (2, 0), 3]  # the tiny LLMs have 4 layers of 4 query heads in 2 KV groups


def greedy(model, ids, mask, new):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_partly_mapped_identity_twin_is_the_llm(twin, impl):
    """With the SLM an exact copy, mapped heads borrow their own attention and unmapped heads attend as usual:
    prefill logits and greedy decode equal the LLM alone, with padding, under either attention implementation."""
    llm, slm = twin
    llm.config._attn_implementation = impl
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (26, 33)])
    model = iam(llm, slm, layers=PLAN)
    result = greedy(model, ids, mask, 8)
    out, found = result.sequences, result.cache.mapping
    assert torch.equal(out, greedy(llm, ids, mask, 8).sequences)
    assert found.plan == {0: (1,), 2: (0,), 3: (0, 1)}
    assert found.units == ["0:1", "2:0", 3]
    assert found.layers_worth == model.resolved.layers_worth == 2.0  # its size as a number: two groups and a layer
    mapping = found.head_mapping[0]  # [3 layers, 4 heads, 2]
    assert (mapping[0, :2] == -1).all() and torch.equal(mapping[0, 2:], torch.tensor([[0, 2], [0, 3]]))
    assert torch.equal(mapping[1, :2], torch.tensor([[2, 0], [2, 1]])) and (mapping[1, 2:] == -1).all()
    assert found.similarity[0, 0, :2].isnan().all() and not found.similarity[0, 2].isnan().any()
    summary = found.summary()
    assert [v["kv_groups"] for v in summary["layers"].values()] == [[1], [0], [0, 1]]
    assert summary["mean_similarity"] > 0.99  # each head finds itself
    full_mask = torch.cat([mask, torch.ones_like(out[:, mask.shape[1] :])], 1)
    assert (forward(model, out, full_mask).logits - forward(llm, out, full_mask).logits).abs().max() < 1e-3


def test_partly_mapped_layer_caches_k_of_its_unmapped_group_only(pair):
    llm, slm = pair
    ids = prompt(30, batch=2)
    cache = greedy(iam(llm, slm, layers=[(1, 0)]), ids, torch.ones_like(ids), 4).cache
    layer = cache.layers[1]
    assert layer.keys.shape[1] == 1 and layer.values.shape[1] == 2
    kv = cache.kv_bytes()
    assert kv["llm"] == kv["baseline"] - layer.keys.nbytes  # exactly one KV head's K is gone


def test_unmapped_groups_project_q_and_k_from_their_weight_rows_only(pair, monkeypatch):
    """Q/K of a partly mapped layer come from views of one group's weight rows: the mapped group's on the
    establishing window only, the unmapped group's on every token."""
    llm, slm = pair
    attn = decoder_layers(llm)[1].self_attn
    d = attn.head_dim
    seen = []
    real_linear = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        for name in ("q_proj", "k_proj"):
            if weight.untyped_storage().data_ptr() == getattr(attn, name).weight.untyped_storage().data_ptr():
                seen.append((name, weight.shape[0], weight.storage_offset(), x.shape[1]))
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    ids = prompt(30)
    greedy(iam(llm, slm, layers=[(1, 0)], truncation_threshold=16), ids, torch.ones_like(ids), 3)
    # Window: group 0's rows on 16 tokens. Then group 1 only (rows from 2*d for q, from d for k) on the prompt
    # and on each of the two decode steps.
    assert seen[:2] == [("q_proj", 2 * d, 0, 16), ("k_proj", d, 0, 16)]
    own = [("q_proj", 2 * d, 2 * d * 64, t) for t in (30, 1, 1)], [("k_proj", d, d * 64, t) for t in (30, 1, 1)]
    assert sorted(seen[2:]) == sorted(own[0] + own[1])


def test_partial_plan_decode_matches_its_own_prefill(pair):
    """Decode steps of a partly mapped run give the tokens a one-shot prefill of the whole sequence would."""
    llm, slm = pair
    model = iam(llm, slm, layers=PLAN, truncation_threshold=16)
    ids = prompt(40, seed=5)
    out = greedy(model, ids, torch.ones_like(ids), 8).sequences
    assert torch.equal(forward(model, out).logits[0, 39:-1].argmax(-1), out[0, 40:])


def test_calibrated_kv_group_order(pair, tmp_path):
    from iam.core.calibration import order_from_sweep, write_order

    llm, slm = pair
    rows = [{"first_layer": None, "ppl_increase": 0.0}]
    rows += [{"first_layer": i, "kv_group": g, "ppl_increase": 0.1 * (7 - 2 * i - g)} for i in range(4) for g in range(2)]
    order = order_from_sweep(rows)
    assert order == [(3, 1), (3, 0), (2, 1), (2, 0), (1, 1), (1, 0), (0, 1), (0, 0)]
    write_order(llm.config, slm.config, order, {}, {"dataset": "test"}, tmp_path)
    model = IAMForCausalLM(
        llm, slm, MappingConfig(ratio=0.375, calibrations=str(tmp_path))
    )  # round(0.375 * 8) = 3 of 8 KV groups
    assert model.planned == {2: (1,), 3: (0, 1)} and model.resolved.n_mapped == 3
    assert model.resolved.layers_worth == 1.5  # three KV groups of two: one and a half layers' K
    with pytest.raises(ValueError, match=r"ratio 0.02 maps none of this LLM's 8 KV groups .* above 0.0625"):
        IAMForCausalLM(llm, slm, MappingConfig(ratio=0.02, calibrations=str(tmp_path)))  # it mapped none, under an IAM label
    write_order(llm.config, slm.config, order[:-1], {}, {"dataset": "test"}, tmp_path)
    with pytest.raises(ValueError, match=r"does not cover the LLM's 4 layers x 2 KV groups"):
        _ = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5, calibrations=str(tmp_path))).planned


def test_sweep_per_kv_group_maps_one_group_at_a_time(pair):
    from iam.eval.sweep import eval_sweep

    llm, slm = pair
    result = eval_sweep(llm, slm, [prompt(30, seed=2)], 2, MappingConfig(), per_group=True, progress=False)
    rows = result["rows"]
    assert [r["block"] for r in rows] == ["none", "0-1:0", "0-1:1", "2-3:0", "2-3:1"]
    assert [r["mapped_layers"] for r in rows[1:]] == [["0:0", "1:0"], ["0:1", "1:1"], ["2:0", "3:0"], ["2:1", "3:1"]]
    assert rows[0]["ppl_increase"] == 0 and all(r["ppl_increase"] != 0 for r in rows[1:])
