"""SmolLM2-135M-Instruct (alias ``smollm2-135m``): the Llama code path on real weights, as the LLM alone and as its
own identity twin. The first run assembles, verifies and converts the GGUF file into $IAM_CACHE (seconds)."""

from __future__ import annotations

import pytest
import torch

from iam import IAMForCausalLM, MappingConfig
from iam.eval.data import wikipedia_text
from iam.models.loading import ALIASES, chunk_files, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](wikipedia_text()[:2000], return_tensors="pt").input_ids[:, :96]


def test_the_alias_is_one_verified_file():
    shipped = ALIASES["smollm2-135m"]
    (gguf,) = chunk_files(shipped)
    assert gguf.name.endswith(".gguf") and gguf.stat().st_size == shipped.size


def test_smollm2_as_the_llm_alone(smol, ids):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_key_value_heads < model.config.num_attention_heads
    iam = IAMForCausalLM(model, model, MappingConfig(ratio=0.0))
    with torch.no_grad():
        assert torch.equal(iam(ids).logits, model(ids).logits)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id or tok.eos_token_id}
    assert torch.equal(iam.generate(ids, **kwargs), model.generate(ids, **kwargs))


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
