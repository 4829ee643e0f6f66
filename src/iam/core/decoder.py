"""Running a decoder of a served family (``iam.core.families``) layer by layer, with some layers' attention replaced
for one call, without touching the model: no module is swapped, no hook registered and no config changed, so the
same model can serve other callers (and other threads) at the same time. Everything else is the model's own code:
its embeddings, rotary embeddings (one per layer kind in Gemma 3), masks (sliding-window ones for local layers),
decoder layers, norms and attention functions.

What sets the families apart is read off the modules: per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3), a fused
``qkv_proj`` (Phi-3, ``projection``), a partial rotary embedding (``apply_rope``), the norms around Gemma's attention
and MLP (``layer_forward``) and soft-capped logits (``attend``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .families import FULL, family, layer_kinds
from .parallel import shard_of

Attention = Callable[[torch.Tensor], torch.Tensor]
"""A layer's attention for one call: normed hidden states ``[B, t, D]`` in, ``o_proj`` output ``[B, t, D]`` out."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as the served families apply it: ``x`` is ``[B, H, T, d]``, ``cos``/``sin`` are ``[B, T, r]``;
    the first ``r`` dims rotate and the rest pass (``r < d``: a partial rotary factor, as Phi-3 allows)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat([rot * cos + rotate_half(rot) * sin, x[..., r:]], -1)


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


def projection(attn: nn.Module, part: str) -> tuple[nn.Linear, int]:
    """The linear that projects ``part`` (``"q"``, ``"k"`` or ``"v"``) of an attention module, and the part's first row
    in it: the module's own ``{part}_proj`` from row 0, or the part's block of rows of a fused ``qkv_proj`` (Phi-3:
    Q, K, V in that order)."""
    own = getattr(attn, f"{part}_proj", None)
    if own is not None:
        return own, 0
    d, config = attn.head_dim, attn.config
    return attn.qkv_proj, {
        "q": 0,
        "k": config.num_attention_heads * d,
        "v": (config.num_attention_heads + config.num_key_value_heads) * d,
    }[part]


