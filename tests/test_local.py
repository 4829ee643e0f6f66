"""The exact local window of mapped layers (``MappingConfig.local_window``) on tiny random pairs."""

from __future__ import annotations

import pytest
import torch

import iam.core.attention as attention
from conftest import forward, iam, left_pad, prompt
from iam import MappingConfig
from iam.core.kernels import Kernels

UNITS = [1, (2, 0)]  # a whole layer and one KV group of another


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([prompt(60, 1)[0], prompt(45, 2)[0]])


@pytest.mark.parametrize("blend", [1, 2])
def test_a_window_covering_every_token_is_the_llm_alone(pair, blend):
    llm, slm = pair
    ids, mask = batch()
    model = iam(llm, slm, layers=UNITS, blend=blend, local_window=64)
    out = forward(model, ids, mask)
    reference = forward(llm, ids, mask).logits
    assert (out.logits - reference)[mask.bool()].abs().max() < 1e-4
    plain = forward(iam(llm, slm, layers=UNITS, blend=blend), ids, mask).logits
    assert (plain - reference)[mask.bool()].abs().max() > 1e-2  # the window is what makes it exact
    tokens = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    model = iam(llm, slm, layers=UNITS, blend=blend, local_window=80)
    assert torch.equal(model.generate(ids, **tokens), llm.generate(ids, **tokens))


def test_far_tokens_take_the_borrowed_mass_and_spread(twin):
    """The identity twin borrows each head's own attention, so far mass plus the exact window renormalised to the
    rest is the LLM's own attention again, for any window."""
    llm, slm = twin
    ids, mask = batch()
    model = iam(llm, slm, ratio=0.5, blend=1, local_window=4, local_sinks=2)
    out = forward(model, ids, mask)
    assert (out.logits - forward(llm, ids, mask).logits)[mask.bool()].abs().max() < 1e-4


def test_a_small_window_lies_between_plain_iam_and_the_llm(pair):
    llm, slm = pair
    ids, mask = batch()
    reference = forward(llm, ids, mask).logits[mask.bool()]

    def error(window: int) -> float:
        logits = forward(iam(llm, slm, layers=UNITS, blend=1, local_window=window), ids, mask).logits
        return (logits[mask.bool()] - reference).abs().mean().item()

    assert error(0) > error(8) > error(32) > 0


def test_prefill_chunks_continuations_and_decode_agree(pair):
    llm, slm = pair
    ids, mask = batch()
    settings = dict(layers=UNITS, blend=2, local_window=8, truncation_threshold=20)
    model = iam(llm, slm, **settings)
    whole = forward(model, ids, mask).logits
    first = forward(model, ids[:, :40], mask[:, :40])
    rest = forward(model, ids[:, 40:], mask, cache=first.cache).logits
    assert (rest - whole[:, 40:]).abs().max() < 1e-4
    cache, steps = forward(model, ids[:, :40], mask[:, :40]).cache, []
    for i in range(40, 60):
        out = forward(model, ids[:, i : i + 1], mask[:, : i + 1], cache=cache)
        steps.append(out.logits)
    assert (torch.cat(steps, 1) - whole[:, 40:]).abs().max() < 1e-4
    solo = forward(model, ids[1:, 15:], mask[1:, 15:]).logits
    assert (solo - whole[1:, 15:]).abs().max() < 1e-4
    # many chunks, in a prefill and a continuation
    chunked = iam(llm, slm, kernels=Kernels(chunk_elements=1000, min_chunk=3), **settings)
    assert (forward(chunked, ids, mask).logits - whole).abs().max() < 1e-4
    first = forward(chunked, ids[:, :40], mask[:, :40])
    assert (forward(chunked, ids[:, 40:], mask, cache=first.cache).logits - whole[:, 40:]).abs().max() < 1e-4


