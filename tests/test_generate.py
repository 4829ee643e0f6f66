"""transformers' own generate() and pipeline drive IAMForCausalLM: every decoding mode, streamers, beam search's
cache reordering, and the user's models left untouched (during a call too, and across threads)."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer, pipeline
from transformers.generation.streamers import BaseStreamer

from conftest import forward, iam, left_pad, prompt
from iam import IAMCache
from iam.core.decoder import decoder_layers

MODES = {
    "greedy": {"do_sample": False},
    "sampling": {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20},
    "repetition_penalty": {"do_sample": False, "repetition_penalty": 1.2},
    "no_repeat_ngram": {"do_sample": False, "no_repeat_ngram_size": 2},
    "min_new_tokens_and_eos_list": {"do_sample": False, "min_new_tokens": 4, "eos_token_id": [5, 7, 11]},
    "num_return_sequences": {"do_sample": True, "num_return_sequences": 2},
    "beam_search": {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
    "beam_sample": {"do_sample": True, "num_beams": 2},
}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([prompt(n, seed=n)[0] for n in (24, 31, 27)])


def run(model, ids, mask, **kwargs):
    torch.manual_seed(0)  # sampling modes draw from the global generator, as transformers does
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_ratio_zero_is_token_identical_to_the_llm_alone(pair, mode):
    """Through generate(), IAM at ratio 0 (nothing mapped) gives exactly what the LLM's own generate() gives."""
    llm, slm = pair
    ids, mask = batch()
    ours = run(iam(llm, slm, ratio=0.0), ids, mask, **MODES[mode])
    theirs = run(llm, ids, mask, **MODES[mode])
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_identity_twin_at_half_is_token_identical_to_the_llm_alone(twin, mode):
    """With the SLM an exact copy, every mapped head borrows its own attention: IAM at 0.5 must reproduce the LLM in
    every mode, beam search's reordered caches included."""
    llm, slm = twin
    ids, mask = batch()
    ours = run(iam(llm, slm, ratio=0.5), ids, mask, **MODES[mode])
    theirs = run(llm, ids, mask, **MODES[mode])
    assert torch.equal(ours, theirs)


def test_stop_strings_and_streamers_match_the_llm_alone(pair, tokenizer):
    llm, slm = pair
    ids = tokenizer(["the cat sat on"], return_tensors="pt").input_ids
    free = llm.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    chars = range(3, len(tokenizer))  # ids of characters (the random model also emits ids the tokenizer lacks)
    at = next(i for i in range(4, 19) if free[i] in chars and free[i + 1] in chars)
    stop = tokenizer.decode(free[at : at + 2])  # two characters the model does produce, after at least four others
    texts = {}
    for name, model in (("llm", llm), ("iam", iam(llm, slm, ratio=0.0))):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        out = model.generate(ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tokenizer, streamer=streamer)
        texts[name] = (out, "".join(streamer))
    assert torch.equal(texts["iam"][0], texts["llm"][0])
    assert texts["iam"][1] == texts["llm"][1] == tokenizer.decode(texts["iam"][0][0, ids.shape[1] :])
    new = texts["iam"][0][0, ids.shape[1] :].tolist()
    assert new == free[: len(new)] and len(new) <= at + 2  # the free run, cut short
    assert tokenizer.decode(new).endswith(stop) and stop not in tokenizer.decode(new[:-1])  # right after the stop string


def test_text_streamer_prints_what_iam_generates(pair, tokenizer, capsys):
    llm, slm = pair
    ids = tokenizer(["a long enough prompt to map"], return_tensors="pt").input_ids
    out = iam(llm, slm, ratio=0.5).generate(
        ids, max_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True)
    )
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, ids.shape[1] :]).strip()


def test_the_returned_cache_carries_the_mapping(pair):
    llm, slm = pair
    ids, mask = batch()
    out = iam(llm, slm, ratio=0.5).generate(
        ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True
    )
    assert isinstance(out.cache, IAMCache)
    assert out.cache.mapping.head_mapping.shape == (3, 2, 4, 2)
    assert out.cache.mapping.window.lengths.tolist() == [24, 31, 27]


def test_a_cache_passed_in_holds_the_results(pair):
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5)
    cache = model.new_cache()
    model.generate(prompt(30), max_new_tokens=4, do_sample=False, cache=cache)
    assert cache.established and cache.kv_bytes()["slm"] > 0


