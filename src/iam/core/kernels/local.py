"""The exact local window's kernels (``MappingConfig.local_window``): its prefill on FlexAttention (``local_flex``),
and the chunked reference (``local_chunked``), which also serves decode.

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
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..step import Routes, SLMStep
from . import Kernels
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


def at_sinks(x: torch.Tensor, starts: torch.Tensor, sinks: int) -> torch.Tensor:
    """``[B, G, sinks, e]``: each sequence's sink slots (``starts[b] ..``) of ``x`` ``[B, G, S, e]``; a slot past the
    end reads the last one (the callers mask it)."""
    slots = (starts[:, None] + torch.arange(sinks, device=x.device)).clamp_max(x.shape[2] - 1)
    return x.gather(2, slots[:, None, :, None].expand(*x.shape[:2], sinks, x.shape[-1]))


def local_chunked(
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
    attention_mask: torch.Tensor | None,
    kernels: Kernels,
) -> torch.Tensor:
    """The local window's reference kernel, in prefill and decode: the mapped heads' output
    ``sum_far a_j v_j + (1 - m) softmax_near(q k^T) v`` with queries in chunks of ``kernels.chunk``, the exact part
    reading only the chunk's sinks and window. Arguments as for ``local_flex``, and ``attention_mask``, the global
    layers' mask (decode reads the SLM's shared rows with it). Returns ``[B, H_m, t, d]``."""
    b, h, t, d = q.shape
    g, total = v.shape[1], v.shape[2]
    past, per = total - t, h // g
    slots = torch.arange(total, device=v.device)
    first_real = starts[:, None, None]  # [B, 1, 1]
    sink_slots = first_real[:, 0] + slots[:sinks]  # [B, sinks]
    sink_v = at_sinks(v, starts, sinks)
    first_recent = total - recent_k.shape[2]  # the slot of recent_k[:, :, 0]
    items = None if t == 1 else slm.items(routes, torch.float32)
    q = q.float().view(b, g, per, t, d)
    out = q.new_empty(b, g, per, t, d)
    columns = max(routes.item_of_column.shape[1], routes.item_kv.shape[1])
    chunk = kernels.chunk(t, b * columns * total, kernels.min_chunk)
    for a in range(0, t, chunk):
        e = min(a + chunk, t)
        seen = slots[past + a : past + e, None]  # [c, 1] the chunk's query slots
        lo = max(past + a - window + 1, first_recent)
        recent = slots[lo : past + e]
        exact_k = torch.cat([sink_k, recent_k[:, :, lo - first_recent : past + e - first_recent]], 2).float()
        exact_v = torch.cat([sink_v, v[:, :, lo : past + e]], 2).float()
        reads = torch.cat(  # [B, c, sinks + n]: sinks up to the query; recent within the window, past the sinks
            [
                (sink_slots[:, None, :] <= seen).expand(-1, e - a, -1),
                (recent <= seen) & (recent > seen - window) & (recent >= first_real + sinks),
            ],
            -1,
        )
        scores = (q[:, :, :, a:e] @ exact_k[:, :, None].transpose(-1, -2)) * scaling
        exact = scores.masked_fill(~reads[:, None, None], -math.inf).softmax(-1).nan_to_num(0.0) @ exact_v[:, :, None]
        rows = routes.mix(_slm_rows(routes, slm, items, a, e, seen, first_real, attention_mask))  # [B, H_m, c, S]
        far = (slots >= first_real + sinks) & (slots <= seen - window)  # [B, c, S]
        rows = (rows * far[:, None]).view(b, g, per, e - a, total)
        borrowed = (rows.to(v.dtype) @ v[:, :, None]).float()  # V in its own dtype: decode reads all of it
        out[:, :, :, a:e] = borrowed + (1 - rows.sum(-1, keepdim=True)) * exact
    return out.view(b, h, t, d).to(v.dtype)


def local_decode(
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
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """One decode step of the local window: the borrowed row times V, as plain IAM decodes, plus one product over
    the near slots (the sinks and the window) that takes their borrowed share away and puts back the exact part
    with their mass: ``out = a V + (m_near * softmax_near(q k^T) - a_near) V_near``. Arguments as for
    ``local_chunked`` (``q`` of one token). Returns ``[B, H_m, 1, d]``."""
    b, h, _, d = q.shape
    g, total = v.shape[1], v.shape[2]
    per, lo = h // g, max(total - window, 0)
    rows = routes.mix(slm.column_rows(routes, attention_mask, torch.float32))  # [B, H_m, S]
    borrowed = rows.view(b, g, per, total).to(v.dtype) @ v  # [B, G, per, d]
    sink_slots = starts[:, None] + torch.arange(sinks, device=v.device)  # [B, sinks]
    window_slots = torch.arange(lo, total, device=v.device)
    reads = torch.cat([sink_slots < total, window_slots >= starts[:, None] + sinks], -1)  # [B, sinks + w]
    near_rows = torch.cat([at_sinks(rows[..., None], starts, sinks)[..., 0], rows[..., lo:]], -1)
    near_v = torch.cat([at_sinks(v, starts, sinks), v[:, :, lo:]], 2).float()
    near_k = torch.cat([sink_k, recent_k[:, :, recent_k.shape[2] - (total - lo) :]], 2).float()
    scores = (q.float().view(b, g, per, d) @ near_k.transpose(-1, -2)) * scaling  # [B, G, per, sinks + w]
    exact = scores.masked_fill(~reads[:, None, None], -math.inf).softmax(-1).nan_to_num(0.0)
    near = (near_rows * reads[:, None]).view(b, g, per, -1)
    out = borrowed.float() + (near.sum(-1, keepdim=True) * exact - near) @ near_v
    return out.view(b, h, 1, d).to(v.dtype)


def _slm_rows(
    routes: Routes,
    slm: SLMStep,
    items: tuple[torch.Tensor, torch.Tensor] | None,
    a: int,
    e: int,
    seen: torch.Tensor,
    first_real: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Borrowed SLM attention probabilities ``[B, H_m * k, e - a, S]`` of the queries ``a:e``, one row per
    column: in decode the SLM layer's shared rows, in prefill per item from ``items`` (queries, keys)."""
    if items is None:
        return slm.column_rows(routes, attention_mask, torch.float32)[:, :, None]
    q, k = items
    slots = torch.arange(k.shape[2], device=k.device)
    scores = (q[:, :, a:e] @ k.transpose(-1, -2)) * slm.scaling  # [B, U, c, S]
    visible = (slots <= seen) & (slots >= first_real)  # [B, c, S]
    probs = scores.masked_fill(~visible[:, None], -math.inf).softmax(-1).nan_to_num(0.0)
    return probs[torch.arange(q.shape[0], device=q.device)[:, None], routes.item_of_column]


