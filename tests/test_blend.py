"""Mixing several SLM heads per mapped LLM head (``MappingConfig.blend``), on tiny random pairs."""

from __future__ import annotations

import pytest
import torch

from conftest import forward, iam, prompt
from iam import MappingConfig
from iam.core.mapping import simplex_weights


def test_simplex_weights_recover_a_mixture_and_never_lose_to_a_single_candidate():
    g = torch.Generator().manual_seed(0)
    candidates = (3 * torch.randn(5, 3, 60, generator=g)).softmax(-1)
    true = torch.tensor([0.6, 0.0, 0.4])
    target = (true[:, None] * candidates).sum(1)
    assert torch.allclose(simplex_weights(target, candidates), true.expand(5, 3), atol=1e-5)
    # Any target: the fitted mix is no further from it than any candidate alone, and usually closer.
    other = (3 * torch.randn(5, 60, generator=g)).softmax(-1)
    w = simplex_weights(other, candidates)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(5))
    mixed = (other - (w[..., None] * candidates).sum(1)).norm(dim=-1)
    alone = (other[:, None] - candidates).norm(dim=-1).amin(-1)
    assert (mixed <= alone + 1e-7).all() and (mixed < 0.99 * alone).any()


def test_simplex_weights_are_the_optimum():
    g = torch.Generator().manual_seed(1)
    candidates, target = (2 * torch.randn(4, 3, 40, generator=g)).softmax(-1), (2 * torch.randn(4, 40, generator=g)).softmax(-1)
    # every point of a 1/200 grid on the simplex, against the exact answer
    a, b = torch.meshgrid(torch.arange(201) / 200, torch.arange(201) / 200, indexing="ij")
    grid = torch.stack([a, b, 1 - a - b], -1).reshape(-1, 3)
    grid = grid[grid[:, 2] >= 0]
    on_grid = ((grid @ candidates - target[:, None]) ** 2).sum(-1).amin(-1)  # [4]
    w = simplex_weights(target, candidates)
    exact = ((target - (w[..., None] * candidates).sum(1)) ** 2).sum(-1)
    assert (exact <= on_grid + 1e-9).all() and ((w > 1e-6).sum(-1) >= 2).any()  # some optima are true mixtures


def test_identity_twin_puts_all_weight_on_itself(twin):
    llm, slm = twin
    ids = prompt(40)
    result = forward(iam(llm, slm, ratio=0.5, blend=3), ids)
    out, mapping = result.logits, result.cache.mapping
    sources, weights = mapping.mixture
    assert sources.shape[-2:] == (3, 2) and weights.shape[-1] == 3
    heads = llm.config.num_attention_heads
    expected = torch.tensor([[[layer, h] for h in range(heads)] for layer in mapping.mapped_layers])
    assert torch.equal(mapping.head_mapping[0], expected) and torch.equal(sources[0, :, :, 0], expected)
    assert torch.allclose(weights[..., 0], torch.ones_like(weights[..., 0]), atol=1e-5)
    with torch.no_grad():
        assert (out - llm(input_ids=ids).logits).abs().max() < 1e-3


def test_blend_mixes_several_heads_and_fits_better(pair):
    llm, slm = pair
    ids = prompt(40, seed=2, batch=2)
    runs = {}
    for k in (1, 3):
        out = forward(iam(llm, slm, ratio=0.5, blend=k, metric="minkowski2"), ids)
        runs[k] = (out.logits, out.cache.mapping.similarity, out.cache.mapping.mixture)
    sources, weights = runs[3][2]
    assert (weights >= 0).all() and torch.allclose(weights.sum(-1), torch.ones_like(weights[..., 0]))
    assert (weights[..., 1:] > 1e-3).any()  # some heads really mix
    assert (sources[..., 1:, :] != sources[..., :1, :]).any(-1).all()  # k distinct SLM heads
    # Same layers, same best match first; the mix is at least as close (minkowski2 = -Euclidean distance).
    assert torch.equal(sources[..., 0, :], runs[1][2][0][..., 0, :])
    assert (runs[3][1] >= runs[1][1] - 1e-5).all() and (runs[3][1] > runs[1][1] + 1e-4).any()
    assert (runs[3][0] - runs[1][0]).abs().max() > 1e-3


def test_blended_decode_matches_its_own_prefill(pair):
    """Decode mixes attention rows the way prefill mixes attention outputs."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5, blend=3, truncation_threshold=16)
    result = model.generate(prompt(40, seed=5), max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    out = result.sequences
    assert (result.cache.mapping.mixture[1][..., 1:] > 1e-3).any()
    assert torch.equal(forward(model, out).logits[0, 39:-1].argmax(-1), out[0, 40:])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_blend_is_refused(bad):
    with pytest.raises(ValueError, match="blend must be None .the pair.s stored value. or an integer >= 1"):
        MappingConfig(blend=bad)


def test_a_blend_too_large_for_the_exact_fit_is_refused():
    assert MappingConfig(blend=8).blend == 8
    with pytest.raises(ValueError, match="blend must be at most 8"):
        MappingConfig(blend=9)
