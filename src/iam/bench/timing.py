"""Timing helpers: interleaved rounds of synchronised wall clocks, and what a timing depends on beyond the code
(``generate()``'s own timer is ``iam.eval.timer``)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from ..eval.timer import synchronize
from ..reporting import machine
from .memory import cpu_memory_measure, malloc_in_use


def timed(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds, after one warm-up round. A round calls every
    function once, in turn, so the machine's slow drifts hit all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, samples in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def timing_environment() -> dict:
    """What a timing depends on beyond the code: torch version, threads, and the allocator settings.

    On Linux CPUs glibc's malloc serves large tensors with fresh ``mmap`` pages and returns them on free, so every
    forward faults its activations in again (about a million page faults, seconds of system time, per 4 x 256
    prefill of the 1.5B model), and how many depends on the run's history. ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<large>`` (or jemalloc/tcmalloc through ``LD_PRELOAD``) keeps freed memory in the
    process; the settings in force are recorded with every measured result, with what CPU peak memory samples."""
    allocator = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": allocator,
        "cpu_peak_memory": cpu_memory_measure(),
    }


def stamped(rows: list[dict]) -> list[dict]:
    """Timed ``rows``, each with the machine it ran on (``reporting.machine``: CPU, its bfloat16 path, threads, GPU):
    absolute times, and rows of different runs, compare only on one machine."""
    on = machine()
    return [{**row, **on} for row in rows]


STEADY_MALLOC = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000"
"""glibc malloc settings that keep freed memory in the process (``make bench`` runs with them)."""


def allocator_note(device: torch.device) -> str | None:
    """A hint to print before CPU timings taken under glibc malloc's defaults (see ``timing_environment``)."""
    if device.type != "cpu" or malloc_in_use() is None or os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return None
    return (
        "note: glibc malloc hands freed memory back to the OS here, and CPU timings then include faulting it in again "
        f"on every forward; for steady timings run with {STEADY_MALLOC} (as `make bench` does)."
    )
