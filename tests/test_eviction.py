"""Token eviction in the IAMCache, alone and composed with the mapping, on tiny random pairs."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, left_pad, prompt
from iam import IAMForCausalLM, MappingConfig
from iam.core.eviction import H2O, SnapKV, StreamingLLM, make_policy, parse_budget

POLICIES = [H2O(budget=12, recent=4), SnapKV(budget=12, window=4), StreamingLLM(budget=12, sinks=2)]


def model(llm, slm, policy, **mapping):
    return IAMForCausalLM(llm, slm, MappingConfig(**mapping), policy)


def greedy(m, ids, mask, new=6):
    return m.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_each_policy_keeps_its_budget_per_sequence_and_never_padding(pair, policy, ratio):
    llm, slm = pair
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (30, 22, 26)])
    out = greedy(model(llm, slm, policy, ratio=ratio), ids, mask)
    kept = out.cache.kept
    seen = torch.tensor([30, 22, 26]) + 5  # the last new token is never fed back
    assert torch.equal(kept.seen, seen)
    expected = torch.full((3,), 12) if policy.decode else torch.tensor([12 + 5] * 3)  # SnapKV appends in decode
    assert torch.equal(kept.valid.sum(-1), expected)
    width = int(expected.max())
    layers = [layer for layer in [*out.cache.layers, *out.cache.slm.layers] if layer.values is not None]
    assert all(layer.values.shape[-2] == width for layer in layers)  # evicted bytes are gone from every layer
    for b in range(3):  # kept slots are distinct real tokens (a kept pad slot would repeat position 0)
        real = kept.positions[b][kept.valid[b]].tolist()
        assert len(set(real)) == len(real) == expected[b] and max(real) == seen[b] - 1
        if isinstance(policy, StreamingLLM):
            assert real == [0, 1, *range(int(seen[b]) - 10, int(seen[b]))]  # the sinks and the latest tokens
        if isinstance(policy, H2O):
            assert real[-4:] == list(range(int(seen[b]) - 4, int(seen[b])))  # the recent window


@pytest.mark.parametrize(
    "policy", [H2O(budget=10, recent=3), SnapKV(budget=10, window=3, kernel=7), StreamingLLM(budget=10)], ids=str
)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_a_row_keeps_and_generates_as_it_does_alone(pair, policy, ratio):
    """Exact ties in the priority (SnapKV's max-pooling makes them) go to the newer token, whatever the batch width:
    each row of a batch of very different lengths keeps the tokens, and generates those, of its solo run."""
    llm, slm = pair
    prompts = [prompt(n, seed=n)[0] for n in (60, 24, 41)]
    ids, mask = left_pad(prompts)
    m = model(llm, slm, policy, ratio=ratio)
    batch = greedy(m, ids, mask, new=5)
    for i, p in enumerate(prompts):
        solo = greedy(m, p[None], torch.ones(1, len(p), dtype=torch.long), new=5)
        row = batch.cache.kept
        assert row.positions[i][row.valid[i]].tolist() == solo.cache.kept.positions[0][solo.cache.kept.valid[0]].tolist()
        assert torch.equal(batch.sequences[i, ids.shape[1] :], solo.sequences[0, len(p) :]), f"row {i}"


def test_fraction_budgets_keep_a_share_of_each_sequence(pair):
    llm, slm = pair
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (30, 20)])
    kept = greedy(model(llm, slm, H2O(budget=0.5, recent=4), ratio=0.5), ids, mask, new=4).cache.kept
    assert kept.valid.sum(-1).tolist() == [17, 12]  # ceil(0.5 x 33), ceil(0.5 x 23): a shorter row is front-padded
    assert not kept.valid[1, :5].any()


@pytest.mark.parametrize("policy", [H2O(budget=1.0), SnapKV(budget=1.0), StreamingLLM(budget=1.0)], ids=str)
def test_budget_one_is_no_eviction_token_for_token(pair, policy):
    llm, slm = pair
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (30, 25)])
    plain = greedy(model(llm, slm, None, ratio=0.5), ids, mask, new=10)
    evicting = greedy(model(llm, slm, policy, ratio=0.5), ids, mask, new=10)
    assert torch.equal(plain.sequences, evicting.sequences)
    assert plain.cache.kv_bytes() == evicting.cache.kv_bytes()


def test_h2o_keeps_what_brute_force_attention_sums_choose(pair):
    """After prefill, H2O's kept set is the recent window plus the tokens with the most attention summed over every
    layer, head and query of the LLM alone (eager attention weights, recomputed here)."""
    llm, slm = pair
    llm.config._attn_implementation = "eager"
    ids = prompt(40, seed=7)
    policy = H2O(budget=16, recent=5)
    cache = forward(model(llm, slm, policy, ratio=0.0), ids).cache
    with torch.no_grad():
        attentions = llm(input_ids=ids, output_attentions=True).attentions
    mass = sum(a[0].sum((0, 1)) for a in attentions)  # [T]
    recent = set(range(35, 40))
    heavy = [int(i) for i in mass.argsort(descending=True) if int(i) not in recent][:11]
    assert sorted(cache.kept.positions[0].tolist()) == sorted(recent | set(heavy))


def test_no_borrowed_row_reads_a_dropped_value(twin):
    """The identity twin wholly mapped borrows its own attention: with one kept set for both models, it evicts and
    decodes exactly as the LLM alone under the same policy. A borrowed row over a dropped V would differ."""
    llm, slm = twin
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (34, 28)])
    policy = StreamingLLM(budget=14, sinks=3)
    alone = greedy(model(llm, slm, policy, ratio=0.0), ids, mask, new=12)
    mapped = greedy(model(llm, slm, policy, ratio=1.0), ids, mask, new=12)
    assert torch.equal(mapped.sequences, alone.sequences)
    assert torch.equal(mapped.cache.kept.positions, alone.cache.kept.positions)
    assert mapped.cache.kept.valid.sum(-1).tolist() == [14, 14]


@pytest.mark.parametrize("policy", [H2O(budget=14, recent=3), SnapKV(budget=14, window=3)], ids=str)
def test_scores_count_only_the_borrowed_heads_that_carry_weight(twin, policy):
    """The identity twin with blend 2 borrows each head's own attention with weight 1: scored by the weighted
    borrowed heads it keeps and generates as the LLM alone under the same policy. Zero-weight candidates (other SLM
    layers) used to add their attention to the scores."""
    llm, slm = twin
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (34, 28)])
    alone = greedy(model(llm, slm, policy, ratio=0.0), ids, mask, new=8)
    mapped = greedy(model(llm, slm, policy, layers=[1, 3], blend=2), ids, mask, new=8)
    assert mapped.cache.mapping.mixture[1].nan_to_num(1.0).amax(-1).eq(1.0).all()  # the twin's own head, weight 1
    assert torch.equal(mapped.cache.kept.positions, alone.cache.kept.positions)
    assert torch.equal(mapped.sequences, alone.sequences)


def test_iam_with_h2o_bytes_equal_the_arithmetic(pair):
    llm, slm = pair
    ids = prompt(40, batch=2)
    cache = greedy(model(llm, slm, H2O(budget=16, recent=4), ratio=0.5), ids, torch.ones_like(ids)).cache
    kv = cache.kv_bytes()
    d, d_s, slots, fp32 = 16, 16, 16, 4  # head sizes: 64 / 4 and 32 / 2
    mapped = len(cache.mapping.mapped_layers)
    llm_bytes = 2 * slots * fp32 * d * 2 * ((4 - mapped) * 2 + mapped)  # K+V of 2 KV heads unmapped, V only mapped
    slm_bytes = 2 * slots * fp32 * d_s * 1 * 2 * (cache.mapping.slm_layers[-1] + 1)
    assert (kv["llm"], kv["slm"]) == (llm_bytes, slm_bytes)
    assert kv["baseline"] == 2 * 45 * fp32 * d * 2 * 2 * 4  # every token seen, K and V in every layer


def test_eviction_starts_with_the_mapping_set_in_decode_and_survives_beam_search(pair):
    """A prompt below establish_threshold runs the LLM alone without evicting; the decode step that reaches the
    threshold prefills both models, sets the mapping and evicts from then on, under beam search too."""
    llm, slm = pair
    ids = prompt(12)
    out = model(llm, slm, H2O(budget=10, recent=3), ratio=0.5, establish_threshold=16).generate(
        ids, max_new_tokens=12, do_sample=False, num_beams=2, return_dict_in_generate=True
    )
    cache = out.cache
    assert cache.established and cache.mapping.window.lengths.tolist() == [16, 16]
    assert cache.kept.valid.sum(-1).tolist() == [10, 10] and torch.equal(cache.kept.seen, torch.tensor([23, 23]))
    assert cache.get_seq_length() == 23 and cache.layers[0].get_seq_length() == 10


def test_a_reset_cache_serves_a_new_short_prompt(pair):
    llm, slm = pair
    m = model(llm, slm, StreamingLLM(budget=8, sinks=2), ratio=0.5)
    cache = forward(m, prompt(30)).cache
    cache.reset()
    assert forward(m, prompt(5), cache=cache).logits.shape == (1, 5, 97) and not cache.established


def test_generate_continues_an_evicted_cache(pair):
    """generate() slices the prompt by the cache's length: tokens seen, not the slots kept."""
    llm, slm = pair
    m = model(llm, slm, StreamingLLM(budget=12, sinks=2), ratio=0.5)
    ids = prompt(30)
    cache = m.new_cache()
    first = m.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    assert cache.layers[0].get_seq_length() == 12 and cache.get_seq_length() == 33
    more = m.generate(first, max_new_tokens=3, do_sample=False, cache=cache)
    assert torch.equal(more[:, :34], first) and more.shape == (1, 37) and cache.kept.valid.sum() == 12


def test_a_context_below_the_threshold_is_refused_for_iam(pair):
    from iam.eval.perplexity import eval_perplexity

    llm, slm = pair
    with pytest.raises(ValueError, match="`context` 10 is below establish_threshold 20"):
        eval_perplexity(llm, slm, [prompt(40)], [0.5], MappingConfig(), progress=False, context=10)
    with pytest.raises(ValueError, match=r"`context` 40 must leave tokens to score: 0 < `context` < 40"):
        eval_perplexity(llm, slm, [prompt(40)], [0.0], MappingConfig(), progress=False, context=40)


def test_continuation_reads_the_evicted_cache(pair):
    from iam.eval.perplexity import perplexity

    llm, slm = pair
    windows = [prompt(60, seed=s) for s in (1, 2)]
    full, *_ = perplexity(model(llm, slm, None, ratio=0.0), windows, progress=False, context=40)
    evicted, *_ = perplexity(model(llm, slm, SnapKV(budget=10, window=4), ratio=0.0), windows, progress=False, context=40)
    whole, *_ = perplexity(model(llm, slm, SnapKV(budget=10, window=4), ratio=0.0), windows, progress=False)
    assert evicted != pytest.approx(full)  # the continuation reads what SnapKV kept
    assert whole == pytest.approx(perplexity(model(llm, slm, None, ratio=0.0), windows, progress=False)[0])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: H2O(budget=0.0), r"budget must be a fraction in \(0, 1\] or a token count"),
        (lambda: H2O(budget=-0.5), r"budget must be a fraction in \(0, 1\]"),
        (lambda: H2O(budget=1.5), r"budget must be a fraction in \(0, 1\]"),
        (lambda: H2O(budget=0), r"budget must be a fraction in \(0, 1\] or a token count"),
        (lambda: H2O(budget=4, recent=8), r"budget 4 is smaller than the 8 tokens H2O always keeps"),
        (lambda: StreamingLLM(budget=3, sinks=4), r"budget 3 is smaller than the 4 tokens StreamingLLM always keeps"),
        (lambda: SnapKV(kernel=4), r"SnapKV.kernel must be odd"),
        (lambda: SnapKV(kernel=0), r"SnapKV.kernel must be an integer >= 1 \(tokens\), got 0"),
        (lambda: SnapKV(kernel=2.5), r"SnapKV.kernel must be an integer >= 1 \(tokens\), got 2.5"),
        (lambda: SnapKV(window=0), r"SnapKV.window must be an integer >= 1"),
        (lambda: H2O(recent=-5), r"H2O.recent must be an integer >= 0 \(tokens\), got -5"),
        (lambda: H2O(recent=True), r"H2O.recent must be an integer >= 0"),
        (lambda: StreamingLLM(sinks=-2), r"StreamingLLM.sinks must be an integer >= 0 \(tokens\), got -2"),
        (
            lambda: make_policy("lru", 0.5),
            r"eviction policy must be one of \['draft-kvzip', 'h2o', 'kvzip', 'snapkv', 'streaming'\], got 'lru'",
        ),
        (lambda: make_policy(None, 0.5), r"a budget needs an eviction policy"),
    ],
)
def test_bad_eviction_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_budgets_parse_as_fractions_or_counts():
    assert parse_budget("0.8") == 0.8 and isinstance(parse_budget("1"), float) and parse_budget("256") == 256


