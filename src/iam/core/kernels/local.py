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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..step import Routes, SLMStep
from .flex import FLEX_HEADS, flex_heads


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
    slm: SLMStep,
    routes: Routes,
    starts: torch.Tensor,
    sinks: int,
    window: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts of a local-window prefill.

    Parameters
    ----------
    q : ``[B, H_m, t, d]`` the mapped heads' own queries of the new slots (the last ``t`` of ``S``).
    sink_k, recent_k : ``[B, G, sinks, d]`` and ``[B, G, R, d]`` their own keys: the sinks, and the latest ``R`` slots.
    v : ``[B, G, S, d]`` the mapped groups' V of every slot.
    slm, routes : the SLM's step and the layer's routes: the SLM queries and keys of each prefill item.
    starts : ``[B]`` each sequence's first real slot; queries before it give zeros.
    sinks, window : as ``MappingConfig.sinks`` and ``MappingConfig.local_window``.
    scaling : the LLM's attention scaling.

    Returns
    -------
    exact : ``[B, H_m, t, d]`` each head's softmax over its sinks and window, times V.
    borrowed : ``[B, U, t, d + 1]`` per item ``sum_far a_j v_j``, then the borrowed mass ``1 - m`` left to the exact part.
    """
    b, h, t, d = q.shape
    total = v.shape[2]
    past, units = total - t, routes.item_kv.shape[1]
    exact = q.new_zeros(b, h, t, d)
    borrowed = q.new_zeros(b, units, t, d + 1)
    for start in starts.unique().tolist():  # one set of masks per first real slot (one, unpadded)
        rows = (starts == start).nonzero()[:, 0].to(q.device)
        skip = max(start - past, 0)  # new slots that are padding
        if skip < t:
            part = Rows(rows, start, skip, past + skip - start)
            borrowed[rows, :, skip:] = part.borrowed(v, slm, routes, sinks, window)
            exact[rows, :, skip:] = part.exact(q, sink_k, recent_k, v, sinks, window, scaling)
    return exact, borrowed


@dataclass(frozen=True)
class Rows:
    """The sequences of a batch that share their first real slot ``start``, which one set of masks serves: their
    first ``skip`` new slots are padding, and their first real query sits at slot ``offset`` (from ``start``)."""

    rows: torch.Tensor
    start: int
    skip: int
    offset: int

    def borrowed(self, v: torch.Tensor, slm: SLMStep, routes: Routes, sinks: int, window: int) -> torch.Tensor:
        """``[r, U, t - skip, d + 1]``: each item's SLM queries over [far copy | near copy] of the real slots, with
        values ``[v, 0]`` and ``[0, 1]``."""
        (qs, ks), (q_at, k_at) = slm.stack(), slm.item_heads(routes)
        units, d, n = q_at.shape[1], v.shape[-1], v.shape[2] - self.start
        seq = self.rows.repeat_interleave(units)
        item = torch.arange(units, device=v.device).repeat(len(self.rows))
        near_value = v.new_zeros(FLEX_HEADS, n, d + 1)
        near_value[..., d] = 1.0

        def chunk(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r, u = seq[i], item[i]
            iq = qs[r, q_at[r, u], self.skip :].to(v.dtype).mul_(slm.scaling)
            ik = ks[r, k_at[r, u], self.start :].to(v.dtype)
            iv = F.pad(v[r, routes.item_kv[r, u], self.start :], (0, 1))
            return iq, torch.cat([ik, ik], 1), torch.cat([iv, near_value], 1)

        t = qs.shape[2] - self.skip
        out = flex_heads(len(seq), chunk, items_mask(t, n, self.offset, sinks, window, v.device))
        return out.view(len(self.rows), units, t, d + 1)

    def exact(
        self,
        q: torch.Tensor,
        sink_k: torch.Tensor,
        recent_k: torch.Tensor,
        v: torch.Tensor,
        sinks: int,
        window: int,
        scaling: float,
    ) -> torch.Tensor:
        """``[r, H_m, t - skip, d]``: each head's own queries over its group's sinks and recent slots."""
        h, t, d = q.shape[1], q.shape[2] - self.skip, q.shape[-1]
        per, first_recent = h // v.shape[1], v.shape[2] - recent_k.shape[2]
        seq = self.rows.repeat_interleave(h)
        head = torch.arange(h, device=q.device).repeat(len(self.rows))

        def chunk(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r, hq = seq[i], head[i]
            g = hq // per
            ek = torch.cat([sink_k[r, g], recent_k[r, g]], 1)
            ev = torch.cat([v[r, g, self.start : self.start + sinks], v[r, g, first_recent:]], 1)
            return q[r, hq, self.skip :] * scaling, ek, ev

        keys = sinks + recent_k.shape[2]
        mask = exact_mask(t, keys, self.offset, first_recent - self.start, sinks, window, q.device)
        return flex_heads(len(seq), chunk, mask).view(len(self.rows), h, t, d)
