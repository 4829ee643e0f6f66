"""The core checks on a tiny random pair of each family beyond Qwen2 and Llama (those run every mechanics test,
``conftest.CORE_FAMILIES``): Qwen3 (q/k norms, head sizes 24 and 16, not hidden / heads), Mistral, Phi-3 (fused QKV),
Gemma 2 (local and global layers, soft-capped logits) and Gemma 3 (local and global layers with their own RoPE,
q/k norms); then what only Gemma and Phi-3 have, and the pairs that are refused before loading."""

from __future__ import annotations

import copy

import pytest
import torch
from test_core import greedy, llm_logits

from conftest import CORE_FAMILIES, FAMILIES, LOCAL_WINDOW, forward, iam, left_pad, prompt, save_tiny_pair, tiny
from iam import IAMForCausalLM, MappingConfig
from iam.core.decoder import decoder_layers, projection
from iam.core.families import layer_kinds
from iam.core.step import SLMStep
from iam.eval.analysis import head_similarity

NEW = sorted(set(FAMILIES) - set(CORE_FAMILIES))


@pytest.fixture(params=NEW)
def new_family(request) -> str:
    return request.param


def test_saved_identity_twin_is_the_llm_alone_in_a_padded_batch_and_beams(new_family, tmp_path):
    """The pair saved with its tokenizer and loaded by path; the twin (LLM = SLM), every layer mapped, gives the LLM's
    prefill logits, greedy tokens and beams on a left-padded batch."""
    llm_folder, _ = save_tiny_pair(tmp_path, family=new_family)
    model = IAMForCausalLM.from_pretrained(llm_folder, llm_folder, ratio=1.0, progress=False)
    llm = model.llm
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (27, 34)])
    out = forward(model, ids, mask)
    assert out.cache.established and out.cache.mapping.mapped_layers == [0, 1, 2, 3]
    real = mask.bool()
    assert (out.logits - llm_logits(llm, ids, mask))[real].abs().max() < 1e-3
    assert torch.equal(greedy(model, ids, mask, new=8).sequences, greedy(llm, ids, mask, new=8).sequences)
    beams = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(ids, **beams), llm.generate(ids, **beams))


class ProjectionRows:
    """Every ``F.linear`` call on the Q/K/V weights of some attention modules, as ``(layer, part, tokens)``: which
    part's rows (of a separate projection, or of a fused ``qkv_proj``) it computed, on how many tokens."""

    def __init__(self, attns: dict[int, torch.nn.Module], monkeypatch) -> None:
        self.calls: list[tuple[int, str, int]] = []
        self.parts = {}
        for layer, attn in attns.items():
            for part in "qkv":
                proj, first = projection(attn, part)
                rows = attn.config.num_attention_heads if part == "q" else attn.config.num_key_value_heads
                self.parts[(layer, part)] = (proj.weight.untyped_storage().data_ptr(), first, first + rows * attn.head_dim)
        real = torch.nn.functional.linear

        def linear(x, weight, bias=None):
            ptr, row = weight.untyped_storage().data_ptr(), weight.storage_offset() // weight.shape[1]
            for (layer, part), (p, a, b) in self.parts.items():
                if p == ptr and row < b and row + weight.shape[0] > a:  # the call computes rows of this part
                    self.calls.append((layer, part, x.shape[1]))
            return real(x, weight, bias)

        monkeypatch.setattr(torch.nn.functional, "linear", linear)

    def of(self, layer: int, part: str) -> list[int]:
        return sorted(t for i, p, t in self.calls if (i, p) == (layer, part))


