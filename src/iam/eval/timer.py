"""Wall clocks of ``generate()``: a streamer that times the call, synchronised with the device."""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GenerationTimer(BaseStreamer):
    """A ``generate(streamer=...)`` that times the call: TTFT from ``start()`` to the first new token, TPOT over the
    steps after it. ``generate`` hands the streamer the prompt first, then every step's tokens, then ``end()``.

    Parameters
    ----------
    device : where the model runs (readings wait for its queued work).
    then : another streamer that receives everything after the reading (e.g. a ``TextStreamer``).

    Returns (as attributes, after the call)
    -------
    ttft_s, tpot_s, total_s, new_tokens.
    """

    def __init__(self, device: torch.device, then: BaseStreamer | None = None) -> None:
        self.device, self.then = device, then
        self.marks: list[float] = []

    def start(self) -> GenerationTimer:
        self.marks = [time.perf_counter()]
        return self

    def put(self, value: torch.Tensor) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())
        if self.then is not None:
            self.then.put(value)

    def end(self) -> None:
        if self.then is not None:
            self.then.end()
        start, _prompt, first, *rest = self.marks
        self.new_tokens = 1 + len(rest)
        self.ttft_s = first - start
        self.total_s = (rest[-1] if rest else first) - start
        self.tpot_s = (rest[-1] - first) / len(rest) if rest else 0.0

    @property
    def timings(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "total_s": self.total_s, "new_tokens": self.new_tokens}
