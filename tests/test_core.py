"""Mechanics of the paired run on tiny random pairs (Qwen2 and Llama)."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, iam, left_pad, prompt, tiny
from iam.bench.memory import TensorPeak
from iam.core.decoder import decoder_layers
from iam.core.kernels import Kernels


def llm_logits(llm, ids, mask=None):
    return forward(llm, ids, mask).logits


def greedy(model, ids, mask=None, new=8, **kwargs):
    """Greedy ``generate`` of exactly ``new`` tokens, with the cache returned."""
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_identity_twin_maps_each_head_to_itself(twin, ratio):
    llm, slm = twin
    ids = prompt(40)
    out = forward(iam(llm, slm, ratio=ratio), ids)
    mapping = out.cache.mapping
    heads = llm.config.num_attention_heads
    expected = torch.tensor([[[layer, h] for h in range(heads)] for layer in mapping.mapped_layers])
    assert torch.equal(mapping.head_mapping[0], expected)
    assert (out.logits - llm_logits(llm, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_identity_twin_decode_matches_llm_logits(twin, ratio):
    llm, slm = twin
    model = iam(llm, slm, ratio=ratio)
    ids = prompt(25)
    result = greedy(model, ids, new=20)
    out = result.sequences
    assert out.shape == (1, 45)
    assert result.cache.established
    # Logits of the LLM alone on the whole generated sequence vs IAM's prefill+decode choices.
    ref = llm_logits(llm, out)[0, 24:-1].argmax(-1)
    assert torch.equal(out[0, 25:], ref)
    # And IAM's own one-shot logits on that sequence equal the LLM's.
    assert (forward(model, out).logits - llm_logits(llm, out)).abs().max() < 1e-3


def test_the_establishing_forward_uses_the_callers_position_ids(twin):
    """Positions with a gap: the identity twin gives the LLM's logits whether the mapping is set in the first forward
    or in a later one (which prefills the earlier tokens again, at their given positions)."""
    llm, slm = twin
    model = iam(llm, slm, ratio=0.5)
    ids = prompt(30)
    pos = torch.arange(30)[None] + 7 * (torch.arange(30)[None] >= 10)
    reference = forward(llm, ids, position_ids=pos).logits
    out = forward(model, ids, position_ids=pos)
    assert out.cache.established and (out.logits - reference).abs().max() < 1e-3
    first = forward(model, ids[:, :12], position_ids=pos[:, :12])
    assert not first.cache.established
    rest = forward(model, ids[:, 12:], cache=first.cache, position_ids=pos[:, 12:])
    assert rest.cache.established and (rest.logits - reference[:, 12:]).abs().max() < 1e-3


def test_mapping_is_actually_used(pair):
    """A different SLM must change the LLM's logits in mapped layers, and leave them alone at ratio 0."""
    llm, slm = pair
    ids = prompt(30)
    mapped = forward(iam(llm, slm, ratio=0.5), ids).logits
    unmapped = forward(iam(llm, slm, ratio=0.0), ids).logits
    ref = llm_logits(llm, ids)
    assert (mapped - ref).abs().max() > 1e-2
    assert torch.allclose(unmapped, ref, atol=1e-5)


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
    """Under transformers' generate(): q_proj/k_proj of mapped layers see the establishing window at prefill and
    nothing in decode."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5, truncation_threshold=16)
    planned = list(model.planned)
    layers = decoder_layers(llm)
    mapped = [layers[i].self_attn for i in planned]
    unmapped = [layers[i].self_attn for i in range(4) if i not in planned]
    qk = RowCounter([m.q_proj for m in mapped] + [m.k_proj for m in mapped])
    qk_unmapped = RowCounter([m.q_proj for m in unmapped])
    v = RowCounter([m.v_proj for m in mapped])
    out = greedy(model, prompt(40, batch=2), new=6)
    qk.close(), qk_unmapped.close(), v.close()
    assert out.cache.mapping.mapped_layers == planned
    # Prefill: one call per projection per mapped layer, on the 16-row window only; decode: none.
    assert qk.calls == [16] * 4
    # The unmapped layers and the mapped V projections run on the prompt and then every decode step.
    assert sorted(qk_unmapped.calls) == sorted([40] * 2 + [1] * 10)
    assert sorted(v.calls) == sorted([40] * 2 + [1] * 10)


def test_kv_bytes_drop_exactly_the_mapped_keys(pair):
    llm, slm = pair
    ids = prompt(33, batch=2)
    cache = greedy(iam(llm, slm, ratio=0.5), ids, new=5).cache
    kv = cache.kv_bytes()
    cfg = llm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    tokens = 33 + 4  # the last generated token is never fed back
    per_layer_k = 2 * cfg.num_key_value_heads * tokens * head_dim * 4
    assert kv["baseline"] == cfg.num_hidden_layers * 2 * per_layer_k
    assert kv["llm"] == kv["baseline"] - len(cache.mapping.mapped_layers) * per_layer_k
    # Baseline is what the LLM alone really holds for those tokens.
    alone = greedy(llm, ids, new=5).cache
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in alone.layers) == kv["baseline"]
    slm_cfg = slm.config
    slm_head_dim = slm_cfg.hidden_size // slm_cfg.num_attention_heads
    slm_layers = cache.mapping.slm_layers[-1] + 1  # the SLM's cache is kept as deep as the mapping reads
    assert kv["slm"] == slm_layers * 2 * slm_cfg.num_key_value_heads * 2 * tokens * slm_head_dim * 4
    assert kv["total"] == kv["llm"] + kv["slm"]


def test_batch_equals_solo_runs(pair):
    """Through generate(): each row of a left-padded batch gets its own mapping and the tokens of its solo run."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5)
    prompts = [prompt(n, seed=n)[0] for n in (22, 35, 28)]
    ids, mask = left_pad(prompts)
    batched = greedy(model, ids, mask, new=12)
    for i, p in enumerate(prompts):
        solo = greedy(model, p[None], new=12)
        assert torch.equal(batched.sequences[i, -12:], solo.sequences[0, -12:]), f"prompt {i} differs"
        assert torch.equal(batched.cache.mapping.head_mapping[i], solo.cache.mapping.head_mapping[0])
        assert torch.equal(batched.cache.mapping.mixture[1][i], solo.cache.mapping.mixture[1][0])


