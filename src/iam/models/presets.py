"""Architecture presets (from the models' public config.json files), for analytic benchmarks without weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    """What the arithmetic needs of a decoder-only transformer."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    family: str = "qwen2"

    @classmethod
    def from_config(cls, cfg: dict) -> Arch:
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
            family=cfg.get("model_type", "qwen2"),
        )

    # parameters ----------------------------------------------------------------------------------------------
    @property
    def qk_params(self) -> int:
        return self.hidden * (self.heads + self.kv_heads) * self.head_dim

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embed


PRESETS: dict[str, Arch] = {
    "qwen2-72b": Arch(80, 8192, 64, 8, 128, 29568, 152064, False),
    "qwen2-7b": Arch(28, 3584, 28, 4, 128, 18944, 152064, False),
    "qwen2-0.5b": Arch(24, 896, 14, 2, 64, 4864, 151936, True),
    "qwen2.5-coder-1.5b": Arch(28, 1536, 12, 2, 128, 8960, 151936, True),
    "qwen2.5-coder-0.5b": Arch(24, 896, 14, 2, 64, 4864, 151936, True),
    "llama-3.1-70b": Arch(80, 8192, 64, 8, 128, 28672, 128256, False, "llama"),
    "llama-3.2-1b": Arch(16, 2048, 32, 8, 64, 8192, 128256, True, "llama"),
}


PAPER_PAIR = ("qwen2-72b", "qwen2-0.5b")
"""The paper's pair: what a configuration's total KV is projected to (``total_kept_at``)."""


def total_kept_at(llm_kept: float, slm_kept: float, pair: tuple[str, str] = PAPER_PAIR) -> float:
    """The total KV (the SLM's included) a configuration would keep at ``pair``, as a fraction of that LLM's own full
    cache: arithmetic, not a measurement. ``llm_kept`` is the share of its LLM's full cache it keeps, ``slm_kept`` the
    share of its SLM's full cache (both models' K and V of every layer, in their dtype), as measured on another pair;
    each share is taken to carry over (mapping, eviction and quantization act per layer and token)."""
    llm, slm = (PRESETS[name] for name in pair)
    per_token = lambda a: a.layers * a.kv_heads * a.head_dim
    return llm_kept + slm_kept * per_token(slm) / per_token(llm)


def hf_config(arch: Arch, layers: int | None = None, attn_implementation: str = "sdpa"):
    """A transformers config of ``arch`` (optionally with fewer layers), for random-weight timing."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch.family]
    return cls(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers if layers is None else layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tied,
        max_position_embeddings=32768,
        attn_implementation=attn_implementation,
    )


def load_arch(name_or_path: str) -> Arch:
    """A preset name, a ``config.json`` file, or a model folder holding one."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model folder.")
    try:
        return Arch.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:  # not JSON, not UTF-8, or a JSON without a model's fields
        raise ValueError(f"{path} is not a model's config.json ({type(err).__name__}: {err}).") from None