def project_groups(proj: nn.Linear, x: torch.Tensor, groups: tuple[int, ...], width: int, offset: int = 0) -> torch.Tensor:
    """``proj(x)`` restricted to the output rows of ``groups`` (``width`` rows each, from row ``offset``), from views of
    its weight (the module itself when that is all of its rows): a fused projection computes no other part's rows."""
    if offset == 0 and runs(groups) == [(0, proj.out_features // width)]:
        return proj(x)
    parts = []
    for a, b in runs(groups):
        rows = slice(offset + a * width, offset + b * width)
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
    (default: every group), through its per-head norms where it has them (Qwen3, Gemma 3).

    Under tensor parallelism (``iam.core.parallel``) the modules give the rank's heads, and ``groups`` index them;
    with ``gather`` every rank's heads are gathered first, and ``groups`` index all of them."""
    d = attn.head_dim
    shard = shard_of(attn)
    if shard is None:
        groups = tuple(range(attn.config.num_key_value_heads)) if groups is None else groups
        (q_proj, q_at), (k_proj, k_at) = projection(attn, "q"), projection(attn, "k")
        q = project_groups(q_proj, hidden, groups, attn.num_key_value_groups * d, q_at)
        k = project_groups(k_proj, hidden, groups, d, k_at)
    else:  # the modules themselves (their sharded weights are DTensors), then the groups' columns
        q, k = attn.q_proj(hidden), attn.k_proj(hidden)
        if gather:
            q, k = shard.gather(q, -1), shard.gather(k, -1)
        if groups is not None:
            q, k = take_columns(q, groups, attn.num_key_value_groups * d), take_columns(k, groups, d)
    return rotated(attn, q, k, cos, sin)


def rotated(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected Q and K ``[B, t, heads * d]`` as ``[B, heads, t, d]``, through the module's per-head norms where it
    has them (Qwen3, Gemma 3: over each head's d dims, before RoPE), then rotated."""
    b, t, _ = q.shape
    q, k = (x.view(b, t, -1, attn.head_dim).transpose(1, 2) for x in (q, k))
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def project_qkv(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE Q, K and V of every head, as the module computes them: a fused ``qkv_proj`` in one call of the module
    (so that adapters on it, ``iam tune``'s LoRA, apply)."""
    if not hasattr(attn, "qkv_proj"):
        return *project_qk(attn, hidden, cos, sin), project_v(attn, hidden)
    b, t, _ = hidden.shape
    heads, kv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q, k, v = attn.qkv_proj(hidden).split([heads * d, kv * d, kv * d], -1)
    return *rotated(attn, q, k, cos, sin), v.view(b, t, kv, d).transpose(1, 2)


def project_v(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """V ``[B, KV, t, d]`` of an attention module: its ``v_proj``, or the V rows of a fused ``qkv_proj`` only."""
    b, t, _ = hidden.shape
    proj, offset = projection(attn, "v")
    v = (
        proj(hidden)
        if offset == 0
        else project_groups(proj, hidden, tuple(range(attn.config.num_key_value_heads)), attn.head_dim, offset)
    )
    return v.view(b, t, -1, attn.head_dim).transpose(1, 2)


def softcap(attn: nn.Module) -> float | None:
    """The logit soft-cap the module's attention function applies (Gemma 2), or ``None``."""
    return getattr(attn, "attn_logit_softcapping", None) if family(attn.config).softcap else None


def local_window(attn: nn.Module) -> int | None:
    """The sliding window of a local layer that IAM serves as such (Gemma), or ``None`` (a global layer, or a window
    wider than any context, ``iam.core.families.check_windows``)."""
    return getattr(attn, "sliding_window", None) if family(attn.config).local_layers else None


def attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention through the model's own attention function (SDPA or eager, as loaded): ``[B, H, t, d]``."""
    eager = importlib.import_module(type(attn).__module__).eager_attention_forward
    function = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    extra = {} if softcap(attn) is None else {"softcap": softcap(attn)}
    out, _ = function(
        attn,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0,
        scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", None),
        **extra,
    )
    return out.transpose(1, 2)


def layer_forward(layer: nn.Module, hidden: torch.Tensor, attention: Attention) -> torch.Tensor:
    """One decoder layer with ``attention`` in place of its ``self_attn``, through accelerate's hook where the model
    was dispatched (``device_map``): it moves ``hidden`` to the layer's device and loads offloaded weights. Gemma's
    layers norm the attention's and the MLP's outputs too; Phi-3's residual dropouts apply as the layer's own."""
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None:
        (hidden,), _ = hook.pre_forward(layer, hidden)
    out = attention(layer.input_layernorm(hidden))
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3
        hidden = hidden + layer.post_attention_layernorm(out)
        hidden = hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    else:
        keep = lambda x: x  # noqa: E731
        hidden = hidden + getattr(layer, "resid_attn_dropout", keep)(out)
        hidden = hidden + getattr(layer, "resid_mlp_dropout", keep)(layer.mlp(layer.post_attention_layernorm(hidden)))
    return hidden if hook is None else hook.post_forward(layer, hidden)


class Pass:
    """What every layer of one forward of ``model`` shares: input embeddings, and rotary embeddings and the mask of
    each layer kind (``rope_of``, ``mask_of``; ``mask`` is the global layers', where any share ``attention_mask``).

    Parameters
    ----------
    model : a ``*ForCausalLM`` of a served family.
    ids : ``[B, t]`` the new tokens.
    attention_mask : ``[B, past + t]`` 2D mask of 0/1 (left padding).
    position_ids : ``[B, t]``.
    cache : the cache the layers update (its length is the past).
    mask_layer : the cache layer whose length the mask spans (default: the first).
    own : 2D masks of the layers whose slots are their own (``KVzip``'s per-layer budgets), each over its layer's
        slots and the new tokens; the others share ``attention_mask``.
    """

    def __init__(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        mask_layer: int | None = None,
        own: dict[int, torch.Tensor] | None = None,
    ) -> None:
        base = model.model
        self.config, self.base, self.cache, self.position_ids = model.config, base, cache, position_ids
        self.hidden = base.embed_tokens(ids)  # Gemma's embedding scales itself
        self.kinds = layer_kinds(self.config)
        rotary = base.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3: one RoPE per layer kind
            self.ropes = {kind: rotary(self.hidden, position_ids, kind) for kind in set(self.kinds)}
        else:
            self.ropes = dict.fromkeys(set(self.kinds), rotary(self.hidden, position_ids))
        own = own or {}
        # before any layer updates the cache, whose lengths the masks span
        self.own = {i: self.causal_mask(m, i, self.kinds[i]) for i, m in own.items()}
        shared = {kind for i, kind in enumerate(self.kinds) if i not in own}
        shared |= {FULL} if shared else set()
        self.masks = {kind: self.causal_mask(attention_mask, mask_layer, kind) for kind in shared}
        self.mask = self.masks.get(FULL)

    def rope_of(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of decoder layer ``idx``."""
        return self.ropes[self.kinds[idx]]

    def mask_of(self, idx: int):
        """The attention mask of decoder layer ``idx`` (a sliding-window one for a local layer)."""
        return self.own[idx] if idx in self.own else self.masks[self.kinds[idx]]

    def causal_mask(self, attention_mask: torch.Tensor, layer: int | None = None, kind: str = FULL):
        """The model's own attention mask of layers of ``kind`` from a 2D ``attention_mask`` over the slots of cache layer
        ``layer``."""
        create = create_causal_mask if kind == FULL else create_sliding_window_causal_mask
        return create(
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
                attention_mask=self.mask_of(idx),
                position_embeddings=self.rope_of(idx),
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
            q, k, v = project_qkv(attn, x, *self.rope_of(idx))
            b, t, _ = x.shape
            k, v = self.cache.update(k, v, idx)
            queries[idx] = q
            return attn.o_proj(attend(attn, q, k, v, self.mask_of(idx)).transpose(1, 2).reshape(b, t, -1))

        self.layer(idx, attention)

    def queries(self, depth: int) -> dict[int, torch.Tensor]:
        """Run the first ``depth`` layers recording every one's queries (the base model only: no norm, no LM head)."""
        queries: dict[int, torch.Tensor] = {}
        for idx in range(depth):
            self.query_capture(idx, queries)
        return queries
