"""Every bad input gives a ValueError that says what is allowed."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, iam, left_pad, prompt, tiny
from iam import IAMForCausalLM, MappingConfig
from iam.core.eviction import H2O
from iam.core.kernels import Kernels


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
        ({"layers": (2, 1)}, r"layers must be a list, got the tuple \(2, 1\).*\[2, 1\] for whole layers, or \[\(2, 1\)\]"),
        ({"calibration": "x.json", "strategy": "back"}, r"calibration='x.json' would not be used: .*strategy is 'back'"),
        ({"calibration": "x.json", "layers": [1]}, r"would not be used: .*layers are given"),
        ({"calibration": "/no/such/file.json"}, r"calibration file '/no/such/file.json' does not exist"),
        ({"layers": [1.0]}, r"list of non-negative LLM layer indices"),
        ({"establish_threshold": 1}, r"establish_threshold must be an integer >= 2"),
        ({"truncation_threshold": 0}, r"truncation_threshold must be an integer >= 2"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MappingConfig(**kwargs)


def test_a_config_invalid_for_the_pair_fails_before_weights_load(tmp_path, monkeypatch):
    """``from_pretrained`` checks the mapping against the two config.json files; no weights are read."""
    from iam.models import loading

    tiny("qwen2", 4, 64, 4, 2, 0).config.save_pretrained(tmp_path / "big")
    tiny("qwen2", 2, 32, 2, 1, 1).config.save_pretrained(tmp_path / "small")
    monkeypatch.setattr(loading, "load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"layers \[7\] out of range: the LLM has 4 layers"):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", layers=[7])
    with pytest.raises(ValueError, match=r"blend 5 exceeds the SLM's 4 heads"):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", blend=5)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\]"):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", ratio=3)


def test_a_ratio_that_maps_no_unit_is_refused_naming_the_one_that_maps_one(pair, pair_folders, monkeypatch, capsys):
    """On a 4-layer LLM, ratio 0.125 rounded to no layer (round half to even): a row labelled IAM, 0% dropped,
    rated against a budget."""
    llm, slm = pair
    with pytest.raises(ValueError, match=r"ratio 0.125 maps none of this LLM's 4 layers .* above 0.125 \(e.g. 0.25, one"):
        iam(llm, slm, ratio=0.125, strategy="back")
    assert iam(llm, slm, ratio=0.13, strategy="back").resolved.n_mapped == 1
    from iam.cli import main

    monkeypatch.setattr("iam.core.checks.load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(["bench", "--llm", pair_folders[0], "--slm", pair_folders[1], "--configs", "iam0.1"]) == 2
    assert "ratio 0.1 maps none of this LLM's 4 layers" in capsys.readouterr().err


def test_from_pretrained_checks_the_eviction_before_weights_load(tmp_path, monkeypatch):
    """``from_pretrained`` and the command line load through one checked loader (``load_checked``): an eviction the
    mapping leaves no layer for, or one its local window outgrows, failed only after both models had loaded."""
    from iam.core.eviction import make_policy

    tiny("qwen2", 4, 64, 4, 2, 0).config.save_pretrained(tmp_path / "big")
    tiny("qwen2", 2, 32, 2, 1, 1).config.save_pretrained(tmp_path / "small")
    monkeypatch.setattr("iam.core.checks.load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    unmapped = make_policy("h2o", 0.5, "unmapped")
    with pytest.raises(ValueError, match="this mapping leaves none"):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", eviction=unmapped, ratio=1.0, strategy="back")
    with pytest.raises(ValueError, match="smaller than the 20 tokens the policy and the exact local window"):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", eviction=make_policy("h2o", 19), local_window=8)


@pytest.mark.parametrize("role", ["LLM", "SLM"])
def test_a_sliding_window_config_is_refused_before_weights_load(tmp_path, monkeypatch, role):
    """IAM's decoder builds the full causal mask only: a Qwen2 config with sliding-window layers gave other logits
    than the LLM's even at ratio 0, and a shape mismatch in a mapped layer."""
    from iam.models import loading

    big, small = tiny("qwen2", 4, 64, 4, 2, 0), tiny("qwen2", 2, 32, 2, 1, 1)
    sliding = big if role == "LLM" else small
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 8
    sliding.config.max_window_layers = 1
    sliding.config.layer_types = ["full_attention"] + ["sliding_attention"] * (sliding.config.num_hidden_layers - 1)
    big.config.save_pretrained(tmp_path / "big")
    small.config.save_pretrained(tmp_path / "small")
    monkeypatch.setattr(loading, "load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    message = rf"{role} has sliding-window attention in layers \[1.*use_sliding_window=True"
    with pytest.raises(ValueError, match=message):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", ratio=0.0)
    with pytest.raises(ValueError, match=message):
        IAMForCausalLM(big, small, MappingConfig(ratio=0.0))


def test_layers_out_of_range(pair):
    with pytest.raises(ValueError, match=r"layers \[4, 9\] out of range: the LLM has 4 layers \(0..3\)"):
        IAMForCausalLM(*pair, MappingConfig(layers=[1, 4, 9]))
    with pytest.raises(ValueError, match=r"KV groups \[\(1, 2\)\] out of range: the LLM has 2 KV heads per layer \(0..1\)"):
        IAMForCausalLM(*pair, MappingConfig(layers=[(1, 2)]))


def test_mixed_families():
    with pytest.raises(ValueError, match=r"different families \('qwen2' vs 'llama'\)"):
        IAMForCausalLM(tiny("qwen2", 2, 32, 2, 1, 0), tiny("llama", 2, 32, 2, 1, 0))


def test_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'; supported families: \['qwen2', 'llama', 'qwen3', 'mistral'"):
        IAMForCausalLM(gpt2, tiny("qwen2", 2, 32, 2, 1, 0))


def test_different_vocabularies(family):
    slm = tiny(family, 2, 32, 2, 1, 0)
    slm.resize_token_embeddings(120)
    with pytest.raises(ValueError, match=r"vocabularies differ \(vocab_size 97 vs 120\)"):
        IAMForCausalLM(tiny(family, 2, 32, 2, 1, 0), slm)


def test_bad_inputs(pair):
    model = iam(*pair, ratio=0.5)
    ids = prompt(10, batch=2)
    with pytest.raises(ValueError, match="LongTensor"):
        forward(model, ids.float())
    with pytest.raises(ValueError, match=r"attention_mask \(2, 9\) must be 2D \[batch, cached \+ new tokens\] = \(2, 10\)"):
        forward(model, ids, torch.ones(2, 9, dtype=torch.long))
    right_padded = torch.ones_like(ids)
    right_padded[0, -3:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=right_padded, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"context too long: 257 tokens exceed the models' 256-position limit"):
        forward(model, prompt(257))
    with pytest.raises(ValueError, match="takes input_ids, not inputs_embeds"):
        model(input_ids=ids, inputs_embeds=torch.zeros(2, 10, 64))


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[0, 2, 2, 2], [1, 1, 1, 1]]), r"attention_mask must hold only 0 and 1, got values \[0, 1, 2\]"),
        (torch.tensor([[0.0, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), r"attention_mask must be 0/1, bool or integer"),
        (torch.tensor([[-1, 1, 1, 1], [1, 1, 1, 1]]), r"only 0 and 1, got values \[-1, 1\]"),
    ],
)
def test_masks_other_than_zero_one_are_refused(pair, mask, message):
    """A mask of 2s or fractions used to be accepted and changed the output; it must be refused."""
    with pytest.raises(ValueError, match=message):
        forward(iam(*pair, ratio=0.5), prompt(4, batch=2), mask)


