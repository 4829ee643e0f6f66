"""The SLM's part of a forward as mapped layers read it (``SLMStep``), and a layer's head map grouped for the
kernels (``Routes``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mapping import HeadMap, cap


@dataclass(frozen=True)
class Routes:
    """Where a mapped layer reads its attention from, grouped for the kernels; built once per mapping.

    A column is one (mapped LLM head, borrowed SLM head) pair: ``H_m * k`` of them for ``k`` SLM heads mixed per
    LLM head, head-major.

    Parameters
    ----------
    column_layer, column_head : ``[B, H_m * k]`` the SLM layer and head each column reads (decode: one attention row
        per column).
    item_layer, item_head, item_kv : ``[B, U]`` the SLM layer and head, and the KV group (among the mapped ones), of
        each prefill item; rows are padded by repeating the first. An item is a distinct ``(slm_layer, slm_head, kv
        group)`` of a sequence: columns of one KV group borrowing one SLM head compute the same thing, so they share one.
    item_of_column : ``[B, H_m * k]`` the item of each column.
    weight : ``[B, H_m, k]`` the mixing weights of each LLM head's columns.
    """

    column_layer: torch.Tensor
    column_head: torch.Tensor
    item_layer: torch.Tensor
    item_head: torch.Tensor
    item_kv: torch.Tensor
    item_of_column: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def of(cls, hmap: HeadMap, heads_per_kv: int) -> Routes:
        b, h, k = hmap.slm_layer.shape
        slm_layer, slm_head = hmap.slm_layer.reshape(b, h * k), hmap.slm_head.reshape(b, h * k)
        kv = (torch.arange(h, device=slm_layer.device) // heads_per_kv).repeat_interleave(k)
        keys = torch.stack([slm_layer, slm_head, kv.expand(b, -1)], -1)  # [B, H_m * k, 3]
        found = [keys[i].unique(dim=0, return_inverse=True) for i in range(b)]
        width = max(len(u) for u, _ in found)
        items = torch.stack([torch.cat([u, u[:1].expand(width - len(u), 3)]) for u, _ in found])  # [B, U, 3]
        return cls(
            column_layer=slm_layer,
            column_head=slm_head,
            item_layer=items[..., 0],
            item_head=items[..., 1],
            item_kv=items[..., 2],
            item_of_column=torch.stack([inv for _, inv in found]),
            weight=hmap.weight,
        )

    def from_items(self, x: torch.Tensor) -> torch.Tensor:
        """Per LLM head, the weighted sum of its columns' items: ``[B, U, ...]`` -> ``[B, H_m, ...]`` in one batched
        matrix product (no per-column copy of ``x``)."""
        b, h, k = self.weight.shape
        weights = self.weight.new_zeros(b, h, x.shape[1]).scatter_add_(2, self.item_of_column.view(b, h, k), self.weight)
        return (weights.to(x.dtype) @ x.flatten(2)).view(b, h, *x.shape[2:])

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """Per LLM head, the weighted sum of its columns: ``[B, H_m * k, ...]`` -> ``[B, H_m, ...]``."""
        b, h, k = self.weight.shape
        if k == 1:
            return x
        w = self.weight.to(x.dtype).view(b, h, k, *(1,) * (x.dim() - 2))
        return (x.view(b, h, k, *x.shape[2:]) * w).sum(2)


class SLMStep:
    """The SLM's part of one forward: its post-RoPE queries of the new tokens, read against the keys in its cache.

    Parameters
    ----------
    queries : per SLM layer run, ``[B, H_s, t, d_s]``.
    cache_layers : the SLM's cache layers (K read through their ``read_keys``).
    kv_groups : SLM query heads per SLM KV head.
    scaling : the SLM's attention scaling.
    softcap : the soft-cap of the borrowing (LLM) layers' logits, applied to the SLM's (Gemma 2); ``None``: none.
    local : per SLM layer, the sliding window of the LLM layers that borrow from it (local layers borrow from local
        ones only); ``None`` for a global one, or for all.
    """

    def __init__(
        self,
        queries: dict[int, torch.Tensor],
        cache_layers: list,
        kv_groups: int,
        scaling: float,
        softcap: float | None = None,
        local: list[int | None] | None = None,
    ) -> None:
        self.queries, self.cache_layers, self.kv_groups, self.scaling = queries, cache_layers, kv_groups, scaling
        self.softcap, self.local = softcap, local
        self._rows: dict[int, torch.Tensor] = {}
        self.device = next(iter(queries.values())).device
        self._seen_from: dict[torch.device, SLMStep] = {}
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._every_row: torch.Tensor | None = None

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every run layer's queries ``[B, L * H_s, t, d_s]`` and cached keys ``[B, L * H_kv_s, S, d_s]`` in one
        tensor each (layers ``0 .. L - 1``), so that the items of a mapped layer are gathered with one index."""
        if self._stacked is None:
            layers = range(len(self.queries))
            if sorted(self.queries) != list(layers):
                raise RuntimeError(f"the SLM step holds the queries of layers {sorted(self.queries)}, not the first ones.")
            queries, h = torch.cat([self.queries[i] for i in layers], 1), self.queries[0].shape[1]
            self.queries = {i: queries[:, i * h : (i + 1) * h] for i in layers}  # views: the copies are freed
            self._stacked = (queries, torch.cat([self.keys(i) for i in layers], 1))
        return self._stacked

    def item_heads(self, routes: Routes) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, U]`` each: where each prefill item of ``routes`` reads its queries and its keys in ``stack()``."""
        heads, kv_heads = self.queries[0].shape[1], self.stack()[1].shape[1] // len(self.queries)
        layer, head = routes.item_layer.to(self.device), routes.item_head.to(self.device)
        return layer * heads + head, layer * kv_heads + head // self.kv_groups

    def items(self, routes: Routes, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[B, U, t, d_s]`` and keys ``[B, U, S, d_s]`` of each prefill item of ``routes``, in ``dtype``."""
        (q, k), (q_at, k_at) = self.stack(), self.item_heads(routes)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        return q[rows, q_at].to(dtype), k[rows, k_at].to(dtype)

    def keys(self, layer: int, *index: torch.Tensor) -> torch.Tensor:
        """Cached keys of SLM ``layer`` (``[B, H_kv_s, T, d_s]``, or ``keys[index]``) in the model's dtype, on this
        step's device."""
        cached = self.cache_layers[layer]
        return cached.read_keys(*(i.to(cached.keys.device) for i in index)).to(self.device)

    def on(self, device: torch.device) -> SLMStep:
        """This step as read by a mapped layer on ``device`` (an LLM dispatched over several devices): its queries,
        and the keys as they are read, moved there once."""
        if device == self.device:
            return self
        if device not in self._seen_from:
            moved = {i: q.to(device) for i, q in self.queries.items()}
            self._seen_from[device] = SLMStep(moved, self.cache_layers, self.kv_groups, self.scaling, self.softcap, self.local)
        return self._seen_from[device]

    def decode_rows(self, layer: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention probabilities ``[B, H_s, T]`` of SLM ``layer`` for the single new token, computed once a step and
        shared by every LLM head and layer mapped to it (as those layers attend: ``softcap``, ``local``), from the
        global layers' ``attention_mask``."""
        if layer not in self._rows:
            q = self.queries[layer]  # [B, H_s, 1, d_s]
            k = self.keys(layer)  # [B, H_kv_s, T, d_s]
            b, heads = q.shape[:2]
            scores = q.view(b, k.shape[1], heads // k.shape[1], -1).float() @ k.float().transpose(-1, -2)
            scores = cap(scores.view(b, heads, -1) * self.scaling, self.softcap)
            if attention_mask is not None:
                mask = attention_mask[:, :, -1]  # [B, 1, T]
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            window = None if self.local is None else self.local[layer]
            if window is not None:  # the new token (slot T - 1) reads its ``window`` latest slots
                scores[..., : max(scores.shape[-1] - window, 0)] = float("-inf")
            self._rows[layer] = scores.softmax(-1)
        return self._rows[layer]

    def column_rows(self, routes: Routes, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The new token's borrowed attention row of each column of ``routes``, ``[B, H_m * k, T]`` in ``dtype``: one
        gather from the rows of every SLM layer run, computed once a step for all mapped layers."""
        heads = self.queries[0].shape[1]
        if self._every_row is None:
            layers = range(len(self.queries))
            self._every_row = torch.cat([self.decode_rows(i, attention_mask) for i in layers], 1)
            self._rows = {i: self._every_row[:, i * heads : (i + 1) * heads] for i in layers}  # views: the copies are freed
        rows = self._every_row
        flat = routes.column_layer.to(rows.device) * heads + routes.column_head.to(rows.device)
        return rows[torch.arange(rows.shape[0], device=rows.device)[:, None], flat].to(dtype)