def test_mapped_layers_make_no_qk_projection_and_hold_no_k(new_family, monkeypatch):
    """Through generate(): a mapped layer computes Q/K rows (a fused qkv_proj's too) on the establishing window only,
    V rows on every token, and caches no K; an unmapped layer computes all three on every token."""
    llm, slm = tiny(new_family, 4, 64, 4, 2, seed=0), tiny(new_family, 2, 32, 2, 1, seed=1)
    model = iam(llm, slm, layers=[1, 2], truncation_threshold=16)
    counted = ProjectionRows({i: decoder_layers(llm)[i].self_attn for i in range(4)}, monkeypatch)
    out = greedy(model, prompt(40, batch=2), new=6)
    every = sorted([40] + [1] * 5)
    for layer in (1, 2):
        assert counted.of(layer, "q") == counted.of(layer, "k") == [16], new_family
        assert counted.of(layer, "v") == every
        slots = 45 if out.cache.windows[layer] is None else LOCAL_WINDOW - 1  # a Gemma local layer keeps its window
        assert out.cache.layers[layer].keys.shape[-2] == 0 and out.cache.layers[layer].values.shape[-2] == slots
    for layer in (0, 3):
        assert counted.of(layer, "q") == counted.of(layer, "k") == counted.of(layer, "v") == every