def test_keys_are_the_sinks_and_window_only_and_leave_as_decode_slides(pair):
    llm, slm = pair
    ids, mask = batch()
    sinks, window = 3, 8
    model = iam(llm, slm, layers=UNITS, local_window=window, local_sinks=sinks)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    d = llm.model.layers[0].self_attn.head_dim
    local = {i: layer for i, layer in enumerate(cache.local.layers) if layer.is_initialized}
    shapes = {i: tuple(layer.keys.shape) for i, layer in local.items()}
    assert shapes == {1: (2, 2, sinks + window, d), 2: (2, 1, sinks + window, d)}
    # the LLM's own cache: V everywhere, K of the unmapped groups; plus the local keys
    tokens = ids.shape[1] + 10 - 1  # the last new token is never fed back
    elem = 4
    own_k = (4 * 2 - 2 - 1) * tokens * d * elem * 2  # batch 2
    v = 4 * 2 * tokens * d * elem * 2
    local_k = (2 + 1) * (sinks + window) * d * elem * 2
    assert cache.kv_bytes()["llm"] == own_k + v + local_k
    assert sum(layer.nbytes for layer in cache.local.layers) == local_k


def test_the_sinks_stay_each_sequences_first_real_tokens(pair):
    """With left padding the sinks are each row's first real tokens, not the padding."""
    llm, slm = pair
    ids, mask = batch()
    model = iam(llm, slm, layers=[1], local_window=4, local_sinks=2)
    cache = forward(model, ids, mask).cache
    for row in range(2):
        start = int((mask[row] == 0).sum())
        alone = forward(model, ids[row : row + 1, start:]).cache
        assert torch.allclose(cache.local.layers[1].keys[row, :, :2], alone.local.layers[1].keys[0, :, :2], atol=1e-5)


@pytest.mark.parametrize("window, sinks", [(8, 3), (1, 0)])
def test_beam_search_moves_the_sliding_local_keys(twin, window, sinks):
    """The identity twin is the LLM alone for any window, so its beams must be too, with the window sliding."""
    llm, slm = twin
    ids, mask = batch()
    model = iam(llm, slm, ratio=0.5, blend=1, local_window=window, local_sinks=sinks)
    tokens = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(ids, **tokens), llm.generate(ids, **tokens))


def test_int8_slm_cache_and_a_late_establishment(pair):
    """A prompt below establish_threshold maps from the decode step that reaches it; an int8 SLM cache serves the
    borrowed rows."""
    llm, slm = pair
    ids = prompt(12, 3)
    model = iam(llm, slm, layers=UNITS, local_window=6, slm_cache="int8")
    out = model.generate(ids, max_new_tokens=14, do_sample=False, return_dict_in_generate=True)
    assert out.cache.established and out.cache.local.layers[1].keys.shape[2] == 4 + 6


