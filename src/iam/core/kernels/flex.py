"""FlexAttention for mapped layers: one compiled kernel, called on fixed-size head chunks gathered per call, and the
causal block mask of mapped prefill (``MappedAttention._prefill``; the local window's masks are in ``iam.core.kernels.local``).
Where FlexAttention runs is the model's ``iam.core.kernels.Kernels``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

FLEX_HEADS = 8
"""Heads per FlexAttention call. The compiled kernel is specialised to the batch and head counts (only the lengths
are dynamic) and falls back to an unfused version, which builds the T x T scores, after 8 recompilations. Every
call therefore has the shape ``[1, FLEX_HEADS, T, d]``: one compilation serves every batch, mapping and length."""


@functools.cache
def compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


Chunk = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``chunk(index)``: the q (already scaled), k and v of the heads ``index`` (``[FLEX_HEADS]``), as new tensors
``[FLEX_HEADS, t, dq]``, ``[FLEX_HEADS, n, dq]`` and ``[FLEX_HEADS, n, dv]`` (gathered for the call, not views)."""


def flex_heads(heads: int, chunk: Chunk, block_mask) -> torch.Tensor:
    """FlexAttention of ``heads`` independent heads, every one under ``block_mask`` (built for one head), in calls of
    ``FLEX_HEADS`` heads whose inputs ``chunk`` gathers (the last call's index repeats the last head). Each input
    is its own tensor: a view would make the compiled kernel guard on its base's size. Returns ``[heads, t, dv]``."""
    kernel = compiled_flex()
    out = []
    for a in range(0, heads, FLEX_HEADS):
        index = torch.arange(a, a + FLEX_HEADS).clamp_max(heads - 1)
        q, k, v = chunk(index)
        out.append(kernel(q[None], k[None], v[None], block_mask=block_mask, scale=1.0)[0])
    return torch.cat(out)[:heads]


def flex_serves(*inputs: torch.Tensor) -> bool:
    """Whether FlexAttention can run a prefill reading ``inputs`` (the LLM's and the SLM's tensors alike): compiled
    code cannot run under a Python dispatch mode (TensorPeak, FlopCounterMode), and FlexAttention has no backward
    on a CPU (tuning the SLM, ``iam.tuning``, where only the SLM's side needs gradients)."""
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    return not is_in_torch_dispatch_mode() and not (backward and inputs[0].device.type == "cpu")


@functools.cache
def flex_ready(device: torch.device, dtype: torch.dtype, qk_dim: int, v_dim: int, tokens: int) -> bool:
    """Whether FlexAttention compiles here for this dtype and head sizes (any head count), from ``tokens`` long
    prefills on (``Kernels.flex_from``). It compiles on first use (a few seconds); where it cannot, a warning says
    so, and mapped attention runs SDPA or the chunked local window instead."""
    try:
        for t in (tokens, tokens + 128):  # two lengths: the second compiles the length-dynamic kernel
            qk, v = (torch.zeros(FLEX_HEADS, t, n, device=device, dtype=dtype) for n in (qk_dim, v_dim))
            flex_heads(1, lambda i, qk=qk, v=v: (qk.clone(), qk.clone(), v), causal_block_mask(t, device))
    except Exception as e:  # no compiler, or a backend without flex support
        warnings.warn(
            f"FlexAttention is unavailable ({type(e).__name__}: {e}); mapped prefill uses SDPA, the local window its "
            "chunked kernel.",
            stacklevel=2,
        )
        return False
    return True


@functools.lru_cache(maxsize=8)
def causal_block_mask(t: int, device: torch.device):
    """Causal FlexAttention mask over ``t`` tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, t, t, device=device)
