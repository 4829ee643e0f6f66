"""Every bad input gives a ValueError that says what is allowed."""

from __future__ import annotations

import pytest
import torch

from conftest import prompt, tiny
from iam import IAMModel, MappingConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.5}, r"ratio must be a number in \[0, 1\]"),
        ({"ratio": -0.1}, r"ratio must be a number in \[0, 1\]"),
        ({"ratio": "half"}, r"ratio must be a number"),
        ({"strategy": "middle"}, r"strategy must be one of \['auto', 'back', 'calibrated', 'front', 'similar', 'two-region'\]"),
        ({"metric": "dot"}, r"metric must be one of \['cosine', 'cosine-norm', 'minkowski1', 'minkowski2', 'pearson'\]"),
        ({"layers": [1, 1]}, r"must name each layer or KV group once"),
        ({"layers": [1, (1, 0)]}, r"must name each layer or KV group once"),
        ({"layers": [(2, 1), (2, 1)]}, r"must name each layer or KV group once"),
        ({"layers": [-1]}, r"non-negative"),
        ({"layers": [(1, -1)]}, r"non-negative"),
        ({"layers": [(1, 0, 2)]}, r"\(layer, kv_group\) pairs"),
        ({"layers": "1,2"}, r"list of non-negative LLM layer indices"),
        ({"layers": [1.0]}, r"list of non-negative LLM layer indices"),
        ({"establish_threshold": 1}, r"establish_threshold must be an integer >= 2"),
        ({"truncation_threshold": 0}, r"truncation_threshold must be an integer >= 2"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MappingConfig(**kwargs)


def test_layers_out_of_range(pair):
    with pytest.raises(ValueError, match=r"layers \[4, 9\] out of range: the LLM has 4 layers \(0..3\)"):
        IAMModel(*pair, MappingConfig(layers=[1, 4, 9]))
    with pytest.raises(ValueError, match=r"KV groups \[\(1, 2\)\] out of range: the LLM has 2 KV heads per layer \(0..1\)"):
        IAMModel(*pair, MappingConfig(layers=[(1, 2)]))


def test_mixed_families():
    with pytest.raises(ValueError, match=r"different families \('qwen2' vs 'llama'\)"):
        IAMModel(tiny("qwen2", 2, 32, 2, 1, 0), tiny("llama", 2, 32, 2, 1, 0))


def test_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported families: \['qwen2', 'llama'\]"):
        IAMModel(gpt2, tiny("qwen2", 2, 32, 2, 1, 0))


def test_different_vocabularies(family):
    slm = tiny(family, 2, 32, 2, 1, 0)
    slm.resize_token_embeddings(120)
    with pytest.raises(ValueError, match=r"vocabularies differ \(vocab_size 97 vs 120\)"):
        IAMModel(tiny(family, 2, 32, 2, 1, 0), slm)


def test_bad_inputs(pair):
    iam = IAMModel(*pair, MappingConfig(ratio=0.5))
    ids = prompt(10, batch=2)
    with pytest.raises(ValueError, match="LongTensor"):
        iam(ids.float())
    with pytest.raises(ValueError, match="must match input_ids"):
        iam(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))
    right_padded = torch.ones_like(ids)
    right_padded[0, -3:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        iam.generate(ids, attention_mask=right_padded)
    with pytest.raises(ValueError, match=r"prompt too long: 250 tokens \+ 10 new exceed the models' 256-position limit"):
        iam.generate(prompt(250), max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        iam.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        iam.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        iam.generate(ids, top_p=1.5)
    with pytest.raises(RuntimeError, match="no call yet"):
        IAMModel(*pair).kv_cache_bytes()


def test_unsupported_attention_implementation(pair):
    llm, slm = pair
    llm.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation 'flex_attention'"):
        IAMModel(llm, slm)