def test_a_cache_made_for_another_window_is_refused(pair):
    llm, slm = pair
    cache = iam(llm, slm, layers=UNITS, local_window=8).new_cache()
    with pytest.raises(
        ValueError, match=r"this cache was made for .*local window \(sinks, window\) \(4, 8\), not this model's \(4, 16\)"
    ):
        forward(iam(llm, slm, layers=UNITS, local_window=16), prompt(30), cache=cache)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"local_window": -1}, "local_window must be an integer >= 0"),
        ({"local_window": 2.5}, "local_window must be an integer >= 0"),
        ({"local_window": True}, "local_window must be an integer >= 0"),
        ({"local_sinks": 4}, "needs local_window > 0"),
        ({"local_window": 8, "local_sinks": 21}, "local_sinks must be an integer in"),
        ({"local_window": 8, "local_sinks": -1}, "local_sinks must be an integer in"),
    ],
)
def test_bad_local_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MappingConfig(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flex_from", [None, 20])
def test_the_window_runs_in_half_precision(twin, dtype, flex_from):
    """Half precision is what GPUs run: the window's prefill (chunked, and on FlexAttention) and decode work there
    and, on the identity twin, give the LLM alone's logits within the dtype's tolerance (the SLM's items once failed
    to be written into a float32 buffer)."""
    llm, slm = (m.to(dtype) for m in twin)
    ids, mask = batch()
    model = iam(llm, slm, ratio=0.5, blend=1, local_window=4, local_sinks=2, kernels=Kernels(flex_from=flex_from))
    out = forward(model, ids, mask)
    reference = forward(llm, ids, mask).logits
    assert out.logits.dtype == dtype
    assert (out.logits - reference)[mask.bool()].float().abs().max() < 0.1
    tokens = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert model.generate(ids, **tokens).shape == (2, ids.shape[1] + 6)


FAST = {  # the fast kernels of the window's prefill, each chosen by its options, and where each runs
    "local_flex": (Kernels(flex_from=20), "cuda"),
    "local_sdpa": (Kernels(flex_from=None), "cpu"),
}
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's window runs on CUDA")]


@pytest.mark.parametrize("kernel", [pytest.param("local_flex", marks=ON_CUDA), "local_sdpa"])
@pytest.mark.parametrize("blend", [1, 2])
def test_fast_prefill_equals_the_reference(pair, blend, kernel, monkeypatch):
    """The local window's prefill on FlexAttention (``flex_devices``, from ``flex_from`` on) and on a CPU's fused
    SDPA with its log-sum-exp, and decode on the band (``local_decode``), agree with the chunked reference on a
    padded batch, per KV group, with blend, in a continuation, and the cache each leaves decodes and beam-searches
    alike. (Compiled
    FlexAttention on a CPU, torch 2.13, gave one sequence of a padded pair wrong rows where eager FlexAttention
    did not: FlexAttention serves ``flex_devices``, CUDA by default.)"""
    import iam.core.kernels.local as local

    kernels, device = FAST[kernel]
    llm, slm = (m.to(device) for m in pair)
    ids, mask = (x.to(device) for x in batch())
    settings = dict(layers=UNITS, blend=blend, local_window=8, local_sinks=2, truncation_threshold=20)
    tokens = dict(attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False)
    tokens.update(output_scores=True, return_dict_in_generate=True)

    def run(kernels: Kernels) -> tuple:
        model = iam(llm, slm, kernels=kernels, **settings)
        whole = forward(model, ids, mask).logits
        first = forward(model, ids[:, :40], mask[:, :40]).cache
        rest = forward(model, ids[:, 40:], mask, cache=first).logits
        step = forward(model, ids[:, 40:41], mask[:, :41], cache=forward(model, ids[:, :40], mask[:, :40]).cache).logits
        return whole, rest, step, model.generate(ids, **tokens)

    calls = []
    for name in (kernel, "local_decode"):
        real = getattr(local, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real: calls.append(a[0].shape[2]) or real(*a))
    reference = run(Kernels(flex_from=None, window_reference=True))
    assert not calls
    fast = run(kernels)
    assert {60, 20, 40, 1} <= set(calls)  # the prefill, the continuation, the first part, and decode ran them
    real_rows = mask.bool()
    assert (fast[0] - reference[0])[real_rows].abs().max() < 1e-4
    assert (fast[1] - reference[1])[real_rows[:, 40:]].abs().max() < 1e-4
    assert (fast[2] - reference[2]).abs().max() < 1e-4
    assert torch.equal(fast[3].sequences, reference[3].sequences)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(fast[3].scores, reference[3].scores))


def test_tuning_through_the_window_keeps_flex_off_a_cpu(pair):
    """Tuning the SLM through the mapped LLM's loss (``iam tune --local-window``) needs a backward through the
    SLM's side only; FlexAttention has none on a CPU, so the window's prefill takes the chunked kernel there."""
    llm, slm = pair
    model = iam(llm, slm, layers=UNITS, blend=1, local_window=8, local_sinks=2, kernels=Kernels(flex_from=20))
    for p in llm.parameters():
        p.requires_grad_(False)
    ids = prompt(40)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slm.parameters())
