"""KVzip and draft-KVzip eviction and the int4 cache, on tiny random pairs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import forward, left_pad, prompt
from iam import IAMForCausalLM, MappingConfig
from iam.core.eviction import DraftKVzip, KVzip, repeat_prompt
from iam.core.layers import Int4Layer, quantize4

PROMPT = (3, 4, 5)


def model(llm, slm, policy, **mapping):
    return IAMForCausalLM(llm, slm, MappingConfig(**mapping), policy)


def greedy(m, ids, mask, new=5, **kwargs):
    return m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, **kwargs)


def slots_of(kept: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Where each kept row ``[S', d]`` sits in ``full`` ``[S, d]`` (exact match): which slots a cache layer kept."""
    return [int((full == row).all(-1).nonzero()[0]) for row in kept]


def brute_force(llm, ids: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer ``[KV heads, T]``: the most attention any repeat query (prompt, then each chunk of the context
    counted from its end) gives each context token, max over the KV group's query heads, from eager attention
    weights over the whole sequence (context, prompt, chunk)."""
    t, scores = ids.shape[1], None
    for end in range(t, 0, -chunk):
        full = torch.cat([ids, torch.tensor([PROMPT]), ids[:, max(end - chunk, 0) : end]], -1)
        with torch.no_grad():
            attentions = llm(input_ids=full, output_attentions=True).attentions
        kv = llm.config.num_key_value_heads
        now = [a[0, :, t:, :t].amax(1).unflatten(0, (kv, -1)).amax(1) for a in attentions]
        scores = now if scores is None else [torch.maximum(x, y) for x, y in zip(scores, now)]
    return scores


def brute_force_widths(scores: list[torch.Tensor], sinks: int, budget: int) -> list[int]:
    """Slots each layer keeps under one ranking of every layer's slots: a layer's ``r``-th slot is worth its best
    KV group's ``r``-th score (the sinks first), the ``budget * layers`` most worthy win (ties: earlier layer, slot)."""
    entries = []
    for layer, s in enumerate(scores):
        ranked = [sorted([math.inf] * sinks + s[g][sinks:].tolist(), reverse=True) for g in range(s.shape[0])]
        entries += [(-max(col), layer, r) for r, col in enumerate(zip(*ranked))]
    widths = [0] * len(scores)
    for _, layer, _ in sorted(entries)[: budget * len(scores)]:
        widths[layer] += 1
    return widths


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("chunk", [2048, 16])
def test_kvzip_keeps_what_brute_force_reconstruction_attention_chooses(pair, chunk, layerwise):
    """Each KV group of each layer keeps its sinks and the tokens its repeat queries attend to most, as many as the
    budget gives its layer (one ranking over the layers, or the budget in each), and those slots hold exactly the
    prefilled keys and values: the repeat pass left nothing of its own in the cache."""
    llm, slm = pair
    llm.config._attn_implementation = "eager"
    ids = prompt(40, seed=3)
    policy = KVzip(budget=16, sinks=2, chunk=chunk, prompt=PROMPT, layerwise=layerwise)
    cache = forward(model(llm, slm, policy, ratio=0.0), ids).cache
    full = forward(model(llm, slm, None, ratio=0.0), ids).cache
    scores = brute_force(llm, ids, chunk)
    widths = [16] * len(scores) if layerwise else brute_force_widths(scores, 2, 16)
    assert [layer.keys.shape[2] for layer in cache.layers] == widths
    assert layerwise or len(set(widths)) > 1  # the ranking moves slots between layers
    for layer, (kept, plain, width) in enumerate(zip(cache.layers, full.layers, widths)):
        for g in range(kept.keys.shape[1]):
            rest = scores[layer][g][2:].argsort(descending=True)[: width - 2] + 2
            expected = sorted([0, 1, *rest.tolist()])
            assert slots_of(kept.keys[0, g], plain.keys[0, g]) == expected, (layer, g)
            assert torch.equal(kept.values[0, g], plain.values[0, g, expected])


def test_kvzip_groups_choose_different_tokens_and_mapped_layers_share_one_set(pair):
    """With IAM, a layer that keeps K picks per KV group; a mapped layer's V and the SLM keep the shared set, the
    same slots of the uncompressed cache."""
    llm, slm = pair
    ids = prompt(40, seed=5)
    policy = KVzip(budget=0.4, sinks=2, prompt=PROMPT)
    m = model(llm, slm, policy, layers=[1, 3])
    cache, full = forward(m, ids).cache, forward(model(llm, slm, None, layers=[1, 3]), ids).cache
    shared = cache.kept.positions[0].tolist()
    assert len(shared) == 16 and shared[:2] == [0, 1]
    own = [slots_of(cache.layers[0].keys[0, g], full.layers[0].keys[0, g]) for g in range(2)]
    assert own[0] != own[1]
    for layer in (1, 3):
        assert torch.equal(cache.layers[layer].values[0], full.layers[layer].values[0][:, shared])
    for kept, plain in zip(cache.slm.layers, full.slm.layers):
        assert torch.equal(kept.keys[0], plain.keys[0][:, shared])


@pytest.mark.parametrize(
    "policy, mapping",
    [
        (KVzip(budget=12, sinks=2, prompt=PROMPT), {"ratio": 0.0}),
        (KVzip(budget=12, sinks=2, chunk=16, prompt=PROMPT), {"ratio": 0.5}),
        (DraftKVzip(budget=12, sinks=2, prompt=PROMPT), {"ratio": 0.0}),
        (DraftKVzip(budget=0.5, sinks=2, prompt=PROMPT), {"ratio": 0.5}),
        (None, {"ratio": 0.0, "llm_cache": "int4", "int4_group": 8, "int4_residual": 8}),
        (
            KVzip(budget=24, prompt=PROMPT),
            {"ratio": 0.5, "llm_cache": "int4", "slm_cache": "int4", "int4_group": 8, "int4_residual": 8},
        ),
    ],
    ids=str,
)
def test_a_row_keeps_and_generates_as_it_does_alone(pair, policy, mapping):
    """Left padding changes nothing for a row: its kept tokens and its greedy tokens equal its solo run. (int4 keys
    are quantized per channel over blocks of slots, so the rows' padding here is a whole number of blocks.)"""
    llm, slm = pair
    prompts = [prompt(n, seed=n)[0] for n in (56, 24, 40)]
    ids, mask = left_pad(prompts)
    m = model(llm, slm, policy, **mapping)
    batch = greedy(m, ids, mask)
    for i, p in enumerate(prompts):
        solo = greedy(m, p[None], torch.ones(1, len(p), dtype=torch.long))
        if policy is not None:
            row, alone = batch.cache.kept, solo.cache.kept
            assert row.positions[i][row.valid[i]].tolist() == alone.positions[0][alone.valid[0]].tolist()
        assert torch.equal(batch.sequences[i, ids.shape[1] :], solo.sequences[0, len(p) :]), f"row {i}"


def test_the_identity_twin_with_draft_kvzip_equals_the_llm_alone_with_kvzip(twin):
    """The SLM repeating the context scores exactly what the LLM would when it is the LLM: same kept slots in every
    KV group, same tokens, and the SLM's cache is gone once scoring is done."""
    llm, slm = twin
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (36, 30)])
    alone = greedy(model(llm, slm, KVzip(budget=14, prompt=PROMPT), ratio=0.0), ids, mask, new=8)
    draft = greedy(model(llm, slm, DraftKVzip(budget=14, prompt=PROMPT), ratio=0.0), ids, mask, new=8)
    assert torch.equal(draft.sequences, alone.sequences)
    for a, d in zip(alone.cache.layers, draft.cache.layers):
        assert torch.equal(a.keys, d.keys) and torch.equal(a.values, d.values)
    assert draft.cache.kv_bytes() == alone.cache.kv_bytes()
    assert draft.cache.kv_bytes()["slm"] == 0


