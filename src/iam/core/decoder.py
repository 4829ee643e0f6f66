"""Running a Qwen2/Llama decoder layer by layer, with some layers' attention replaced for one call, without
touching the model: no module is swapped, no hook registered and no config changed, so the same model can serve
other callers (and other threads) at the same time. Everything else is the model's own code: its embeddings,
rotary embedding, mask creation, decoder layers, norms and attention functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .parallel import shard_of

Attention = Callable[[torch.Tensor], torch.Tensor]
"""A layer's attention for one call: normed hidden states ``[B, t, D]`` in, ``o_proj`` output ``[B, t, D]`` out."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Qwen2/Llama apply it: ``x`` is ``[B, H, T, d]``, ``cos``/``sin`` are ``[B, T, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a ``*ForCausalLM`` or of its base model."""
    return getattr(model, "model", model).layers


def positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids ``[B, new]`` of the last ``new`` tokens of a left-padded batch (padding at position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -new:]


def runs(groups: tuple[int, ...]) -> list[tuple[int, int]]:
    """Contiguous runs ``[start, stop)`` of sorted group indices."""
    out: list[list[int]] = []
    for g in groups:
        if out and out[-1][1] == g:
            out[-1][1] = g + 1
        else:
            out.append([g, g + 1])
    return [(a, b) for a, b in out]


def project_groups(proj: nn.Linear, x: torch.Tensor, groups: tuple[int, ...], width: int) -> torch.Tensor:
    """``proj(x)`` restricted to the output rows of ``groups`` (``width`` rows each), from views of its weight (the
    module itself when that is all of its rows)."""
    if runs(groups) == [(0, proj.out_features // width)]:
        return proj(x)
    parts = []
    for a, b in runs(groups):
        rows = slice(a * width, b * width)
        parts.append(nn.functional.linear(x, proj.weight[rows], None if proj.bias is None else proj.bias[rows]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def take_columns(x: torch.Tensor, groups: tuple[int, ...], width: int) -> torch.Tensor:
    """The last-axis columns of ``groups`` (``width`` each) of ``x``."""
    parts = [x[..., a * width : b * width] for a, b in runs(groups)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def project_qk(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    groups: tuple[int, ...] | None = None,
    gather: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE Q ``[B, H_g, t, d]`` and K ``[B, KV_g, t, d]`` of an attention module, of its KV ``groups`` only
    (default: every group).

    Under tensor parallelism (``iam.core.parallel``) the modules give the rank's heads, and ``groups`` index them;
    with ``gather`` every rank's heads are gathered first, and ``groups`` index all of them."""
    b, t, _ = hidden.shape
    d = attn.head_dim
    shard = shard_of(attn)
    if shard is None:
        groups = tuple(range(attn.config.num_key_value_heads)) if groups is None else groups
        q = project_groups(attn.q_proj, hidden, groups, attn.num_key_value_groups * d)
        k = project_groups(attn.k_proj, hidden, groups, d)
    else:  # the modules themselves (their sharded weights are DTensors), then the groups' columns
        q, k = attn.q_proj(hidden), attn.k_proj(hidden)
        if gather:
            q, k = shard.gather(q, -1), shard.gather(k, -1)
        if groups is not None:
            q, k = take_columns(q, groups, attn.num_key_value_groups * d), take_columns(k, groups, d)
    q, k = (x.view(b, t, -1, d).transpose(1, 2) for x in (q, k))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention through the model's own attention function (SDPA or eager, as loaded): ``[B, H, t, d]``."""
    eager = importlib.import_module(type(attn).__module__).eager_attention_forward
    function = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, _ = function(
        attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, sliding_window=getattr(attn, "sliding_window", None)
    )
    return out.transpose(1, 2)


def layer_forward(layer: nn.Module, hidden: torch.Tensor, attention: Attention) -> torch.Tensor:
    """One Qwen2/Llama decoder layer with ``attention`` in place of its ``self_attn``, through accelerate's hook where the
    model was dispatched (``device_map``): it moves ``hidden`` to the layer's device and loads offloaded weights."""
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None:
        (hidden,), _ = hook.pre_forward(layer, hidden)
    hidden = hidden + attention(layer.input_layernorm(hidden))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden if hook is None else hook.post_forward(layer, hidden)


class Pass:
    """What every layer of one forward of ``model`` shares: input embeddings, rotary embeddings and the mask.

    Parameters
    ----------
    model : a Qwen2/Llama ``*ForCausalLM``.
    ids : ``[B, t]`` the new tokens.
    attention_mask : ``[B, past + t]`` 2D mask of 0/1 (left padding).
    position_ids : ``[B, t]``.
    cache : the cache the layers update (its length is the past).
    mask_layer : the cache layer whose length the mask spans (default: the first).
    """

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        mask_layer: int | None = None,
    ) -> None:
        base = model.model
        self.config, self.base, self.cache, self.position_ids = model.config, base, cache, position_ids
        self.hidden = base.embed_tokens(ids)
        self.rope = base.rotary_emb(self.hidden, position_ids)
        self.mask = self.causal_mask(attention_mask, mask_layer)

    def causal_mask(self, attention_mask: torch.Tensor, layer: int | None = None):
        """The model's own attention mask from a 2D ``attention_mask`` over the slots of cache layer ``layer``."""
        return create_causal_mask(
            config=self.config,
            inputs_embeds=self.hidden,
            attention_mask=attention_mask,
            cache=self.cache,
            position_ids=self.position_ids,
            layer_idx=layer,
        )

    def layer(self, idx: int, attention: Attention | None = None) -> None:
        """Run decoder layer ``idx`` as the model does, or with ``attention`` in place of its ``self_attn``."""
        layer = self.base.layers[idx]
        if attention is None:
            self.hidden = layer(
                self.hidden,
                attention_mask=self.mask,
                position_embeddings=self.rope,
                position_ids=self.position_ids,
                cache=self.cache,
                use_cache=True,
            )
        else:
            self.hidden = layer_forward(layer, self.hidden, attention)

    def query_capture(self, idx: int, queries: dict[int, torch.Tensor]) -> None:
        """Run decoder layer ``idx`` as the model does, recording its post-RoPE queries ``[B, H, t, d]`` in
        ``queries[idx]`` (keys need no recording: the cache holds them post-RoPE)."""
        attn = self.base.layers[idx].self_attn

        def attention(x: torch.Tensor) -> torch.Tensor:
            q, k = project_qk(attn, x, *self.rope)
            b, t, _ = x.shape
            v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
            k, v = self.cache.update(k, v, idx)
            queries[idx] = q
            return attn.o_proj(attend(attn, q, k, v, self.mask).transpose(1, 2).reshape(b, t, -1))

        self.layer(idx, attention)

    def queries(self, depth: int) -> dict[int, torch.Tensor]:
        """Run the first ``depth`` layers recording every one's queries (the base model only: no norm, no LM head)."""
        queries: dict[int, torch.Tensor] = {}
        for idx in range(depth):
            self.query_capture(idx, queries)
        return queries