def test_phi3_fused_projection_computes_only_v_rows_in_mapped_layers(monkeypatch):
    """Counted on qkv_proj's weight: a mapped Phi-3 layer never calls the fused module; it computes its V rows (one
    view, one call per forward) and, on the establishing window only, its Q and K rows."""
    llm, slm = tiny("phi3", 4, 64, 4, 2, seed=0), tiny("phi3", 2, 32, 2, 1, seed=1)
    attn = decoder_layers(llm)[2].self_attn
    d, heads, kv = attn.head_dim, 4, 2
    module_calls = []
    attn.qkv_proj.register_forward_hook(lambda *_: module_calls.append(1))
    seen = []
    real = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if weight.untyped_storage().data_ptr() == attn.qkv_proj.weight.untyped_storage().data_ptr():
            seen.append((weight.storage_offset() // weight.shape[1], weight.shape[0], x.shape[1]))
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    greedy(iam(llm, slm, layers=[2], truncation_threshold=16), prompt(30), new=4)
    assert module_calls == []
    q_rows, k_rows, v_rows = (0, heads * d), (heads * d, kv * d), ((heads + kv) * d, kv * d)
    assert seen == [(*q_rows, 16), (*k_rows, 16)] + [(*v_rows, t) for t in (30, 1, 1, 1)]


def test_batch_equals_solo_runs(new_family):
    """Each row of a left-padded batch gets its own mapping and the tokens of its solo run."""
    llm, slm = tiny(new_family, 4, 64, 4, 2, seed=0), tiny(new_family, 2, 32, 2, 1, seed=1)
    model = iam(llm, slm, ratio=0.5)
    prompts = [prompt(n, seed=n)[0] for n in (22, 35)]
    ids, mask = left_pad(prompts)
    batched = greedy(model, ids, mask, new=8)
    for i, p in enumerate(prompts):
        solo = greedy(model, p[None], new=8)
        assert torch.equal(batched.sequences[i, -8:], solo.sequences[0, -8:]), f"prompt {i} differs"
        assert torch.equal(batched.cache.mapping.head_mapping[i], solo.cache.mapping.head_mapping[0])


def test_kv_bytes_drop_exactly_the_mapped_keys(new_family):
    """K and V of every layer at the config's head size, less K of the mapped layers, a Gemma local layer's last
    W - 1 slots only; the baseline is exactly what the LLM alone holds."""
    llm, slm = tiny(new_family, 4, 64, 4, 2, seed=0), tiny(new_family, 2, 32, 2, 1, seed=1)
    ids = prompt(33, batch=2)
    cache = greedy(iam(llm, slm, ratio=0.5), ids, new=5).cache
    kv, cfg = cache.kv_bytes(), llm.config
    d = decoder_layers(llm)[0].self_attn.head_dim
    tokens = 33 + 4  # the last generated token is never fed back
    per_slot = 2 * cfg.num_key_value_heads * d * 4  # K (or V) of one slot of a layer, both sequences, fp32
    local = new_family.startswith("gemma")
    slots = [LOCAL_WINDOW - 1 if local and kind == "sliding_attention" else tokens for kind in layer_kinds(cfg)]
    mapped = cache.mapping.mapped_layers
    assert kv["llm"] == sum((1 if i in mapped else 2) * per_slot * n for i, n in enumerate(slots))
    assert kv["baseline"] == sum(2 * per_slot * n for n in slots)
    alone = greedy(llm, ids, new=5).cache
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in alone.layers) == kv["baseline"]
    s_d = decoder_layers(slm)[0].self_attn.head_dim
    depth = cache.mapping.slm_layers[-1] + 1
    assert kv["slm"] == depth * 2 * slm.config.num_key_value_heads * 2 * tokens * s_d * 4


@pytest.mark.parametrize("gemma", ["gemma2", "gemma3_text"])
def test_local_layers_borrow_within_their_window_from_local_layers(gemma, monkeypatch):
    """A local LLM layer borrows from local SLM layers only, a global one from global ones; the decode row of a
    local SLM layer puts weight on exactly the window's slots (off by one either way, a slot is wrong)."""
    llm, slm = tiny(gemma, 4, 64, 4, 2, seed=0), tiny(gemma, 2, 32, 2, 1, seed=1)
    model = iam(llm, slm, ratio=1.0)
    rows = {}
    real = SLMStep.decode_rows

    def spy(self, layer, attention_mask):
        out = real(self, layer, attention_mask)
        rows[layer] = out.clone()
        return out

    monkeypatch.setattr(SLMStep, "decode_rows", spy)
    out = greedy(model, prompt(30), new=2)
    heads = out.cache.mapping.head_mapping[0]  # [4 layers, H, 2]; the layers are local, global, local, global
    assert (heads[[0, 2], :, 0] == 0).all() and (heads[[1, 3], :, 0] == 1).all()  # SLM layer 0 is local, 1 global
    local, full = rows[0][0], rows[1][0]  # [H_s, 31]: the new token reads slots 0..30
    assert (local[:, : 31 - LOCAL_WINDOW] == 0).all() and (local[:, 31 - LOCAL_WINDOW :] > 0).all()
    assert (full > 0).all()


@pytest.mark.parametrize("gemma", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("llm_cache", ["native", "int8"])
def test_a_continuation_over_local_layers_windows_equals_one_prefill(gemma, llm_cache):
    """Local layers keep their last W - 1 slots: a continuation scored over the cache (its mapped local layers' V and
    borrowed rows cut to the window, its masks sized by the windowed layers) gives the logits of one prefill."""
    llm, slm = tiny(gemma, 4, 64, 4, 2, seed=0), tiny(gemma, 2, 32, 2, 1, seed=1)
    model = iam(llm, slm, ratio=1.0, truncation_threshold=16, llm_cache=llm_cache)
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (40, 45)])
    first = forward(model, ids[:, :30], mask[:, :30])
    assert first.cache.layers[0].values.shape[-2] == LOCAL_WINDOW - 1 and first.cache.layers[1].values.shape[-2] == 30
    rest = forward(model, ids[:, 30:], mask, cache=first.cache).logits
    step = forward(model, ids[:, 30:31], mask[:, :31], cache=forward(model, ids[:, :30], mask[:, :30]).cache).logits
    full = forward(model, ids, mask).logits
    tolerance = 1e-4 if llm_cache == "native" else 0.05
    assert (rest - full[:, 30:]).abs().max() < tolerance and (step - full[:, 30:31]).abs().max() < tolerance


