"""Tiny random same-family pairs and a character tokenizer for them, built in code (no downloads)."""

from __future__ import annotations

import copy
import string

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from iam import IAMForCausalLM, MappingConfig
from iam.core.kernels import Kernels

LOCAL_WINDOW = 8
"""The sliding window of the tiny Gemma models' local layers: shorter than the tests' prompts."""

FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    # head sizes differ from hidden / heads, and between the two models (24 and 16, see ``tiny``)
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"original_max_position_embeddings": 256}),
    # local and global layers interleaved (one local, one global); soft-capped logits; 1/sqrt(query_pre_attn_scalar)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": LOCAL_WINDOW, "query_pre_attn_scalar": 12}),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": LOCAL_WINDOW, "query_pre_attn_scalar": 12}),
}
"""Each served family's config and model class, and what its tiny configs set beyond the shared sizes."""

CORE_FAMILIES = ("llama", "qwen2")
"""The families the ``family`` fixture runs every mechanics test on; the others run ``test_families.py``."""

VOCAB = 97


def tiny(family: str, layers: int, hidden: int, heads: int, kv_heads: int, seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    """A tiny random causal LM whose attention is peaked enough that heads are told apart."""
    config_cls, model_cls, extra = FAMILIES[family]
    extra = dict(extra)
    if family in ("qwen3", "gemma2", "gemma3_text"):  # an explicit head size, not hidden / heads
        extra["head_dim"] = 24 if hidden >= 64 else 16
    if family.startswith("gemma"):  # local, then global, layers
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attn_implementation="eager" if family == "gemma2" else "sdpa",  # Gemma 2 soft-caps: eager only
        tie_word_embeddings=False,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            sharpen(layer.self_attn)
    return model


def sharpen(attn: torch.nn.Module) -> None:
    """Scale an attention module's Q and K (their projections' rows, or their per-head norms) by 8 and 3."""
    if hasattr(attn, "q_norm"):  # the norms undo any scale of the projections
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.fill_(2.0 if "Gemma" in type(norm).__name__ else 3.0)  # Gemma's norms scale by 1 + weight
    elif hasattr(attn, "qkv_proj"):
        attn.qkv_proj.weight[: (attn.config.num_attention_heads + attn.config.num_key_value_heads) * attn.head_dim].mul_(8.0)
    else:
        attn.q_proj.weight.mul_(8.0)
        attn.k_proj.weight.mul_(8.0)


@pytest.fixture(params=CORE_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def pair(family):
    """(LLM, SLM): 4-layer LLM with GQA, 2-layer SLM of the same family."""
    return tiny(family, 4, 64, 4, 2, seed=0), tiny(family, 2, 32, 2, 1, seed=1)


@pytest.fixture
def twin(family):
    """(LLM, exact copy of the LLM)."""
    llm = tiny(family, 4, 64, 4, 2, seed=0)
    return llm, copy.deepcopy(llm)


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[-1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[-1] :] = p
        mask[i, width - p.shape[-1] :] = 1
    return ids, mask


def kv_groups_mapped(units: list, n_kv: int = 2) -> int:
    """KV groups a ``mapped_layers`` list maps: whole layers (ints) count ``n_kv``, ``"layer:group"`` entries one."""
    return sum(n_kv if isinstance(u, int) else 1 for u in units)


CHARS = string.ascii_letters + string.digits + " .,:;?!'-()\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny models' 97 ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then one id
    per character of ``CHARS``; left padding and a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


WORDS = "the of and to in is was for on as with by he at from his an were are which this be or had it".split()
WORD_VOCAB = 3 + len(WORDS) + len(CHARS)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokenizer for the same text (``WORD_VOCAB`` ids): a few common English words whole, everything else
    one character at a time, so it shares some tokens' character spans with ``char_tokenizer`` and not others."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(CHARS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = "|".join(sorted(WORDS, key=len, reverse=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(rf"\b(?:{words})\b|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_pair(folder, max_positions: int | None = None, family: str = "qwen2") -> tuple[str, str]:
    """The tiny pair of ``family`` (4-layer LLM, 2-layer SLM) saved as ``folder/llm`` and ``folder/slm``, each with the
    character tokenizer; ``max_positions`` raises their position limit for longer texts."""
    folders = []
    for name, model in [("llm", tiny(family, 4, 64, 4, 2, seed=0)), ("slm", tiny(family, 2, 32, 2, 1, seed=1))]:
        if max_positions is not None:
            model.config.max_position_embeddings = max_positions
        model.save_pretrained(folder / name)
        char_tokenizer().save_pretrained(folder / name)
        folders.append(str(folder / name))
    return folders[0], folders[1]


@pytest.fixture
def pair_folders(tmp_path) -> tuple[str, str]:
    """The tiny qwen2 pair saved as transformers folders (``save_tiny_pair``)."""
    return save_tiny_pair(tmp_path)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def iam(llm, slm, *, kernels: Kernels = Kernels(), **mapping) -> IAMForCausalLM:
    """``IAMForCausalLM.from_pair(llm, slm, MappingConfig(**mapping), kernels=kernels)``."""
    return IAMForCausalLM.from_pair(llm, slm, MappingConfig(**mapping), kernels=kernels)


def forward(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs):
    """One forward without gradients."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)
