"""The LLM's own cache as int8 (``MappingConfig.llm_cache="int8"``): K and V of unmapped KV groups, V of mapped ones."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, iam, left_pad, prompt
from iam import IAMForCausalLM, MappingConfig
from iam.core.eviction import H2O, StreamingLLM
from iam.core.layers import Int8Layer, Int8ValueOnlyLayer

CONFIGS = [dict(ratio=0.0), dict(layers=[1, (2, 0)]), dict(layers=[1, (2, 0)], local_window=8)]


@pytest.mark.parametrize("mapping", CONFIGS)
def test_int8_holds_a_quarter_of_fp32_plus_scales_and_stays_close(pair, mapping):
    llm, slm = pair
    ids, mask = left_pad([prompt(60, 1)[0], prompt(45, 2)[0]])
    native = forward(iam(llm, slm, **mapping), ids, mask)
    quantized = forward(iam(llm, slm, **mapping, llm_cache="int8"), ids, mask)
    assert (native.logits - quantized.logits)[mask.bool()].abs().max() < 0.05
    layers = quantized.cache.layers
    assert all(isinstance(layer, Int8Layer) for layer in layers)
    if mapping.get("layers"):
        assert isinstance(layers[1], Int8ValueOnlyLayer) and layers[1].keys.numel() == 0
        assert layers[2].keys.shape[1] == 1 and layers[2].values.shape[1] == 2  # K of the unmapped group only
    # per head and token: d int8 values and one fp32 scale, against d fp32 values
    own = sum(t.numel() * 4 for layer in native.cache.layers for t in (layer.keys, layer.values))
    local = native.cache.kv_bytes()["llm"] - own  # the window's keys stay in the model's dtype
    assert quantized.cache.kv_bytes()["llm"] - local == (native.cache.kv_bytes()["llm"] - local) * (16 + 4) // (16 * 4)
    assert quantized.cache.kv_bytes()["baseline"] == native.cache.kv_bytes()["baseline"]


@pytest.mark.parametrize("policy", [H2O(budget=0.6), StreamingLLM(budget=0.6, scope="unmapped")])
def test_int8_composes_with_eviction_and_batches(pair, policy):
    llm, slm = pair
    model = IAMForCausalLM(llm, slm, MappingConfig(layers=[1, (2, 0)], llm_cache="int8"), policy)
    rows = [prompt(60, 1)[0], prompt(38, 2)[0]]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, row in enumerate(rows):
        assert torch.equal(batch[i, -6:], model.generate(row[None], max_new_tokens=6, do_sample=False)[0, -6:])


def test_an_unknown_cache_kind_is_refused():
    with pytest.raises(ValueError, match="llm_cache must be one of"):
        MappingConfig(llm_cache="int2")