def test_borrowed_logits_are_soft_capped_where_the_llm_caps():
    """Gemma 2 with a soft-cap low enough to matter: the twin equals the LLM alone in prefill and decode only where
    the borrowed SLM logits are capped as the LLM's layer caps its own."""
    llm = tiny("gemma2", 4, 64, 4, 2, seed=0)
    uncapped = copy.deepcopy(llm)
    for layer, none in zip(decoder_layers(llm), decoder_layers(uncapped)):
        layer.self_attn.attn_logit_softcapping, none.self_attn.attn_logit_softcapping = 1.0, None
    slm = copy.deepcopy(llm)
    ids = prompt(30, batch=2)
    assert (llm_logits(llm, ids) - llm_logits(uncapped, ids)).abs().max() > 0.1  # the cap changes the LLM
    model = iam(llm, slm, ratio=1.0)
    assert (forward(model, ids).logits - llm_logits(llm, ids)).abs().max() < 1e-3
    assert torch.equal(greedy(model, ids, new=6).sequences, greedy(llm, ids, new=6).sequences)


def refused_before_loading(tmp_path, monkeypatch, llm, slm, match: str, **mapping) -> None:
    """Save two configs and check that ``from_pretrained`` refuses them, with ``match``, before any weights load."""
    from iam.models import loading

    llm.save_pretrained(tmp_path / "big")
    slm.save_pretrained(tmp_path / "small")
    monkeypatch.setattr(loading, "load_pair", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=match):
        IAMForCausalLM.from_pretrained(tmp_path / "big", tmp_path / "small", progress=False, **mapping)


def test_unserved_pairs_are_refused_before_loading_naming_why(tmp_path, monkeypatch):
    from transformers import Gemma3Config

    from iam.core.eviction import make_policy
    from iam.core.families import check_features

    config = lambda family, layers=2: tiny(family, layers, 32, 2, 1, seed=1).config  # noqa: E731
    mistral = config("mistral")
    mistral.sliding_window = 8
    refused_before_loading(
        tmp_path / "a",
        monkeypatch,
        mistral,
        config("mistral"),
        r"LLM has sliding-window .*sliding_window=8.*narrower than its 256 positions.*max_position_embeddings to 8",
    )
    wide = tiny("mistral", 2, 32, 2, 1, seed=0)
    wide.config.sliding_window = 256  # as wide as any context: served
    IAMForCausalLM(wide, tiny("mistral", 2, 32, 2, 1, seed=1), MappingConfig())
    vision = Gemma3Config(text_config=dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))
    refused_before_loading(
        tmp_path / "b", monkeypatch, vision, config("gemma3_text"), r"LLM is a Gemma 3 vision-language .*gemma3_text"
    )
    only_global = config("gemma2")
    only_global.layer_types = ["full_attention"] * 2
    embedding = config("gemma3_text")
    embedding.use_bidirectional_attention = True
    refused_before_loading(tmp_path / "g", monkeypatch, config("gemma3_text"), embedding, r"SLM attends bidirectionally")
    refused_before_loading(
        tmp_path / "c", monkeypatch, config("gemma2"), only_global, r"LLM layers \[0\] are sliding_attention but the SLM has no"
    )
    refused_before_loading(
        tmp_path / "d",
        monkeypatch,
        config("gemma2"),
        config("gemma2"),
        "token eviction is not served",
        eviction=make_policy("h2o", 0.5),
    )
    refused_before_loading(
        tmp_path / "e", monkeypatch, config("gemma3_text"), config("gemma3_text"), "local_window is not served", local_window=8
    )
    refused_before_loading(
        tmp_path / "f",
        monkeypatch,
        config("gemma2"),
        config("gemma2"),
        r"blend 3 exceeds the SLM's 2 heads in full_attention layers",
        blend=3,
    )
    with pytest.raises(ValueError, match="phi3 fuses Q, K and V in one qkv_proj, which IAM does not shard"):
        check_features(config("phi3"), None, None, tensor_parallel=True)


