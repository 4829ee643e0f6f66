"""Plain mapped prefill (no local window): the borrowed attention of each prefill item (a distinct SLM head and KV
group, ``Routes``) times the mapped groups' V, on FlexAttention or padded SDPA, or, with soft-capped logits (Gemma
2), the layer's eager attention in query chunks. ``MappedAttention._prefill`` picks one (``Kernels.flex``) and mixes
the items into heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mapping import cap
from ..step import Routes, SLMStep
from . import Kernels
from .flex import causal_block_mask, flex_heads


def flex_prefill(routes: Routes, v: torch.Tensor, slm: SLMStep) -> torch.Tensor:
    """Causal prefill of every item on FlexAttention, which takes the SLM's q/k head size and V's as they are:
    ``v`` ``[B, G, t, d]`` holds the mapped groups' V of the new (and only) tokens. Returns ``[B, U, t, d]``."""
    b, t, d = v.shape[0], v.shape[2], v.shape[-1]
    rows = torch.arange(b, device=v.device)[:, None]
    q_at, k_at = slm.item_heads(routes)  # [B, U] each: (sequence, stacked SLM head) of every item
    (qs, ks), seq = slm.stack(), rows.expand_as(q_at).flatten()
    q_at, k_at, kv = q_at.flatten(), k_at.flatten(), routes.item_kv.flatten()

    def chunk(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = qs[seq[i], q_at[i]].to(v.dtype).mul_(slm.scaling)
        return q, ks[seq[i], k_at[i]].to(v.dtype), v[seq[i], kv[i]]

    return flex_heads(len(seq), chunk, causal_block_mask(t, v.device)).view(*routes.item_kv.shape, t, d)


def sdpa_prefill(
    routes: Routes, v: torch.Tensor, attention_mask: torch.Tensor | None, slm: SLMStep, kernels: Kernels
) -> torch.Tensor:
    """Prefill of every item with SDPA, whose fused kernels need one head size: the SLM's q/k, smaller than the
    LLM's, are zero-padded, which keeps q.k exact and avoids the fallback that would build the T x T matrix.
    Soft-capped logits (``slm.softcap``) run ``capped_attention`` instead. ``v`` ``[B, G, S, d]`` holds the mapped
    groups' V of the slots it keeps; ``attention_mask`` is the 4D mask, or ``None``: causal. Returns ``[B, U, t, d]``."""
    b, total, d = v.shape[0], v.shape[2], v.shape[-1]  # total: cached and new tokens
    d_s = slm.queries[0].shape[-1]
    rows = torch.arange(b, device=v.device)[:, None]
    q, k = slm.items(routes, v.dtype)
    k, v = k[:, :, k.shape[2] - total :], v[rows, routes.item_kv]  # the slots V holds: a local layer's, its window's
    if slm.softcap is not None:  # no fused kernel caps logits: the layer's own eager attention, in query chunks
        return capped_attention(q, k, v, attention_mask, slm.scaling, slm.softcap, kernels)
    width = max(d_s, d)
    q, k = (F.pad(x, (0, width - d_s)) for x in (q, k))
    return F.scaled_dot_product_attention(
        q,
        k,
        F.pad(v, (0, width - d)),
        attn_mask=attention_mask,
        is_causal=attention_mask is None,
        scale=slm.scaling,
    )[..., :d]


def capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float,
    kernels: Kernels,
) -> torch.Tensor:
    """Attention with soft-capped logits as Gemma 2's eager attention computes it: ``q`` ``[B, U, t, d_s]``, ``k``
    ``[B, U, S, d_s]``, ``v`` ``[B, U, S, d]``, the model's 4D mask (or ``None``: causal); in chunks of queries of at
    most ``kernels.chunk_elements`` logits. Returns ``[B, U, t, d]``."""
    b, u, t, _ = q.shape
    s = k.shape[2]
    chunk = kernels.chunk(t, b * u * s)
    out = []
    for a in range(0, t, chunk):
        e = min(a + chunk, t)
        scores = cap((q[:, :, a:e].float() @ k.float().transpose(-1, -2)) * scaling, softcap)
        if attention_mask is None:
            hidden = torch.arange(a, e, device=q.device)[:, None] < torch.arange(s, device=q.device)
            scores = scores.masked_fill(hidden, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[:, :, a:e], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[:, :, a:e]
        out.append(scores.softmax(-1).to(v.dtype) @ v)
    return torch.cat(out, 2)
