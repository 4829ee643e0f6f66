"""The kernels of mapped attention, chosen by a value: ``Kernels``, fixed once per model
(``IAMForCausalLM(..., kernels=Kernels(...))``) and handed to each ``MappedAttention``, whose ``Kernels.flex``
decides where FlexAttention runs. ``flex``: the compiled FlexAttention kernel; ``prefill``: plain mapped prefill
(FlexAttention, padded SDPA, soft-capped); ``local``: the exact local window (FlexAttention, SDPA with its
log-sum-exp and the band, the band in decode, chunked)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .flex import flex_ready, flex_serves


@dataclass(frozen=True)
class Kernels:
    """Which kernels a model's mapped layers run. Every choice computes the same attention up to rounding: the
    tests hold FlexAttention to the padded SDPA and chunked references.

    Parameters
    ----------
    flex_from : prefill length (new tokens) from which mapped attention runs FlexAttention on ``flex_devices``;
        ``None``: never. Below one flex block of 128 tokens FlexAttention compiles a second kernel, for an attention
        cost that is negligible there (how the default was chosen: docs/results.md).
    flex_devices : device types (``torch.device.type``) where mapped prefill, plain or with the local window, runs
        FlexAttention. On a CPU the fused SDPA kernel, with the SLM's q/k zero-padded to the LLM's head size, ran as
        fast or faster through the whole model (docs/results.md), and it returns the log-sum-exp that the local
        window needs.
    window_reference : the local window runs its chunked reference (``local.local_chunked``) wherever FlexAttention
        does not, instead of fused SDPA and the band on a CPU (``local.local_sdpa``) and the band in decode
        (``local.local_decode``): what the tests and the projection bench compare those kernels to.
    chunk_elements : elements of the largest probability block ``[B, columns, chunk, S]`` that one query chunk of
        the chunked local window, or of soft-capped attention (Gemma 2), holds.
    min_chunk : fewest queries per chunk of the chunked local window, however long the context (bounds the loop).
    """

    flex_from: int | None = 256
    flex_devices: tuple[str, ...] = ("cuda",)
    window_reference: bool = False
    chunk_elements: int = 1 << 23
    min_chunk: int = 16

    def __post_init__(self) -> None:
        if self.flex_from is not None and not _positive(self.flex_from):
            raise ConfigError(
                "flex_from", f"{{param}} must be None (never FlexAttention) or an integer >= 1 (tokens), got {self.flex_from!r}."
            )
        devices = (self.flex_devices,) if isinstance(self.flex_devices, str) else self.flex_devices
        if not isinstance(devices, (tuple, list)) or not all(isinstance(d, str) for d in devices):
            raise ConfigError(
                "flex_devices", f"{{param}} must be a tuple of device types such as ('cuda',), got {self.flex_devices!r}."
            )
        object.__setattr__(self, "flex_devices", tuple(devices))
        if not isinstance(self.window_reference, bool):
            raise ConfigError("window_reference", f"{{param}} must be True or False, got {self.window_reference!r}.")
        for name in ("chunk_elements", "min_chunk"):
            if not _positive(getattr(self, name)):
                raise ConfigError(name, f"{{param}} must be an integer >= 1, got {getattr(self, name)!r}.")

    def flex(self, tokens: int, qk_dim: int, v: torch.Tensor, *inputs: torch.Tensor) -> bool:
        """Whether a prefill of ``tokens`` new tokens, with q/k of size ``qk_dim`` and the mapped groups' ``v``, runs
        FlexAttention: from ``flex_from`` on, on ``flex_devices``, where it runs on ``v`` and ``inputs``
        (``flex_serves``) and compiles (``flex_ready``)."""
        if self.flex_from is None or tokens < self.flex_from or v.device.type not in self.flex_devices:
            return False
        return flex_serves(*inputs, v) and flex_ready(v.device, v.dtype, qk_dim, v.shape[-1], self.flex_from)

    def chunk(self, queries: int, elements_per_query: int, least: int = 1) -> int:
        """Queries per chunk of a chunked kernel over ``queries`` queries, each holding ``elements_per_query``
        probabilities: as many as ``chunk_elements`` allows, at least ``least``, at most ``queries``."""
        return min(queries, max(least, self.chunk_elements // elements_per_query))

    def summary(self) -> dict:
        """The options as plain JSON values (bench rows, ``Mapping.summary``)."""
        return {**asdict(self), "flex_devices": list(self.flex_devices)}


def _positive(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