def test_blend_int8_window_and_eviction_where_served(new_family):
    """What the README's family table claims, on the twin: a blend of two SLM heads (the second weighs 0) and the
    exact local window are the LLM alone; int8 caches and H2O eviction run through generate() and shrink the caches
    (local window and eviction only where the family serves them, see the refusals above)."""
    from iam.core.eviction import make_policy
    from iam.core.families import family

    llm = tiny(new_family, 4, 64, 4, 2, seed=0)
    slm = copy.deepcopy(llm)
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (26, 33)])
    alone = greedy(llm, ids, mask, new=6).sequences
    served = family(llm.config)
    exact = [{"ratio": 0.5, "blend": 2}] + ([] if served.local_layers else [{"ratio": 0.5, "local_window": 8}])
    for mapping in exact:
        assert torch.equal(greedy(iam(llm, slm, **mapping), ids, mask, new=6).sequences, alone), mapping
    int8 = greedy(iam(llm, slm, ratio=0.5, slm_cache="int8", llm_cache="int8"), ids, mask, new=6).cache
    assert int8.slm.layers[0].keys.dtype == torch.int8 and int8.kv_bytes()["llm"] < int8.kv_bytes()["baseline"] / 2
    if not served.local_layers:
        policy = make_policy("h2o", 20)
        evicted = greedy(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.5), eviction=policy), ids, mask, new=6).cache
        assert evicted.layers[0].keys.shape[-2] == 20


def test_attention_across_tokenizers_reads_gemma_layers_as_they_attend():
    """``alignment.attention_probs`` (similarity across tokenizers) keeps every key of a local layer and its window:
    a local layer's rows are zero past the window, a global layer's are not."""
    from iam.eval.alignment import attention_probs

    probs = attention_probs(tiny("gemma2", 2, 32, 2, 1, seed=1), prompt(20))  # [L, H, T, T]: layer 0 local, 1 global
    far = torch.ones(20, 20, dtype=torch.bool).tril(-LOCAL_WINDOW)
    assert (probs[0][:, far] == 0).all() and (probs[1][:, far] > 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 20))


def test_similarity_analysis_reads_every_slm_head_and_the_similar_strategy_borrowable_ones():
    """``head_similarity`` (``iam similarity``) scores every SLM head; the ``similar`` strategy's probe gives heads of
    the other layer kind ``-inf``, so that no layer is chosen for a head it cannot borrow."""
    llm, slm = tiny("gemma3_text", 4, 64, 4, 2, seed=0), tiny("gemma3_text", 2, 32, 2, 1, seed=1)
    model = iam(llm, slm, ratio=0.5, strategy="similar")
    assert torch.isfinite(head_similarity(model, prompt(30))).all()
    probe = forward(model, prompt(30)).cache.mapping.probe  # [L, B, H, L_s * H_s]; SLM layer 0 local, 1 global
    assert probe[[0, 2]][..., 2:].isinf().all() and probe[[1, 3]][..., :2].isinf().all()
    assert torch.isfinite(probe[[0, 2]][..., :2]).all() and torch.isfinite(probe[[1, 3]][..., 2:]).all()


def test_lora_tunes_phi3_through_its_fused_projection(tmp_path):
    """LoRA on Phi-3's SLM adapts its fused qkv_proj (the only projection that shapes its attention) and nothing else."""
    from conftest import char_tokenizer
    from iam.tuning import TuneConfig, load_tuning_data, tune_slm

    llm_folder, _ = save_tiny_pair(tmp_path, family="phi3")
    llm, slm = tiny("phi3", 4, 64, 4, 2, seed=0), tiny("phi3", 2, 32, 2, 1, seed=1)
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    data = load_tuning_data(char_tokenizer(), [str(tmp_path / "train.txt")], "lm", 32, 256)
    original = copy.deepcopy(slm.state_dict())
    config = TuneConfig(MappingConfig(strategy="back", ratio=0.5), method="lora", batch_size=2, grad_accum=1, max_steps=2)
    result = tune_slm(llm, slm, char_tokenizer(), data, tmp_path / "run", llm_folder, config, progress=False)
    tuned = type(slm).from_pretrained(result["model"])
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(".qkv_proj." in k for k in changed), changed
