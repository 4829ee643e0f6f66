"""The kept set of an evicting cache (``Kept``): which slots each sequence holds, their positions and scores, and
how a policy's priority chooses the slots to keep, shared by every layer or, for ``KVzip``, per KV group with one
width per layer won in one ranking over the layers (``_allocate``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .eviction import EvictionPolicy, protect_slots


@dataclass
class Kept:
    """Which tokens a cache holds, per sequence, once a policy evicts: one slot per cached position of every layer,
    except in the layers of ``own``.

    Parameters
    ----------
    valid : ``[B, S]`` slots holding a real token (not padding, not compacted away).
    positions : ``[B, S]`` each slot's true position.
    scores : ``[B, S]`` attention mass each slot has received (accumulated for H2O, the last forward's otherwise).
    seen : ``[B]`` real tokens each sequence has had so far (kept or not).
    own : per LLM layer whose KV groups keep slots of their own (``KVzip``), its ``[B, S_l]`` valid slots.
    """

    valid: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    seen: torch.Tensor
    own: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> Kept:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(none.bool(), none, none.float(), torch.zeros(batch, dtype=torch.long, device=device))

    def append(self, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """``t`` new slots (``mask`` ``[B, t]``, 0/1), in every layer."""
        self.valid = torch.cat([self.valid, mask.bool()], -1)
        self.positions = torch.cat([self.positions, positions], -1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(mask.shape)], -1)
        self.seen = self.seen + mask.sum(-1)
        self.own = {i: torch.cat([v, mask.bool().to(v.device)], -1) for i, v in self.own.items()}

    def rows(self, index: torch.Tensor) -> Kept:
        """The bookkeeping of the sequences ``index`` (beam search's reorder and select)."""
        return Kept(
            self.valid[index],
            self.positions[index],
            self.scores[index],
            self.seen[index],
            {i: v[index] for i, v in self.own.items()},
        )

    def select(
        self, policy: EvictionPolicy, protect: tuple[int, int] | None = None, rows: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        """The slots to keep, in time order, front-padded (the pad slots become invalid); ``None`` where nothing need
        go. Updates the bookkeeping to the kept slots.

        Parameters
        ----------
        policy : what decides the kept count and the priority (by ``self.scores``).
        protect : ``(sinks, window)``: each sequence's first ``sinks`` kept tokens and latest ``window`` ones are
            always kept (the exact local window's), on top of those the policy itself always keeps.
        rows : (``KVzip``) per LLM layer whose KV groups each choose their own slots by the policy's priority, their
            ``[B, KV heads, S]`` scores. All groups of a layer keep as many slots per sequence: the shared set's count in
            every layer (``KVzip.layerwise``), or, by default, as many as the layer's best group wins in one ranking
            of every layer's slots (so the layers keep the shared set's count on average).

        Returns
        -------
        ``(index, own)``: ``[B, S']`` slot indices of the shared set and, per layer of ``rows``, ``[B, KV heads,
        S_l]`` of each group; a shorter sequence's padding comes first.
        """
        n_real = self.valid.sum(-1)
        keep = policy.kept(self.seen)
        if protect is not None:
            keep = torch.maximum(keep, self.seen.clamp(max=policy.reserved + sum(protect)))
        keep = keep.clamp(max=n_real)
        if bool((keep >= n_real).all()):
            return None
        age = (self.seen[:, None] - 1 - self.positions).masked_fill(~self.valid, -1)

        def priority(scores: torch.Tensor) -> torch.Tensor:  # [B, ..., S] scores -> the policy's keep priority
            valid = self.valid.view(*self.valid.shape[:1], *[1] * (scores.dim() - 2), -1)
            old = age.view_as(valid)
            p = policy.priority(scores, valid, old)
            if protect is not None:
                first = old.amax(-1, keepdim=True)  # the oldest kept token's age: the sinks are always the oldest
                p = protect_slots(p, (old < protect[1]) | (old > first - protect[0]))
            return p.masked_fill(~valid, -math.inf)

        own: dict[int, torch.Tensor] = {}
        if rows:
            p = priority(torch.stack([r.to(self.scores.device) for r in rows.values()], 1))  # [B, L, KV heads, S]
            counts = keep[:, None].expand(p.shape[:2]) if policy.layerwise else _allocate(p, keep)
            for layer, row, count in zip(rows, p.unbind(1), counts.unbind(1)):
                kept = _best(row, count[:, None].expand(row.shape[:2]))
                own[layer] = kept.clamp(min=0)
                self.own[layer] = kept[:, 0] >= 0
        index = _best(priority(self.scores), keep)
        pad, index = index < 0, index.clamp(min=0)
        self.valid = self.valid.gather(-1, index) & ~pad
        self.positions, self.scores = self.positions.gather(-1, index), self.scores.gather(-1, index)
        return index, own


def _best(priority: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[..., width]`` the ``keep`` (``[...]``) slots of highest ``priority`` (``[..., S]``) in time order, front-padded
    with -1 to the largest count. Exact ties go to the newer slot, so a sequence keeps the same tokens in any batch."""
    width, s = int(keep.max()), priority.shape[-1]
    order = s - 1 - priority.flip(-1).argsort(dim=-1, descending=True, stable=True)[..., :width]
    chosen = torch.arange(width, device=order.device) < keep[..., None]
    return order.masked_fill(~chosen, -1).sort(-1).values


def _allocate(priority: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` slots each layer keeps per sequence when its KV groups share the layer's width: the layer's ``r``-th
    slot is worth its best group's ``r``-th highest priority, and each sequence keeps its ``keep * L`` most worthy
    slots over all ``L`` layers of ``priority`` (``[B, L, KV heads, S]``; ``keep``: ``[B]``). KVzip ranks every head's
    pairs against one threshold; sharing a layer's width keeps its slots one tensor under one mask, and a group that
    ranks fewer fills the width with its next best."""
    worth = priority.sort(-1, descending=True).values.amax(2)  # [B, L, S], non-increasing along S
    b, layers, s = worth.shape
    order = worth.flatten(1).argsort(dim=-1, descending=True, stable=True)
    take = torch.arange(layers * s, device=worth.device) < (keep * layers)[:, None]
    chosen = torch.zeros_like(take).scatter(1, order, take)
    return chosen.view(b, layers, s).sum(-1)
