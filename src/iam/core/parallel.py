"""Tensor parallelism as transformers applies it (``from_pretrained(..., tp_plan="auto")``): each rank's attention
modules hold a slice of the heads, their ``q_proj``/``k_proj``/``v_proj`` weights are DTensors sharded by output rows
and return the rank's heads as plain local tensors, and ``o_proj`` (sharded by input columns) all-reduces.

Mapped layers call only these modules, never their raw weights, so the all-reduce and the sharding run as in the
model's own forward. What IAM adds on top is here: which KV groups a rank holds, and the two collectives a mapped
run needs beyond the model's own (the establishing window's Q/K of every head, so that every rank matches all heads
alike and keeps one global ``Mapping``; and the sum over heads of the eviction scores). The SLM is never sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .mapping import HeadMap


@dataclass(frozen=True)
class HeadShard:
    """The rank's part of a tensor-parallel attention module: KV groups ``[rank * n / size, (rank + 1) * n / size)``
    of ``n`` (and their query heads).

    Parameters
    ----------
    mesh : the tensor-parallel device mesh (1-D).
    rank, size : this rank's index in it, and its size.
    """

    mesh: object
    rank: int
    size: int

    def groups(self, n_kv: int) -> range:
        """The global indices of the KV groups this rank holds, of ``n_kv``."""
        per = n_kv // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` (its heads' part along ``dim``) concatenated in rank order: the whole tensor, on every rank."""
        return DTensor.from_local(x, self.mesh, [Shard(dim % x.dim())], run_check=False).full_tensor()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x`` (a sum over the rank's heads), on every rank."""
        return DTensor.from_local(x, self.mesh, [Partial()], run_check=False).redistribute(placements=[Replicate()]).to_local()


def shard_of(attn: nn.Module) -> HeadShard | None:
    """The ``HeadShard`` of an attention module whose ``q_proj`` (or fused ``qkv_proj``) transformers sharded by rows;
    ``None`` if it is whole."""
    weight = getattr(attn, "q_proj", None) or attn.qkv_proj
    weight = weight.weight
    if not isinstance(weight, DTensor) or not any(isinstance(p, Shard) for p in weight.placements):
        return None
    mesh = weight.device_mesh
    return HeadShard(mesh, mesh.get_local_rank(), mesh.size())


def rank_map(hmap: HeadMap, positions: torch.Tensor, device: torch.device) -> HeadMap:
    """The part of a layer's (global) ``HeadMap`` at ``positions`` of its mapped heads (the rank's own; all of them
    without tensor parallelism), on ``device`` (the layer's)."""
    per_head = {
        n: getattr(hmap, n)[:, positions.to(hmap.slm_layer.device)].to(device)
        for n in ("slm_layer", "slm_head", "weight", "score")
    }
    return replace(hmap, heads=hmap.heads[positions.to(hmap.heads.device)].to(device), **per_head)


def gather_heads(x: torch.Tensor, attn: nn.Module, dim: int = 1) -> torch.Tensor:
    """``x`` of the rank's heads (along ``dim``) completed with every other rank's, where ``attn`` is sharded."""
    shard = shard_of(attn)
    return x if shard is None else shard.gather(x, dim)


def sum_heads(x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """``x``, a sum over the rank's heads, summed over every rank's, where ``attn`` is sharded."""
    shard = shard_of(attn)
    return x if shard is None or not isinstance(x, torch.Tensor) else shard.sum(x)
