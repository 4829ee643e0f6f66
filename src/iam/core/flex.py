"""FlexAttention for mapped layers: one compiled kernel, called on fixed-size head chunks, with the block masks of
causal mapped prefill (``MappedAttention._prefill``) and of the exact local window (``iam.core.local``)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

FLEX_MIN_TOKENS = 256
"""Prefill length from which mapped attention runs FlexAttention (docs/results.md, "FlexAttention"). Up to 128 tokens
(one flex block) flex would need a second compilation, for an attention cost that is negligible there."""

FLEX_HEADS = 8
"""Heads per FlexAttention call. The compiled kernel is specialised to the batch and head counts (only the lengths
are dynamic) and falls back to an unfused version, which builds the T x T scores, after 8 recompilations. Every
call therefore has the shape ``[1, FLEX_HEADS, T, d]``: one compilation serves every batch, mapping and length."""


@functools.cache
def compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention of independent heads: ``q [N, t, dq]`` (already scaled), ``k [N, n, dq]``, ``v [N, n, dv]``
    -> ``[N, t, dv]``, every head under ``block_mask`` (built for one head), in calls of ``FLEX_HEADS`` heads."""
    n, t = q.shape[:2]
    pad = -n % FLEX_HEADS
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(-1, 1, FLEX_HEADS, *x.shape[1:]) for x in (q, k, v))
    kernel = compiled_flex()
    # each chunk a tensor of its own: a view would make the compiled kernel guard on its base's size (the chunk count)
    out = torch.cat([kernel(*(x.clone() for x in c), block_mask=block_mask, scale=1.0) for c in zip(q, k, v)])
    return out.flatten(0, 1)[:n]


@functools.cache
def flex_kernel(device: torch.device, dtype: torch.dtype, qk_dim: int, v_dim: int) -> Callable | None:
    """Causal FlexAttention for this device, dtype and head sizes, any batch, item count and length above 128
    tokens, as ``kernel(q [B, U, T, qk_dim], k [B, U, T, qk_dim], v [B, U, T, v_dim], scale) -> [B, U, T, v_dim]``.
    Compiled on first use (a few seconds); ``None`` where it cannot be compiled here (SDPA is used instead)."""

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        b, u, t = q.shape[:3]
        # q scaled in a copy: one compiled kernel for every scale (a float argument is specialised on)
        out = flex_heads((q * scale).flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal_block_mask(t, device))
        return out.view(b, u, t, v_dim)

    try:
        for t in (FLEX_MIN_TOKENS, FLEX_MIN_TOKENS + 128):  # two lengths: the second compiles the length-dynamic kernel
            x = torch.zeros(1, 1, t, max(qk_dim, v_dim), device=device, dtype=dtype)
            kernel(x[..., :qk_dim], x[..., :qk_dim], x[..., :v_dim], 1.0)
    except Exception as e:  # no compiler, or a backend without flex support
        warnings.warn(f"FlexAttention is unavailable ({type(e).__name__}: {e}); mapped prefill uses SDPA.", stacklevel=2)
        return None
    return kernel


@functools.lru_cache(maxsize=8)
def causal_block_mask(t: int, device: torch.device):
    """Causal FlexAttention mask over ``t`` tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device=device)