def test_short_prompt_decodes_unmapped_until_threshold(pair):
    """Through generate(): below establish_threshold the LLM runs alone; the decode step whose context reaches it
    prefills both models over the context, sets the mapping and frees the mapped layers' K from then on."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5, establish_threshold=20)
    ids = prompt(5)
    # Until the context holds 20 tokens, IAM is exactly the LLM alone.
    out = greedy(model, ids, new=15)
    assert not out.cache.established and out.cache.mapping is None
    assert torch.equal(out.sequences, greedy(llm, ids, new=15).sequences)
    assert out.cache.kv_bytes()["slm"] == 0
    # One token more and the mapping is established on the 20-token context; mapped K is gone.
    out = greedy(model, ids, new=18)
    mapping = out.cache.mapping
    assert mapping.head_mapping.shape == (1, 2, 4, 2)
    assert mapping.window.lengths.tolist() == [20]
    kv = out.cache.kv_bytes()
    assert kv["slm"] > 0 and kv["llm"] < kv["baseline"]
    # The tokens after the threshold are those of the mapped model's own prefill over the whole sequence.
    logits = forward(model, out.sequences[:, :-1]).logits
    assert torch.equal(logits[0, 19:].argmax(-1), out.sequences[0, 20:])


def test_wrapping_leaves_models_untouched(pair):
    llm, slm = pair
    ids = prompt(30)
    before_llm, before_slm = llm_logits(llm, ids), llm_logits(slm, ids)
    modules = [type(layer.self_attn) for layer in decoder_layers(llm)]
    for cfg in ({"ratio": 0.5}, {"ratio": 1.0, "strategy": "front", "metric": "pearson"}):
        greedy(iam(llm, slm, **cfg), ids, new=4)
    assert [type(layer.self_attn) for layer in decoder_layers(llm)] == modules
    assert slm.config.num_hidden_layers == 2
    assert torch.equal(llm_logits(llm, ids), before_llm)
    assert torch.equal(llm_logits(slm, ids), before_slm)


@pytest.mark.parametrize("metric", ["cosine", "pearson", "minkowski1", "minkowski2", "cosine-norm"])
def test_every_metric_runs_and_identity_still_holds(twin, metric):
    llm, slm = twin
    ids = prompt(30)
    out = forward(iam(llm, slm, ratio=0.5, metric=metric), ids)
    heads = llm.config.num_attention_heads
    assert torch.equal(out.cache.mapping.head_mapping[0, :, :, 1], torch.arange(heads).expand(2, heads))
    assert (out.logits - llm_logits(llm, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("metric", ["cosine", "pearson", "minkowski1", "minkowski2", "cosine-norm"])
def test_a_metric_prepared_against_its_candidates_scores_alike(metric):
    from iam.core.similarity import METRICS

    g = torch.Generator().manual_seed(0)
    llm, slm = torch.rand(3, 50, generator=g), torch.rand(7, 50, generator=g)
    assert torch.allclose(METRICS[metric].against(slm)(llm), METRICS[metric].score(llm, slm), atol=1e-6)


def test_similar_strategy_picks_the_best_scoring_layers(pair):
    llm, slm = pair
    mapping = forward(iam(llm, slm, ratio=0.5, strategy="similar"), prompt(30)).cache.mapping
    scores = mapping.probe.amax(-1).mean((1, 2))
    assert mapping.mapped_layers == sorted(scores.topk(2).indices.tolist())


def test_loss_matches_llm_at_ratio_zero(pair):
    llm, slm = pair
    ids = prompt(30)
    ours = forward(iam(llm, slm, ratio=0.0), ids, labels=ids).loss
    theirs = llm(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, theirs)


def test_int8_slm_cache_halves_slm_bytes_and_keeps_the_mapping(twin):
    llm, slm = twin
    ids = prompt(30, batch=2)
    int8 = iam(llm, slm, ratio=0.5, slm_cache="int8")
    ref = greedy(iam(llm, slm, ratio=0.5), ids, new=6)
    out = greedy(int8, ids, new=6)
    assert torch.equal(ref.cache.mapping.head_mapping, out.cache.mapping.head_mapping)
    assert torch.equal(out.sequences, ref.sequences)
    cfg = slm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_elem_row = head_dim * 1 + 4  # int8 values + one fp32 scale per head and token
    expected = cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 35 * per_elem_row
    assert out.cache.kv_bytes()["slm"] == expected
    assert ref.cache.kv_bytes()["slm"] == cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * 35 * head_dim * 4
    assert out.cache.slm.layers[0].keys.dtype == torch.int8
    logits = forward(int8, ids).logits
    assert (logits - llm_logits(llm, ids)).abs().max() < 0.05


def test_slm_runs_no_lm_head_and_only_as_deep_as_needed(twin):
    llm, slm = twin
    calls = {"head": 0, "deep": 0}
    handles = [slm.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))]
    handles += [
        decoder_layers(slm)[i].mlp.register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1)) for i in (2, 3)
    ]
    cache = greedy(iam(llm, slm, layers=[0, 1]), prompt(30), new=5).cache
    for h in handles:
        h.remove()
    assert calls == {"head": 0, "deep": 2}  # layers 2 and 3 ran once, at prefill (to search all SLM heads)
    layers = cache.slm.layers
    assert layers[1].values.shape[-2] == 34 and layers[2].values is None and layers[3].values is None


def test_zero_weight_candidates_keep_no_slm_layer_running(twin):
    """With blend 2 the twin's second candidate gets weight 0: it names the weighted head, so the SLM runs only as
    deep as the weighted heads need (layer 0 here), where a zero-weight candidate in a deeper layer kept it running."""
    llm, slm = twin
    cache = greedy(iam(llm, slm, layers=[0], blend=2), prompt(30), new=4).cache
    layer, weight = cache.mapping.mixture
    assert cache.mapping.slm_layers == [0] and torch.equal(layer[..., 0], torch.zeros_like(layer[..., 0]))
    assert weight[..., 0].eq(1.0).all() and weight[..., 1].eq(0.0).all()
    assert cache.slm.layers[0].values.shape[-2] == 33 and all(x.values is None for x in cache.slm.layers[1:])


def test_eager_llm_with_padding_identity_twin(twin):
    """An LLM loaded with eager attention (additive float masks) maps as well as an SDPA one."""
    llm, slm = twin
    llm.config._attn_implementation = "eager"
    ids, mask = left_pad([prompt(n, seed=n)[0] for n in (24, 31)])
    out = greedy(iam(llm, slm, ratio=1.0), ids, mask, new=8)
    assert out.cache.established
    assert torch.equal(out.sequences, greedy(llm, ids, mask, new=8).sequences)


def test_prefill_sdpa_gets_one_head_size(family, monkeypatch):
    """SLM head size 8, LLM head size 16: q/k are zero-padded so SDPA can use a fused kernel (no T x T matrix)."""
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("torch.nn.functional.scaled_dot_product_attention", spy)
    ids = prompt(30)
    out = forward(iam(llm, slm, ratio=0.5), ids).logits
    monkeypatch.undo()
    # every SDPA call of the pass (SLM, unmapped and the 2 mapped LLM layers) has one head size for q, k and v
    assert len(seen) == 2 + 4 and all(a == b == c for a, b, c in seen), seen
    assert torch.isfinite(out).all()


def test_long_prefill_runs_flex_attention_with_both_head_sizes(family, monkeypatch):
    """From ``Kernels.flex_from`` on, on ``Kernels.flex_devices``, mapped prefill runs FlexAttention on the SLM's
    8-wide q/k and the LLM's 16-wide V (no padding) and agrees with the padded SDPA path; a left-padded batch keeps
    SDPA."""
    from iam.core.kernels import flex as flex_module

    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    ids = prompt(40)
    padded = forward(iam(llm, slm, ratio=0.5), ids).logits
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(q.shape[-1])
        return real_sdpa(q, k, v, **kwargs)

    kernels = Kernels(flex_from=32, flex_devices=("cuda", "cpu"))
    monkeypatch.setattr("torch.nn.functional.scaled_dot_product_attention", spy)
    flex = forward(iam(llm, slm, ratio=0.5, kernels=kernels), ids).logits
    assert flex_module.flex_ready(ids.device, torch.float32, 8, 16, kernels.flex_from)
    assert len(calls) == 2 + 2  # the SLM's and the unmapped LLM layers' own; the mapped layers ran flex
    assert torch.allclose(flex, padded, atol=1e-4)
    calls.clear()
    batch, mask = left_pad([prompt(40, seed=1), prompt(36, seed=2)])
    forward(iam(llm, slm, ratio=0.5, kernels=kernels), batch, mask)
    assert len(calls) == 2 + 4


def test_plain_mapped_prefill_keeps_sdpa_on_a_cpu(monkeypatch):
    """On a CPU the padded SDPA kernel ran as fast or faster than FlexAttention through the whole model, so mapped
    prefill without a local window keeps it there at any length (FlexAttention serves ``Kernels.flex_devices``)."""
    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 4, 2, seed=1)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr("torch.nn.functional.scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    forward(iam(llm, slm, ratio=0.5, kernels=Kernels(flex_from=32)), prompt(40))
    assert Kernels().flex_devices == ("cuda",) and len(calls) == 2 + 2 + 2  # the SLM, the unmapped and the mapped layers


def test_flex_attention_compiles_once_for_any_batch_mapping_and_length(family, monkeypatch):
    """The compiled FlexAttention kernel is specialised to batch and head counts, and after 8 recompilations it falls
    back to an unfused version that builds the T x T scores: one compilation must serve every batch size, number of
    borrowed SLM heads per layer, and length."""
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 4, 2, seed=1)
    kernels = Kernels(flex_from=129, flex_devices=("cuda", "cpu"))  # the tiny models hold 256 positions
    forward(iam(llm, slm, ratio=0.5, kernels=kernels), prompt(140))  # compiles (first use)
    mapped_sdpa = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):  # a mapped SDPA call: LLM-wide (16) q with the SLM's scale
        mapped_sdpa.append(q.shape[-1] == 16 and kwargs.get("scale") == 8**-0.5)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("torch.nn.functional.scaled_dot_product_attention", spy)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length, batch, ratio in [(200, 1, 0.5), (150, 3, 1.0), (250, 2, 0.25)]:
            forward(iam(llm, slm, ratio=ratio, kernels=kernels), prompt(length, seed=length, batch=batch))
    assert mapped_sdpa and not any(mapped_sdpa)  # the SLM and unmapped layers ran SDPA, every mapped prefill flex
    with TensorPeak():  # compiled code cannot run under a Python dispatch mode: mapped prefill takes SDPA there
        forward(iam(llm, slm, ratio=0.5, kernels=kernels), prompt(200))
    assert any(mapped_sdpa)


def test_two_models_each_run_their_own_kernels(monkeypatch):
    """Kernels are a value of each model, not of the process: two wrappers of one pair, one on FlexAttention and
    one on padded SDPA, take turns and each runs its own kernel (counted at the kernel), agreeing on the logits;
    the mapping's summary reports each one's options."""
    from iam.core.kernels import prefill

    llm, slm = tiny("qwen2", 4, 64, 4, 2, seed=0), tiny("qwen2", 2, 32, 4, 2, seed=1)
    flex_kernels = Kernels(flex_from=32, flex_devices=("cpu",))
    on_flex, on_sdpa = iam(llm, slm, ratio=0.5, kernels=flex_kernels), iam(llm, slm, ratio=0.5)
    calls = []
    real = prefill.flex_heads
    monkeypatch.setattr(prefill, "flex_heads", lambda *a: calls.append(1) or real(*a))
    ids = prompt(40)
    for model, flexed in [(on_flex, True), (on_sdpa, False), (on_flex, True)]:
        calls.clear()
        out = forward(model, ids)
        assert bool(calls) == flexed
        assert out.cache.mapping.summary()["kernels"] == model.kernels.summary()
    assert torch.allclose(forward(on_flex, ids).logits, forward(on_sdpa, ids).logits, atol=1e-4)
    assert on_flex.kernels.summary() == {
        "flex_from": 32,
        "flex_devices": ["cpu"],
        "window_reference": False,
        "chunk_elements": 1 << 23,
        "min_chunk": 16,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"flex_from": 0}, "flex_from must be None"),
        ({"flex_from": True}, "flex_from must be None"),
        ({"flex_devices": [1]}, "flex_devices must be a tuple of device types"),
        ({"chunk_elements": 0}, "chunk_elements must be an integer >= 1"),
        ({"min_chunk": 2.5}, "min_chunk must be an integer >= 1"),
        ({"window_reference": 1}, "window_reference must be True or False"),
    ],
)
def test_bad_kernel_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Kernels(**kwargs)
    assert Kernels(flex_devices="cpu").flex_devices == ("cpu",)


def test_heads_sharing_an_slm_head_and_a_kv_group_are_computed_once(family, monkeypatch):
    """A one-layer, one-head SLM: every LLM head borrows the same SLM head, so each KV group (2 heads here) needs one
    SDPA item, and prefill (deduplicated) still agrees with decode (per head)."""
    llm, slm = tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 1, 16, 1, 1, seed=1)
    model = iam(llm, slm, layers=[1, 3], truncation_threshold=20)
    heads = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        heads.append(q.shape[1])
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr("torch.nn.functional.scaled_dot_product_attention", spy)
    ids = prompt(30)
    full = forward(model, ids).logits
    monkeypatch.undo()
    # the SLM layer (1 head), then LLM layers 0-3: unmapped ones see 4 heads, mapped ones 2 items
    assert heads == [1, 4, 2, 4, 2]
    prefill = forward(model, ids[:, :-1])
    stepped = forward(model, ids[:, -1:], cache=prefill.cache).logits
    assert (stepped[:, -1] - full[:, -1]).abs().max() < 1e-4


def test_continuation_over_the_cache_equals_one_prefill(pair):
    """A continuation scored over the cache of its prefilled context gives the logits of one prefill of the whole
    sequence (the mapping is set on the context's window, which both share)."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5, truncation_threshold=16)
    ids = prompt(48, seed=4)
    first = forward(model, ids[:, :30])
    rest = forward(model, ids[:, 30:], cache=first.cache)
    full = forward(model, ids)
    assert torch.equal(first.cache.mapping.head_mapping, full.cache.mapping.head_mapping)
    assert (rest.logits - full.logits[:, 30:]).abs().max() < 1e-4


def test_continuation_perplexity_scores_only_the_continuation(pair):
    import math

    from iam.eval.perplexity import perplexity

    llm, slm = pair
    windows = [prompt(40, seed=s) for s in (1, 2)]
    logits = [forward(llm, w).logits[0, 24:-1].log_softmax(-1) for w in windows]
    nll = [-lp.gather(-1, w[0, 25:, None]).mean() for lp, w in zip(logits, windows)]
    ppl, units, _ = perplexity(iam(llm, slm, ratio=0.0), windows, progress=False, context=25)
    assert units == [] and ppl == pytest.approx(math.exp(sum(n.item() for n in nll) / 2), rel=1e-5)
    mapped, units, _ = perplexity(iam(llm, slm, ratio=0.5), windows, progress=False, context=25)
    assert units == [2, 3] and mapped != pytest.approx(ppl)


def test_the_config_reaches_no_file_io_of_the_package():
    """MappingConfig is plain values: nothing it imports, directly or not, reads the model store or calibration files
    (resolving it against a pair is ``iam.core.resolution``)."""
    import ast
    from pathlib import Path

    import iam

    root = Path(iam.__file__).parent

    def imports(module: str) -> set[str]:
        path = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
        package = module.rsplit(".", 1)[0].split(".")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                found.add(f"{base}.{node.module}" if node.module else base)
        return found

    seen, todo = set(), ["iam.core.config"]
    while todo:
        module = todo.pop()
        if module not in seen and root.joinpath(*module.split(".")[1:]).with_suffix(".py").exists():
            seen.add(module)
            todo += imports(module)
    assert seen & {"iam.core.calibration", "iam.core.resolution", "iam.models.store", "iam.models.loading", "iam.io"} == set()
    assert "iam.core.selection" in seen  # the walk does follow the package's imports
