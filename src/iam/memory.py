"""Memory measurement: the process or CUDA allocator peak, and an exact live-tensor peak on any device."""

from __future__ import annotations

import os
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, sampled process RSS growth on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def _rss(self) -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start, self.peak, self._stop = self._rss(), self._rss(), threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.start


class TensorPeak(TorchDispatchMode):
    """Exact peak of the bytes held by tensors created inside the block, and the largest single one.

    Every ATen op's outputs are recorded by storage (views count once) and released when their storage is freed,
    like ``torch.cuda.max_memory_allocated`` but device-independent and blind to allocator caching. Tensors that
    existed before the block (weights, inputs) are not counted. Composite ops such as a math-kernel SDPA are seen
    decomposed, so a ``T x T`` intermediate shows up in ``largest``. Compiled code cannot run under it, so mapped
    prefill takes its SDPA path here instead of FlexAttention.

    Returns (as attributes after the block)
    -------
    peak : most bytes live at once.
    largest : bytes of the largest single storage created.
    """

    def __enter__(self) -> TensorPeak:
        self._live: dict[StorageWeakRef, int] = {}
        self.current = self.peak = self.largest = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self._live if r.expired()]:
            self.current -= self._live.pop(ref)
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op: no new storage
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref not in self._live:
                    self._live[ref] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out
