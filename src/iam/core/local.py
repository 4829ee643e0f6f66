"""The exact local window's prefill on FlexAttention (``MappingConfig.local_window``; the chunked reference is
``MappedAttention._local``).

A mapped head's output for a query is ``sum_far a_j v_j + (1 - m) softmax_near(q k^T) v``: ``a`` is the borrowed
SLM row over every visible slot, ``far`` the slots past the sinks and older than the window, ``near`` the rest, and
``m`` the borrowed mass on ``far``. Two FlexAttention calls give it without forming a row:

- the borrowed part, per prefill item, attends with the SLM's Q/K over the slots twice: the first copy visible where
  the slot is far, with values ``[v_j, 0]``, the second where it is near, with values ``[0, 1]``. One softmax then
  spans every visible slot once, and its output is ``[sum_far a_j v_j, 1 - m]`` (FlexAttention on a CPU returns no
  log-sum-exp that would split the mass otherwise);
- the exact part attends with the head's own Q/K to the sinks and the window, block-sparse.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .flex import flex_heads


@functools.lru_cache(maxsize=16)
def items_mask(t: int, slots: int, offset: int, sinks: int, window: int, device: torch.device):
    """Block mask of the borrowed part: ``t`` queries at slots ``offset ..``, keys ``[far copy | near copy]`` of
    ``slots`` slots each."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, off, s, w = (torch.tensor(x, device=device) for x in (slots, offset, sinks, window))

    def mask(b, h, qi, ki):
        seen, first = qi + off, ki < n
        slot = torch.where(first, ki, ki - n)
        near = (slot < s) | (slot > seen - w)
        return (slot <= seen) & torch.where(first, ~near, near)

    return create_block_mask(mask, None, None, t, 2 * slots, device=device)


@functools.lru_cache(maxsize=16)
def exact_mask(t: int, keys: int, offset: int, recent_from: int, sinks: int, window: int, device: torch.device):
    """Block mask of the exact part: ``t`` queries at slots ``offset ..``, keys ``[sinks | recent]`` whose recent
    part starts at slot ``recent_from`` (slots counted from the sequence's first real token)."""
    from torch.nn.attention.flex_attention import create_block_mask

    off, r0, s, w = (torch.tensor(x, device=device) for x in (offset, recent_from, sinks, window))

    def mask(b, h, qi, ki):
        seen, sink = qi + off, ki < s
        slot = torch.where(sink, ki, ki - s + r0)
        return (slot <= seen) & (sink | ((slot > seen - w) & (slot >= s)))

    return create_block_mask(mask, None, None, t, keys, device=device)


def local_flex(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    recent_k: torch.Tensor,
    v: torch.Tensor,
    item_q: torch.Tensor,
    item_k: torch.Tensor,
    item_kv: torch.Tensor,
    starts: torch.Tensor,
    sinks: int,
    window: int,
    scaling: float,
    slm_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts of a local-window prefill.

    Parameters
    ----------
    q : ``[B, H_m, t, d]`` the mapped heads' own queries of the new slots (the last ``t`` of ``S``).
    sink_k, recent_k : ``[B, G, sinks, d]`` and ``[B, G, R, d]`` their own keys: the sinks, and the latest ``R`` slots.
    v : ``[B, G, S, d]`` the mapped groups' V of every slot.
    item_q, item_k : ``[B, U, t, d_s]`` and ``[B, U, S, d_s]`` the SLM queries and keys of each prefill item.
    item_kv : ``[B, U]`` each item's KV group (of ``G``).
    starts : ``[B]`` each sequence's first real slot; queries before it give zeros.
    sinks, window : as ``MappingConfig.sinks`` and ``MappingConfig.local_window``.
    scaling, slm_scaling : the LLM's and the SLM's attention scaling.

    Returns
    -------
    exact : ``[B, H_m, t, d]`` each head's softmax over its sinks and window, times V.
    borrowed : ``[B, U, t, d + 1]`` per item ``sum_far a_j v_j``, then the borrowed mass ``1 - m`` left to the exact part.
    """
    b, h, t, d = q.shape
    g, total = v.shape[1], v.shape[2]
    per, past, first_recent = h // g, total - t, total - recent_k.shape[2]
    exact = q.new_zeros(b, h, t, d)
    borrowed = q.new_zeros(b, item_q.shape[1], t, d + 1)
    group_of_head = torch.arange(h, device=q.device) // per
    for start in starts.unique().tolist():  # one set of masks per first real slot (one, unpadded)
        rows = (starts == start).nonzero()[:, 0].to(q.device)
        skip = max(start - past, 0)  # new slots that are padding
        n, offset = total - start, past + skip - start  # real slots; the first real query's slot
        if skip == t:
            continue
        # borrowed: each item's SLM queries over [far copy | near copy] of its real slots
        iv = v[rows[:, None], item_kv[rows], start:]  # [r, U, n, d]
        values = torch.cat([F.pad(iv, (0, 1)), F.pad(torch.zeros_like(iv), (0, 1), value=1.0)], 2)
        ik = item_k[rows, :, start:]
        keys = torch.cat([ik, ik], 2)
        mask = items_mask(t - skip, n, offset, sinks, window, q.device)
        out = flex_heads((item_q[rows, :, skip:] * slm_scaling).flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), mask)
        borrowed[rows, :, skip:] = out.view(len(rows), -1, t - skip, d + 1)
        # exact: each head's own queries over its group's sinks and recent slots
        sink_v = v[rows, :, start : start + sinks]
        ek = torch.cat([sink_k[rows], recent_k[rows]], 2)[:, group_of_head]  # [r, H_m, sinks + R, d]
        ev = torch.cat([sink_v, v[rows, :, first_recent:]], 2)[:, group_of_head]
        mask = exact_mask(t - skip, ek.shape[2], offset, first_recent - start, sinks, window, q.device)
        out = flex_heads((q[rows, :, skip:] * scaling).flatten(0, 1), ek.flatten(0, 1), ev.flatten(0, 1), mask)
        exact[rows, :, skip:] = out.view(len(rows), h, t - skip, d)
    return exact, borrowed