def local_sdpa(
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
    kernels: Kernels,
) -> torch.Tensor:
    """The local window's prefill on a CPU, without FlexAttention. Each item's borrowed attention over every visible
    slot runs the fused SDPA kernel, which also returns its log-sum-exp ``L``; the near slots' share of it,
    ``sum_near exp(s_j - L) [v_j, 1]``, computed on the band only (``band``), is taken away, which leaves
    ``sum_far a_j v_j`` and the near mass ``1 - m``. The exact part reads the band too. Arguments as for
    ``local_flex``; ``kernels.chunk_elements`` bounds the band's blocks. Returns ``[B, H_m, t, d]``."""
    b, h, t, d = q.shape
    g, total = v.shape[1], v.shape[2]
    past, first_recent = total - t, total - recent_k.shape[2]
    rows = torch.arange(b, device=v.device)[:, None]
    qi, ki = slm.items(routes, v.dtype)
    ki, vi = ki[:, :, ki.shape[2] - total :], v[rows, routes.item_kv]  # [B, U, S, .]
    borrowed, lse = _sdpa_lse(qi, ki, vi, starts, past, slm.scaling)
    near, mass = band(
        qi[:, :, None],
        at_sinks(ki, starts, sinks),
        at_sinks(vi, starts, sinks),
        ki,
        vi,
        0,
        starts,
        past,
        sinks,
        window,
        slm.scaling,
        kernels,
        lse[:, :, None],
    )
    items = torch.cat([borrowed.float() - near[:, :, 0], mass[:, :, 0, :, None]], -1)  # [B, U, t, d + 1]
    exact, _ = band(
        q.view(b, g, h // g, t, d),
        *(sink_k, at_sinks(v, starts, sinks), recent_k, v[:, :, first_recent:], first_recent),
        *(starts, past, sinks, window, scaling, kernels),
    )
    mixed = routes.from_items(items)
    return (mixed[..., :d] + mixed[..., d:] * exact.view(b, h, t, d)).to(v.dtype)


def _sdpa_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, past: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused CPU attention of ``q`` ``[B, U, t, d_s]`` (at slots ``past ..``) over ``k``, ``v`` ``[B, U, S, .]``, each
    query reading its sequence's real slots up to its own, and the log-sum-exp of its logits ``[B, U, t]`` (float32).
    The kernel needs one head size: q/k or V are zero-padded. Queries that see nothing give zeros."""
    d_s, total, d = q.shape[-1], k.shape[2], v.shape[-1]
    width = max(d_s, d)
    q, k, v = (F.pad(x, (0, width - x.shape[-1])) for x in (q, k, v))
    mask = None
    if past or bool(starts.any()):
        slots = torch.arange(total, device=q.device)
        seen = torch.arange(past, total, device=q.device)[:, None]
        visible = (slots <= seen) & (slots >= starts.view(-1, 1, 1, 1))  # [B, 1, t, S]
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, -math.inf)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
    return out[..., :d], lse


def band(
    q: torch.Tensor,
    sink_k: torch.Tensor,
    sink_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first: int,
    starts: torch.Tensor,
    past: int,
    sinks: int,
    window: int,
    scaling: float,
    kernels: Kernels,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each query to its near slots only: its sequence's sinks up to the query, and the ``window``
    latest slots up to it that are past the sinks. Queries run in blocks of ``window``, each block reading the
    ``2 * window`` slots that end with it (as many blocks at once as ``kernels.chunk_elements`` allows).

    Parameters
    ----------
    q : ``[B, G, P, t, d_q]``: ``P`` queries per KV group, at slots ``past ..``.
    sink_k, sink_v : ``[B, G, sinks, .]`` each sequence's sink keys and values.
    k, v : ``[B, G, T, .]`` keys and values of the slots ``first ..`` (at least the window of every query).
    starts : ``[B]`` each sequence's first real slot.
    scaling : of the logits.
    lse : ``[B, G, P, t]``, or ``None``: the normaliser of the weights ``exp(s - lse)``; ``None``: the softmax over
        the near slots.

    Returns
    -------
    out : ``[B, G, P, t, d_v]`` the weighted sum of the near values, in float32.
    mass : ``[B, G, P, t]`` the near weights' sum with ``lse``, else ``None``.
    """
    b, g, p, t, _ = q.shape
    c = window
    n, base = -(-t // c), past - c  # block j reads the slots base + j c .. base + j c + 2 c - 1
    kb, vb = (_blocks(x, first, base, n, c) for x in (k, v))
    q = F.pad(q, (0, 0, 0, n * c - t))
    if lse is not None:
        lse = F.pad(lse, (0, n * c - t))
    first_real = starts.view(b, 1, 1, 1)
    sink_slots = first_real + torch.arange(sinks, device=q.device)  # [B, 1, 1, sinks]
    step = max(1, kernels.chunk_elements // (b * g * p * c * (sinks + 2 * c)))
    outs, masses = [], []
    for j in range(0, n, step):
        m = min(j + step, n) - j
        seen = torch.arange(past + j * c, past + (j + m) * c, device=q.device).view(m, c, 1)
        slots = base + j * c + torch.arange(m, device=q.device).view(m, 1, 1) * c + torch.arange(2 * c, device=q.device)
        near = torch.cat(  # [B, m, c, sinks + 2 c]
            [
                (sink_slots <= seen).expand(b, m, c, sinks),
                (slots <= seen) & (slots > seen - window) & (slots >= first_real + sinks),
            ],
            -1,
        )
        qj = q[:, :, :, j * c : (j + m) * c].float().view(b, g, p, m, c, -1) * scaling
        logits = torch.cat(
            [qj @ sink_k.float()[:, :, None, None].transpose(-1, -2), qj @ kb[:, :, None, j : j + m].float().transpose(-1, -2)],
            -1,
        )  # [B, G, P, m, c, sinks + 2 c]
        if lse is None:
            weights = logits.masked_fill(~near[:, None, None], -math.inf).softmax(-1).nan_to_num(0.0)
        else:
            normaliser = lse[..., j * c : (j + m) * c].reshape(b, g, p, m, c, 1)
            weights = torch.where(near[:, None, None], (logits - normaliser).exp(), 0.0)
            masses.append(weights.sum(-1).flatten(3))
        out = weights[..., :sinks] @ sink_v.float()[:, :, None, None] + weights[..., sinks:] @ vb[:, :, None, j : j + m].float()
        outs.append(out.flatten(3, 4))
    out = torch.cat(outs, 3)[:, :, :, :t]
    return out, (torch.cat(masses, 3)[..., :t] if masses else None)


def _blocks(x: torch.Tensor, first: int, base: int, n: int, c: int) -> torch.Tensor:
    """``[B, G, n, 2 c, e]`` views of ``x`` ``[B, G, T, e]`` (``x[:, :, i]`` the slot ``first + i``): block ``j``
    holds the slots ``base + j c .. base + j c + 2 c - 1``, zeros where ``x`` has none."""
    lo, need = base - first, (n + 1) * c
    x = x[:, :, lo:] if lo >= 0 else F.pad(x, (0, 0, -lo, 0))
    x = x[:, :, :need] if x.shape[2] >= need else F.pad(x, (0, 0, 0, need - x.shape[2]))
    return x.unfold(2, 2 * c, c).transpose(-1, -2)
