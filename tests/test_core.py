"""Mechanics of the paired run on tiny random pairs (Qwen2 and Llama)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from conftest import left_pad, prompt, tiny
from iam import IAMModel, MappingConfig
from iam.cache import CACHE_ARG
from iam.capture import decoder_layers
from iam.generation import PairedSession
from iam.memory import TensorPeak


def llm_logits(llm, ids, mask=None):
    with torch.no_grad():
        return llm(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_identity_twin_maps_each_head_to_itself(twin, ratio):
    llm, slm = twin
    iam = IAMModel(llm, slm, MappingConfig(ratio=ratio))
    ids = prompt(40)
    out = iam(ids)
    heads = llm.config.num_attention_heads
    expected = torch.tensor([[[layer, h] for h in range(heads)] for layer in iam.mapped_layers])
    assert torch.equal(iam.mapping[0], expected)
    assert (out.logits - llm_logits(llm, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_identity_twin_decode_matches_llm_logits(twin, ratio):
    llm, slm = twin
    iam = IAMModel(llm, slm, MappingConfig(ratio=ratio))
    ids = prompt(25)
    out = iam.generate(ids, max_new_tokens=20)
    assert out.shape == (1, 45)
    assert iam.mapping is not None
    # Logits of the LLM alone on the whole generated sequence vs IAM's prefill+decode choices.
    ref = llm_logits(llm, out)[0, 24:-1].argmax(-1)
    assert torch.equal(out[0, 25:], ref)
    # And IAM's own one-shot logits on that sequence equal the LLM's.
    assert (iam(out).logits - llm_logits(llm, out)).abs().max() < 1e-3


def test_mapping_is_actually_used(pair):
    """A different SLM must change the LLM's logits in mapped layers, and leave them alone at ratio 0."""
    llm, slm = pair
    ids = prompt(30)
    mapped = IAMModel(llm, slm, MappingConfig(ratio=0.5))(ids).logits
    unmapped = IAMModel(llm, slm, MappingConfig(ratio=0.0))(ids).logits
    ref = llm_logits(llm, ids)
    assert (mapped - ref).abs().max() > 1e-2
    assert torch.allclose(unmapped, ref, atol=1e-5)


def test_ratio_zero_generate_equals_llm_generate(pair):
    llm, slm = pair
    ids = prompt(12, seed=3, batch=2)
    ours = IAMModel(llm, slm, MappingConfig(ratio=0.0)).generate(ids, max_new_tokens=15)
    theirs = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False)
    assert torch.equal(ours, theirs)


class RowCounter:
    """Counts, per call, the rows per sequence that a projection processes."""

    def __init__(self, modules):
        self.calls: list[int] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, _mod, args, _out):
        self.calls.append(args[0].shape[1])

    def close(self):
        for h in self.handles:
            h.remove()


def test_mapped_layers_skip_q_and_k_projections(pair):
    llm, slm = pair
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5, truncation_threshold=16))
    layers = decoder_layers(llm)
    mapped = [layers[i].self_attn for i in iam.mapped_layers]
    unmapped = [layers[i].self_attn for i in range(4) if i not in iam.mapped_layers]
    qk = RowCounter([m.q_proj for m in mapped] + [m.k_proj for m in mapped])
    qk_unmapped = RowCounter([m.q_proj for m in unmapped])
    v = RowCounter([m.v_proj for m in mapped])
    session_ids = prompt(40, batch=2)
    iam.generate(session_ids, max_new_tokens=6)
    qk.close(), qk_unmapped.close(), v.close()
    # Prefill: one call per projection per mapped layer, on the 16-row window only; decode: none.
    assert qk.calls == [16] * 4
    # The unmapped layers and the mapped V projections run on the prompt and then every decode step.
    assert sorted(qk_unmapped.calls) == sorted([40] * 2 + [1] * 10)
    assert sorted(v.calls) == sorted([40] * 2 + [1] * 10)