def test_kv_tradeoff_points_sit_where_their_arithmetic_puts_them(pair):
    from iam.eval.costs import prefill_flops
    from iam.eval.tradeoff import AXES, eval_kv_tradeoff
    from iam.models.presets import Arch

    llm, slm = pair
    windows = [prompt(60, seed=s) for s in (1, 2)]
    result = eval_kv_tradeoff(
        llm, slm, windows, 40, MappingConfig(), [0.5], ["h2o", "streaming"], [0.5], [0.8], local_windows=[8], progress=False
    )
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert list(rows)[0] == ("LLM alone", None) and rows[("LLM alone", None)]["ppl_increase"] == 0
    for policy in ("h2o", "streaming"):  # 30 of the window's 60 tokens kept
        row = rows[(f"LLM alone + {policy}", 0.5)]
        assert row["llm_kv_dropped"] == pytest.approx(0.5) and row["total_kv"] == pytest.approx(0.5)
    iam = rows[("IAM", None)]
    assert iam["llm_kv_dropped"] == pytest.approx(0.25)  # 2 of 4 layers lose K: a quarter of the LLM's KV
    big, small = (Arch.from_config(m.config.to_dict()) for m in (llm, slm))
    assert iam["total_kv"] > 0.75 and iam["prefill_flops"] == prefill_flops(big, small, 2, 40) / prefill_flops(big, small, 0, 40)
    assert rows[("LLM alone + h2o", 0.5)]["prefill_flops"] == 1  # eviction saves no prefill arithmetic
    local = rows[("IAM, exact window 8", None)]  # the mapped layers keep K of 4 sinks + 8 recent of 60 tokens
    assert local["llm_kv_dropped"] == pytest.approx(0.25 * (1 - 12 / 60))
    assert local["prefill_flops"] == prefill_flops(big, small, 2, 40, 12) / prefill_flops(big, small, 0, 40)
    assert local["prefill_flops"] > iam["prefill_flops"]  # Q/K projected again
    combined = rows[("IAM + h2o", 0.8)]
    assert combined["llm_kv_dropped"] == pytest.approx(1 - 0.75 * 0.8)  # 48 of 60 tokens kept
    assert combined["total_kv"] == pytest.approx(iam["total_kv"] * 0.8)
    for row in rows.values():  # every KV axis, each with its frontier mark
        assert row["total_kv_dropped"] == pytest.approx(1 - row["total_kv"]) and {m: type(row[m]) for m in AXES} == dict.fromkeys(
            AXES, bool
        )
    assert rows[("LLM alone + h2o", 0.5)]["total_kv_dropped_at_72b"] == pytest.approx(0.5)  # no SLM: the LLM's share
    assert iam["total_kv_dropped"] < iam["total_kv_dropped_at_72b"] < iam["llm_kv_dropped"]  # the paper's SLM is small