def test_kvzip_keeps_the_exact_local_windows_tokens(pair):
    llm, slm = pair
    ids = prompt(50, seed=2)
    m = model(llm, slm, KVzip(budget=20, sinks=0, prompt=PROMPT), ratio=0.5, local_window=6, local_sinks=3)
    out = greedy(m, ids, torch.ones_like(ids), new=4)
    kept = out.cache.kept.positions[0].tolist()
    assert kept[:3] == [0, 1, 2] and kept[14:20] == list(range(44, 50))  # the local sinks and window
    assert len(kept) == 23  # 20 kept, then 3 decoded (the last new token is never fed back)


def test_int4_round_trips_within_its_bound_and_counts_its_bytes():
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 70, 16) * 4, torch.randn(2, 3, 70, 16)
    layer = Int4Layer(group=8, residual=10)
    keys, values = layer.update(k, v)
    code, scale, _ = quantize4(k[:, :, :56].unflatten(-2, (-1, 8)), -2)
    assert (keys[:, :, :56] - k[:, :, :56]).abs().unflatten(-2, (-1, 8)).le(scale / 2 + 1e-6).all()
    vs = quantize4(v[:, :, :56].unflatten(-1, (-1, 8)), -1)[1]
    assert (values[:, :, :56] - v[:, :, :56]).abs().unflatten(-1, (-1, 8)).le(vs / 2 + 1e-6).all()
    assert torch.equal(keys[:, :, 56:], k[:, :, 56:]) and torch.equal(values[:, :, 56:], v[:, :, 56:])  # the residual
    quantized = 2 * 3 * 56 * 8 * 2  # two 4-bit codes a byte, K and V
    scales = 2 * 3 * (56 // 8 * 16 + 56 * 16 // 8) * 2 * 4  # scale and zero per group, fp32
    assert layer.nbytes == quantized + scales + 2 * 2 * 3 * 14 * 16 * 4


def test_int4_cache_bytes_in_a_paired_run_are_counted_in_closed_form(pair):
    """60 tokens, group 8, residual 16: 40 slots quantized (5 key blocks), 20 in full precision, per layer of 2 KV
    heads of 16 channels in fp32: codes 2 x 40 x 8 bytes for K and for V, 5 x 16 key and 40 x 2 value (scale, zero)
    pairs per head, and the residual's K and V."""
    llm, slm = pair
    ids = prompt(60, seed=1)
    cache = forward(model(llm, slm, None, ratio=0.0, llm_cache="int4", int4_group=8, int4_residual=16), ids).cache
    per_layer = 2 * (2 * 40 * 8) + 2 * (5 * 16 + 40 * 2) * 2 * 4 + 2 * 2 * 20 * 16 * 4
    assert cache.kv_bytes()["llm"] == 4 * per_layer
    assert cache.kv_bytes()["baseline"] == 4 * 2 * 2 * 60 * 16 * 4


def test_int4_with_a_policy_that_evicts_at_every_step_is_refused(pair):
    llm, slm = pair
    from iam.core.eviction import H2O

    with pytest.raises(ValueError, match=r"H2O evicts at every decode step, and an int4 cache would quantize its keys"):
        model(llm, slm, H2O(budget=0.5), ratio=0.5, slm_cache="int4", int4_group=8)


def test_kvzip_under_tensor_parallelism_is_refused_by_name(pair):
    from iam.core.families import check_features

    with pytest.raises(ValueError, match=r"DraftKVzip scores per KV group from every rank's heads"):
        check_features(pair[0].config, 0, DraftKVzip(), tensor_parallel=True)


def test_an_slm_cache_part_without_a_mapping_is_refused():
    from iam.eval.setup import parse_setup

    with pytest.raises(ValueError, match=r"the LLM alone keeps no SLM cache; slm-int8/slm-int4 need iam<ratio>"):
        parse_setup("llm+slm-int4")
    assert parse_setup("llm+draft-kvzip@0.5+slm-int4").slm_cache == "int4"


def test_repeat_prompt_ends_with_the_assistants_turn():
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<u>{messages[0]['content']}</u><a>"

        def __call__(self, text, add_special_tokens):
            return type("E", (), {"input_ids": [ord(c) for c in text]})

    assert bytes(repeat_prompt(Chat())).decode() == "\n\nRepeat the previous context exactly.</u><a>"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KVzip(budget=3, sinks=4), r"budget 3 is smaller than the 4 tokens KVzip always keeps"),
        (lambda: KVzip(prompt=(1, -2)), r"KVzip.prompt must be token ids"),
        (lambda: DraftKVzip(chunk=0), r"DraftKVzip.chunk must be an integer >= 1"),
        (lambda: MappingConfig(llm_cache="int3"), r"llm_cache must be one of \['native', 'int8', 'int4'\]"),
        (lambda: MappingConfig(int4_group=1), r"int4_group must be an integer >= 2"),
    ],
)
def test_bad_settings_name_the_setting(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_int4_group_must_divide_the_head_dimension(pair):
    llm, slm = pair  # head dimensions 16 and 16
    with pytest.raises(ValueError, match=r"int4_group 12 must divide the LLM's head dimension 16"):
        model(llm, slm, None, ratio=0.0, llm_cache="int4", int4_group=12)
    with pytest.raises(ValueError, match=r"int4_group 32 must divide the SLM's head dimension 16"):
        model(llm, slm, None, ratio=0.5, slm_cache="int4")


def test_draft_kvzip_without_an_slm_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"an SLM is needed \(draft-kvzip scores with it\)"):
        IAMForCausalLM.from_pretrained(llm=tmp_path / "missing", slm=None, ratio=0.0, eviction=DraftKVzip(budget=0.5))