def test_beam_reorder_moves_both_caches_and_the_mapping(pair):
    """Reordering the batch of an IAMCache (as beam search does) equals running the reordered batch from scratch."""
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5)
    ids, mask = left_pad([prompt(30, seed=1)[0], prompt(26, seed=2)[0]])
    step = torch.tensor([[5], [9]])
    cache = forward(model, ids, mask).cache
    cache.reorder_cache(torch.tensor([1, 0]))
    full_mask = torch.cat([mask.flip(0), torch.ones(2, 1, dtype=torch.long)], 1)
    reordered = forward(model, step, full_mask, cache=cache).logits
    fresh_cache = forward(model, ids.flip(0), mask.flip(0)).cache
    fresh = forward(model, step, full_mask, cache=fresh_cache).logits
    assert torch.equal(cache.mapping.head_mapping, fresh_cache.mapping.head_mapping)
    assert torch.allclose(reordered, fresh, atol=1e-5)
    cache.batch_repeat_interleave(2)
    assert cache.mapping.head_mapping.shape[0] == 4 and cache.slm.layers[0].keys.shape[0] == 4
    cache.batch_select_indices(torch.tensor([3]))
    assert torch.equal(cache.mapping.head_mapping[0], fresh_cache.mapping.head_mapping[1])


def test_pipeline_and_chat_messages(pair, tokenizer):
    llm, slm = pair
    model = iam(llm, slm, ratio=0.5)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = "a prompt long enough to map"
    out = generator(text, max_new_tokens=6, do_sample=False)
    direct = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"] == tokenizer.decode(direct[0])
    chat = generator([{"role": "user", "content": "hello there, how are you"}], max_new_tokens=4, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"


def test_a_pipeline_of_iam_logs_no_error(pair, tokenizer, monkeypatch):
    """It logged "The model 'IAMForCausalLM' is not supported for text-generation" with 200 names."""
    from transformers.pipelines import base

    errors = []
    monkeypatch.setattr(base.logger, "error", lambda message, *args, **kwargs: errors.append(message))
    pipeline("text-generation", model=iam(*pair, ratio=0.5), tokenizer=tokenizer)
    assert errors == []


class Inspector(BaseStreamer):
    """A streamer that looks at the LLM's modules on every step, mid-call."""

    def __init__(self, llm) -> None:
        self.llm, self.seen = llm, []

    def put(self, value) -> None:
        self.seen.append([type(layer.self_attn).__name__ for layer in decoder_layers(self.llm)])

    def end(self) -> None:
        pass


def test_models_are_unchanged_during_a_call_and_after_an_exception(pair):
    llm, slm = pair
    before = [type(layer.self_attn).__name__ for layer in decoder_layers(llm)]
    params = {n: p.clone() for n, p in llm.named_parameters()}
    config = llm.config.to_dict()
    inspector = Inspector(llm)
    iam(llm, slm, ratio=0.5).generate(prompt(30), max_new_tokens=5, do_sample=False, streamer=inspector)
    assert len(inspector.seen) == 6 and all(seen == before for seen in inspector.seen)

    def boom(*_):
        raise RuntimeError("mid-forward")

    handle = decoder_layers(llm)[3].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="mid-forward"):
        iam(llm, slm, ratio=0.5).generate(prompt(30), max_new_tokens=5)
    handle.remove()
    assert [type(layer.self_attn).__name__ for layer in decoder_layers(llm)] == before
    assert llm.config.to_dict() == config and slm.config.num_hidden_layers == 2
    assert all(torch.equal(p, params[n]) for n, p in llm.named_parameters())
    assert not llm._forward_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in llm.modules())


def test_two_wrappers_of_one_llm_run_in_two_threads(pair):
    """Nothing is swapped into the shared LLM, so two wrappers (different mappings) can run at once."""
    llm, slm = pair
    models = [iam(llm, slm, ratio=0.5), iam(llm, slm, ratio=1.0, strategy="front", blend=2)]
    ids = [prompt(40, seed=s, batch=2) for s in (1, 2)]
    expected = [m.generate(x, max_new_tokens=12, do_sample=False) for m, x in zip(models, ids)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = models[i].generate(ids[i], max_new_tokens=12, do_sample=False)
                assert torch.equal(results[i], expected[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(results[i], expected[i]) for i in range(2))