def test_token_ids_outside_the_vocabulary_are_refused_up_front(pair):
    model = iam(*pair, ratio=0.5)
    for bad in (97, -1):
        ids = prompt(25)
        ids[0, 3] = bad
        with pytest.raises(ValueError, match=r"token ids outside the vocabulary \[0, 97\)"):
            model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids outside the vocabulary"):  # a pad token beyond the vocabulary
        ids, mask = left_pad([prompt(25)[0], prompt(20)[0]])
        model.generate(ids.masked_fill(mask == 0, 200), attention_mask=mask, max_new_tokens=2)


def test_a_batch_of_zero_rows_is_refused(pair):
    with pytest.raises(ValueError, match=r"input_ids of shape \(0, 5\) is empty"):
        forward(iam(*pair, ratio=0.5), torch.zeros(0, 5, dtype=torch.long))


def test_a_blend_above_the_slm_head_count_is_refused_before_any_call(pair):
    # the tiny SLM has 2 layers x 2 heads
    assert iam(*pair, blend=4).mapping_config.blend == 4
    with pytest.raises(ValueError, match=r"blend 5 exceeds the SLM's 4 heads \(2 layers x 2\)"):
        iam(*pair, blend=5)


def test_a_config_shared_between_wrappers_cannot_change_their_plans(pair):
    """The config is frozen, and a wrapper keeps its own copy (its layer list included)."""
    import dataclasses

    config = MappingConfig(layers=[1, 2], blend=1)
    model = IAMForCausalLM(*pair, config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.layers = [0]
    config.layers.append(3)
    assert model.mapping_config.layers == [1, 2] and model.planned == {1: (0, 1), 2: (0, 1)}
    assert dataclasses.replace(config, layers=[0]).layers == [0]


def test_similar_strategy_refuses_a_batch(pair):
    """'similar' chooses layers from the input: a batch would let a row's neighbours change its result."""
    with pytest.raises(ValueError, match="strategy 'similar' chooses layers per input: run one sequence at a time"):
        forward(iam(*pair, ratio=0.5, strategy="similar"), prompt(30, batch=2))


def test_generation_past_the_position_limit_is_refused_before_it_starts(pair):
    """It raised midway, losing the tokens generated so far."""
    model = iam(*pair, ratio=0.5)
    steps = []
    with pytest.raises(ValueError, match=r"a prompt of 250 tokens generating up to 10 more needs 259 positions, beyond the "):
        model.generate(prompt(250), max_new_tokens=10, do_sample=False, streamer=Counter(steps))
    assert steps == []  # refused before the prefill
    assert model.generate(prompt(250), max_new_tokens=7, min_new_tokens=7, do_sample=False).shape == (1, 257)


class Counter:
    """A streamer that counts what it is given."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def put(self, value) -> None:
        self.seen.append(value)

    def end(self) -> None:
        pass


@pytest.mark.parametrize(
    "kwargs, mode",
    [
        ({"prompt_lookup_num_tokens": 3}, "prompt-lookup decoding"),
        ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
        ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states"),
        ({"cache_implementation": "static"}, r"cache_implementation='static' is not supported"),
        ({"use_cache": False}, r"does not support use_cache=False"),
    ],
)
def test_unsupported_generation_modes_are_named(pair, kwargs, mode):
    with pytest.raises(ValueError, match=mode):
        iam(*pair, ratio=0.5).generate(prompt(25), max_new_tokens=2, **kwargs)


def test_assisted_decoding_is_refused(pair):
    llm, slm = pair
    with pytest.raises(ValueError, match=r"does not support assisted decoding"):
        iam(llm, slm, ratio=0.5).generate(prompt(25), max_new_tokens=2, assistant_model=llm)


def test_a_foreign_filled_cache_is_refused(pair):
    llm, slm = pair
    filled = forward(llm, prompt(5), use_cache=True).cache
    with pytest.raises(ValueError, match="continues only its own IAMCache, got a filled DynamicCache"):
        forward(iam(llm, slm, ratio=0.5), prompt(1), cache=filled)


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda llm, slm: iam(llm, slm, ratio=1.0), r"another mapping config"),
        (lambda llm, slm: iam(llm, slm, ratio=0.5, slm_cache="int8"), r"SLM cache kind native, not this model's int8"),
        (lambda llm, slm: IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5), H2O(budget=12)), r"eviction policy None, not"),
        (lambda llm, slm: iam(tiny(llm.config.model_type, 6, 64, 4, 2, 0), slm, ratio=0.5), r"another LLM config"),
        (lambda llm, slm: iam(llm, tiny(llm.config.model_type, 3, 32, 2, 1, 3), ratio=0.5), r"another SLM config"),
        (lambda llm, slm: iam(llm, slm, ratio=0.5, kernels=Kernels(flex_from=None)), r"kernel options Kernels\(flex_from=256"),
    ],
)
def test_another_models_cache_is_refused(pair, other, message):
    """A cache records what made it: another model (plan, eviction, SLM cache kind, LLM shape) refuses it by name,
    where it used to continue with the first model's plan, or fail with an IndexError."""
    import copy

    model = iam(*pair, ratio=0.5)
    cache = forward(model, prompt(30)).cache
    with pytest.raises(ValueError, match=rf"this cache was made for .*{message}.*use model.new_cache\(\)"):
        forward(other(*pair), prompt(1), torch.ones(1, 31, dtype=torch.long), cache=cache)
    # a deep copy, and a cache of another wrapper of the same pair and settings, continue alike
    again = iam(*pair, ratio=0.5)
    step = forward(again, prompt(1), torch.ones(1, 31, dtype=torch.long), cache=copy.deepcopy(cache)).logits
    assert torch.equal(step, forward(model, prompt(1), torch.ones(1, 31, dtype=torch.long), cache=cache).logits)


def test_unsupported_attention_implementation(pair):
    llm, slm = pair
    llm.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation 'flex_attention'"):
        IAMForCausalLM(llm, slm)
