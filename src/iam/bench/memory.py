"""Memory measurement: the malloc, process or CUDA allocator peak, and an exact live-tensor peak on any device."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


@functools.cache
def malloc_in_use() -> Callable[[], int] | None:
    """A reader of the bytes glibc's malloc has handed out and not taken back (``mallinfo2``: chunks in use plus
    mmapped ones), or ``None`` where malloc is not glibc's (another libc or OS, or an allocator put in with
    ``LD_PRELOAD``). Unlike RSS it does not depend on whether freed memory went back to the OS."""
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2

    def read() -> int:
        m = info()
        return m.uordblks + m.hblkhd

    return read


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_memory_measure() -> str:
    """What ``PeakMemory`` samples on the CPU here."""
    return "malloc in use (glibc mallinfo2)" if malloc_in_use() else "process RSS"


class PeakMemory:
    """Peak memory of a block, over what was in use when it began: the CUDA allocator's peak on a GPU; on the CPU
    the sampled peak of the bytes malloc has in use (glibc; see ``malloc_in_use``), else of process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self._read = malloc_in_use() or rss
        self.start = self.peak = self._read()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._read())

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
            self.peak = max(self.peak, self._read())
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
