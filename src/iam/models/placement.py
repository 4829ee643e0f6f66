"""Where a pair's weights go when the LLM does not fit one device: transformers' tensor parallelism (``tp_plan``,
``distributed_config``; run under ``torchrun``) or accelerate's big-model dispatch (``device_map``, ``max_memory``,
``offload_folder``). Both are passed through to ``from_pretrained`` for the LLM only; the SLM is loaded whole, on each
rank's device under tensor parallelism, else on ``slm_device`` (default: the device the LLM's first layer runs on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` if torch does not know it or it is not available here."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or another torch device type.") from None
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (torch.{dev.type}.is_available() is False): use cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices.")
    return dev


DISPATCH_RULES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's ways to spread a model (a ``device_map`` given by name); any other name is one device."""


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
        named = [("max_memory", d) for d in self.max_memory or {}] + [("slm_device", self.slm_device)] * bool(self.slm_device)
        if isinstance(self.device_map, dict):
            named += [("device_map", d) for d in self.device_map.values()]
        elif self.device_map not in (None, *DISPATCH_RULES):
            named.append(("device_map", self.device_map))
        for name, d in named:
            if d not in ("cpu", "disk"):
                try:
                    check_device(f"cuda:{d}" if isinstance(d, int) else d)
                except ValueError as err:
                    raise ValueError(f"`{name}` names {d!r}: {err}") from None
        if self.offload_folder is not None and Path(self.offload_folder).is_file():
            raise ValueError(f"`offload_folder` {str(self.offload_folder)!r} is a file: give a folder (made if missing).")
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


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` runs on: accelerate's execution device where it is dispatched (its weights may wait on
    the CPU or on disk, ``meta`` in place), else its first parameter's; the CPU for weights on ``meta``."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None:
        device = next(module.parameters()).device
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu") if device.type == "meta" else device


def input_device(model: nn.Module) -> torch.device:
    """Where a (possibly dispatched) causal LM takes its token ids: its embedding's execution device. Its
    ``.device`` is its first parameter's, ``meta`` where that sits on disk."""
    return execution_device(model.get_input_embeddings())
