"""Where a pair's weights go when the LLM does not fit one device: transformers' tensor parallelism (``tp_plan``,
``distributed_config``; run under ``torchrun``) or accelerate's big-model dispatch (``device_map``, ``max_memory``,
``offload_folder``). Both are passed through to ``from_pretrained`` for the LLM only; the SLM is loaded whole, on each
rank's device under tensor parallelism, else on ``slm_device`` (default: the device of the LLM's first layer).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class Placement:
    """How the LLM is spread over devices (all ``None``: on one device, as ``device`` says).

    Parameters
    ----------
    tp_plan : transformers' tensor-parallel plan (``"auto"``: the model's own), sharding the LLM's heads over the
        ``torchrun`` processes.
    distributed_config : transformers' ``DistributedConfig`` (its ``tp_size``), instead of or with ``tp_plan``.
    device_map : accelerate's device map (``"auto"``, ``"balanced"``, ... or a dict of module name to device,
        ``"cpu"`` or ``"disk"``).
    max_memory : per device, the most memory the LLM's weights may take there (``{0: "70GiB", "cpu": "200GiB"}``).
    offload_folder : where weights mapped to ``"disk"`` are kept.
    slm_device : the SLM's device under ``device_map`` (default: the LLM's first layer's).
    """

    tp_plan: str | dict | None = None
    distributed_config: Any = None
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | os.PathLike | None = None
    slm_device: str | torch.device | None = None

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_plan is not None or self.distributed_config is not None

    @property
    def placed(self) -> bool:
        """Whether anything differs from one device."""
        return self.tensor_parallel or self.device_map is not None

    def tp_size(self) -> int:
        """Processes the LLM's heads are sharded over: the config's ``tp_size``, else torchrun's ``WORLD_SIZE``."""
        size = getattr(self.distributed_config, "tp_size", None)
        return int(size) if size else int(os.environ.get("WORLD_SIZE", "1"))

    def check(self, llm: PretrainedConfig, device: str | torch.device = "cpu") -> None:
        """Raise ``ValueError`` (before any weights load) for what cannot work with the LLM ``llm``."""
        if self.tensor_parallel and self.device_map is not None:
            raise ValueError(
                "tp_plan (tensor parallelism) and device_map (accelerate dispatch) cannot be combined: "
                "choose one way to spread the LLM."
            )
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder apply to a device_map: give device_map='auto' (or a dict) too.")
        if self.slm_device is not None and self.device_map is None:
            raise ValueError("slm_device applies to a device_map; without one both models go on `device`.")
        if self.placed and str(device) != "cpu":
            raise ValueError(
                f"device={str(device)!r} places both models on one device; with tp_plan or device_map leave it out "
                "(use slm_device for the SLM under device_map)."
            )
        if self.tensor_parallel:
            if "WORLD_SIZE" not in os.environ:
                raise ValueError("tensor parallelism runs one process per device: launch with `torchrun --nproc-per-node N ...`.")
            size = self.tp_size()
            heads, kv = llm.num_attention_heads, llm.num_key_value_heads
            if heads % size or kv % size:
                raise ValueError(
                    f"tensor-parallel size {size} must divide the LLM's {heads} attention heads and {kv} KV heads: "
                    f"use one of {[n for n in range(1, kv + 1) if kv % n == 0 and heads % n == 0]} processes."
                )

    def llm_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` arguments for the LLM."""
        names = ("tp_plan", "distributed_config", "device_map", "max_memory", "offload_folder")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def first_layer_device(model: nn.Module) -> torch.device:
    """The device the first decoder layer of ``model`` runs on (accelerate's execution device where dispatched; the
    CPU for a layer offloaded to disk)."""
    layer = model.model.layers[0]
    hook = getattr(layer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        device = next(layer.parameters()).device
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu") if device.type == "meta" else device
