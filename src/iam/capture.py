"""Read the post-RoPE queries of a transformers decoder without touching its code.

Hooks are registered only inside the ``QueryCapture`` context and removed on exit, so a model used on its own
behaves exactly as before. Keys need no hook: the model's own cache holds them post-RoPE.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Qwen2/Llama apply it: ``x`` is ``[B, H, T, d]``, ``cos``/``sin`` are ``[B, T, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a ``*ForCausalLM`` or of its base model."""
    base = getattr(model, "model", model)
    return base.layers


class QueryCapture:
    """Context manager recording ``queries[layer] -> [B, H, t, d]`` post-RoPE for the given layers."""

    def __init__(self, model: nn.Module, layers: Iterable[int]) -> None:
        self.layers = decoder_layers(model)
        self.layer_ids = list(layers)
        self.queries: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> QueryCapture:
        for idx in self.layer_ids:
            attn = self.layers[idx].self_attn
            rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def keep_rope(_mod, _args, kwargs, rope=rope):
                rope["cs"] = kwargs["position_embeddings"]

            def keep_query(_mod, _args, out, idx=idx, attn=attn, rope=rope):
                q = out.view(*out.shape[:2], -1, attn.head_dim).transpose(1, 2)
                self.queries[idx] = apply_rope(q, *rope["cs"])

            self._handles.append(attn.register_forward_pre_hook(keep_rope, with_kwargs=True))
            self._handles.append(attn.q_proj.register_forward_hook(keep_query))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