def test_kv_bytes_drop_exactly_the_mapped_keys(pair):
    llm, slm = pair
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5))
    ids = prompt(33, batch=2)
    iam.generate(ids, max_new_tokens=5)
    kv = iam.kv_cache_bytes()
    cfg = llm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    tokens = 33 + 4  # the last generated token is never fed back
    per_layer_k = 2 * cfg.num_key_value_heads * tokens * head_dim * 4
    assert kv["baseline"] == cfg.num_hidden_layers * 2 * per_layer_k
    assert kv["llm"] == kv["baseline"] - len(iam.mapped_layers) * per_layer_k
    # Baseline is what the LLM alone really holds for those tokens.
    alone = llm(input_ids=ids, use_cache=True)[1]  # the cache (named ``cache`` from transformers 5.24)
    prefill_alone = sum(layer.keys.nbytes + layer.values.nbytes for layer in alone.layers)
    assert prefill_alone * tokens // 33 == kv["baseline"]
    assert kv["total"] == kv["llm"] + kv["slm"] and kv["slm"] > 0


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_cache_keyword_is_the_one_installed_transformers_takes(family):
    """``with_cache`` must name the argument under which models and decoder layers take their cache; under a
    wrong name the cache would be swallowed by ``**kwargs`` and decoding would silently run without one."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for cls in ("Model", "DecoderLayer", "Attention"):
        assert CACHE_ARG in inspect.signature(getattr(module, family.capitalize() + cls).forward).parameters


def test_batch_equals_solo_runs(pair):
    llm, slm = pair
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5))
    prompts = [prompt(n, seed=n)[0] for n in (22, 35, 28)]
    ids, mask = left_pad(prompts)
    batched = iam.generate(ids, attention_mask=mask, max_new_tokens=12)
    batched_mapping = iam.mapping
    for i, p in enumerate(prompts):
        solo = iam.generate(p[None], max_new_tokens=12)
        assert torch.equal(batched[i, -12:], solo[0, -12:]), f"prompt {i} differs"
        assert torch.equal(batched_mapping[i], iam.mapping[0])


def test_short_prompt_decodes_unmapped_until_threshold(pair):
    llm, slm = pair
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5, establish_threshold=20))
    ids = prompt(5)
    # Until the context holds 20 tokens, IAM is exactly the LLM alone.
    out = iam.generate(ids, max_new_tokens=15)
    assert iam.mapping is None
    assert torch.equal(out, llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False))
    assert iam.kv_cache_bytes()["slm"] == 0
    # One token more and the mapping is established on the 20-token context; mapped K is gone.
    out = iam.generate(ids, max_new_tokens=18)
    assert iam.mapping is not None and iam.mapping.shape == (1, 2, 4, 2)
    assert iam._session.state.window.lengths.tolist() == [20]
    kv = iam.kv_cache_bytes()
    assert kv["slm"] > 0 and kv["llm"] < kv["baseline"]


def test_wrapping_leaves_models_untouched(pair):
    llm, slm = pair
    ids = prompt(30)
    before_llm, before_slm = llm_logits(llm, ids), llm_logits(slm, ids)
    modules = [type(layer.self_attn) for layer in decoder_layers(llm)]
    for cfg in (MappingConfig(ratio=0.5), MappingConfig(ratio=1.0, strategy="front", metric="pearson")):
        IAMModel(llm, slm, cfg).generate(ids, max_new_tokens=4)
    assert [type(layer.self_attn) for layer in decoder_layers(llm)] == modules
    assert slm.config.num_hidden_layers == 2
    assert torch.equal(llm_logits(llm, ids), before_llm)
    assert torch.equal(llm_logits(slm, ids), before_slm)


@pytest.mark.parametrize("metric", ["cosine", "pearson", "minkowski1", "minkowski2", "cosine-norm"])
def test_every_metric_runs_and_identity_still_holds(twin, metric):
    llm, slm = twin
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5, metric=metric))
    ids = prompt(30)
    out = iam(ids)
    heads = llm.config.num_attention_heads
    assert torch.equal(iam.mapping[0, :, :, 1], torch.arange(heads).expand(2, heads))
    assert (out.logits - llm_logits(llm, ids)).abs().max() < 1e-3


def test_similar_strategy_picks_the_best_scoring_layers(pair):
    llm, slm = pair
    iam = IAMModel(llm, slm, MappingConfig(ratio=0.5, strategy="similar"))
    iam(prompt(30))
    scores = iam._session.similarity.amax(-1).mean((1, 2))
    assert iam.mapped_layers == sorted(scores.topk(2).indices.tolist())


def test_loss_matches_llm_at_ratio_zero(pair):
    llm, slm = pair
    ids = prompt(30)
    ours = IAMModel(llm, slm, MappingConfig(ratio=0.0))(ids, labels=ids).loss
    theirs = llm(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, theirs)


def test_int8_slm_cache_halves_slm_bytes_and_keeps_the_mapping(twin):
    llm, slm = twin
    ids = prompt(30, batch=2)
    native = IAMModel(llm, slm, MappingConfig(ratio=0.5))
    int8 = IAMModel(llm, slm, MappingConfig(ratio=0.5, slm_cache="int8"))
    ref = native.generate(ids, max_new_tokens=6)
    out = int8.generate(ids, max_new_tokens=6)
    assert torch.equal(native.mapping, int8.mapping)
    assert torch.equal(out, ref)
    cfg = slm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_elem_row = head_dim * 1 + 4  # int8 values + one fp32 scale per head and token
    expected = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 35 * per_elem_row
    assert int8.kv_cache_bytes()["slm"] == expected
    assert native.kv_cache_bytes()["slm"] == cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 35 * head_dim * 4
    assert int8._session.slm_cache.layers[0].keys.dtype == torch.int8
    logits = int8(ids).logits
    assert (logits - llm_logits(llm, ids)).abs().max() < 0.05


def test_slm_runs_no_lm_head_and_only_as_deep_as_needed(twin):
    llm, slm = twin
    calls = {"head": 0, "deep": 0}
    handles = [slm.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))]
    handles += [
        decoder_layers(slm)[i].register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1)) for i in (2, 3)
    ]
    iam = IAMModel(llm, slm, MappingConfig(layers=[0, 1]))
    iam.generate(prompt(30), max_new_tokens=5)
    for h in handles:
        h.remove()
    assert calls == {"head": 0, "deep": 2}  # layers 2 and 3 ran once, at prefill (to search all SLM heads)
    layers = iam._session.slm_cache.layers
    assert layers[1].values.shape[-2] == 34 and layers[2].values is None and layers[3].values is None


def test_eager_llm_with_padding_identity_twin(twin):
    """An LLM loaded with eager attention (additive float masks) maps as well as an SDPA one."""
    llm, slm = twin
    llm.config._attn_implementation = "eager"
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (24, 31)])
    iam = IAMModel(llm, slm, MappingConfig(ratio=1.0))
    out = iam.generate(ids, attention_mask=mask, max_new_tokens=8)
    ref = llm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert iam.mapping is not None
    assert torch.equal(out, ref)


def test_prefill_sdpa_gets_one_head_size(family, monkeypatch):
    """SLM head size 8, LLM head size 16: q/k are zero-padded so SDPA can use a fused kernel (no T x T matrix)."""
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("iam.attention.F.scaled_dot_product_attention", spy)
    ids = prompt(30)
    out = IAMModel(llm, slm, MappingConfig(ratio=0.5))(ids).logits
    monkeypatch.undo()
    # every SDPA call of the pass (SLM, unmapped and the 2 mapped LLM layers) has one head size for q, k and v
    assert len(seen) == 2 + 4 and all(a == b == c for a, b, c in seen), seen
    assert torch.isfinite(out).all()


def test_long_prefill_runs_flex_attention_with_both_head_sizes(family, monkeypatch):
    """From FLEX_MIN_TOKENS on, mapped prefill runs FlexAttention on the SLM's 8-wide q/k and the LLM's 16-wide V
    (no padding) and agrees with the padded SDPA path; a left-padded batch keeps SDPA."""
    from iam import attention

    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    ids = prompt(40)
    padded = IAMModel(llm, slm, MappingConfig(ratio=0.5))(ids).logits
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(q.shape[-1])
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "FLEX_MIN_TOKENS", 32)
    monkeypatch.setattr("iam.attention.F.scaled_dot_product_attention", spy)
    flex = IAMModel(llm, slm, MappingConfig(ratio=0.5))(ids).logits
    assert attention.flex_kernel(ids.device, torch.float32, 8, 16) is not None
    assert len(calls) == 2 + 2  # the SLM's and the unmapped LLM layers' own; the mapped layers ran flex
    assert torch.allclose(flex, padded, atol=1e-4)
    calls.clear()
    batch, mask = left_pad([prompt(40, seed=1), prompt(36, seed=2)])
    IAMModel(llm, slm, MappingConfig(ratio=0.5))(batch, attention_mask=mask)
    assert len(calls) == 2 + 4


def test_flex_attention_compiles_once_for_any_batch_mapping_and_length(family, monkeypatch):
    """The compiled FlexAttention kernel is specialised to batch and head counts, and after 8 recompilations it falls
    back to an unfused version that builds the T x T scores: one compilation must serve every batch size, number of
    borrowed SLM heads per layer, and length."""
    from iam import attention

    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    monkeypatch.setattr(attention, "FLEX_MIN_TOKENS", 129)  # the tiny models hold 256 positions
    IAMModel(llm, slm, MappingConfig(ratio=0.5))(prompt(140))  # compiles (first use)
    mapped_sdpa = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):  # a mapped SDPA call: LLM-wide (16) q with the SLM's scale
        mapped_sdpa.append(q.shape[-1] == 16 and kwargs.get("scale") == 8**-0.5)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("iam.attention.F.scaled_dot_product_attention", spy)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length, batch, ratio in [(200, 1, 0.5), (150, 3, 1.0), (250, 2, 0.25)]:
            IAMModel(llm, slm, MappingConfig(ratio=ratio))(prompt(length, seed=length, batch=batch))
    assert mapped_sdpa and not any(mapped_sdpa)  # the SLM and unmapped layers ran SDPA, every mapped prefill flex
    with TensorPeak():  # compiled code cannot run under a Python dispatch mode: mapped prefill takes SDPA there
        IAMModel(llm, slm, MappingConfig(ratio=0.5))(prompt(200))
    assert any(mapped_sdpa)


def test_heads_sharing_an_slm_head_and_a_kv_group_are_computed_once(family, monkeypatch):
    """A one-layer, one-head SLM: every LLM head borrows the same SLM head, so each KV group (2 heads here) needs one
    SDPA item, and prefill (deduplicated) still agrees with decode (per head)."""
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 1, 16, 1, 1, seed=1)
    iam = IAMModel(llm, slm, MappingConfig(layers=[1, 3], truncation_threshold=20))
    heads = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        heads.append(q.shape[1])
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("iam.attention.F.scaled_dot_product_attention", spy)
    ids = prompt(30)
    full = iam(ids).logits
    monkeypatch.undo()
    # the SLM layer (1 head), then LLM layers 0-3: unmapped ones see 4 heads, mapped ones 2 items
    assert heads == [1, 4, 2, 4, 2]
    with torch.inference_mode():
        session = PairedSession(iam, ids[:, :-1], torch.ones_like(ids[:, :-1]))
        session.prefill()
        stepped = session.decode(ids[:, -1])
    assert (stepped[:, -1] - full[:, -1]).abs().max() < 1e-4
