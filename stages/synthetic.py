"""Synthetic sources for demos, tests and benchmarks."""

from __future__ import annotations

import time

import numpy as np

from arroyo.message import Event, Start, Stop
from arroyo.stage import Listener

POOL_SIZE = 8


class DetectorSimulator(Listener):
    """Emits ``runs`` runs of Start, ``frames`` Events carrying a frame, Stop.

    Frames come from a small pre-made pool, so generating them costs nothing
    measurable. ``rate_hz = 0`` sends as fast as the link takes them.
    """

    def __init__(
        self,
        frames: int,
        shape: tuple[int, ...],
        runs: int = 1,
        dtype: str = "uint16",
        rate_hz: float = 0.0,
        seed: int = 0,
    ) -> None:
        if frames < 0 or runs < 0:
            msg = "frames and runs must be >= 0"
            raise ValueError(msg)
        self.frames = frames
        self.runs = runs
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.rate_hz = rate_hz
        rng = np.random.default_rng(seed)
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        high = min(info.max, 4000) if info else 1.0
        self.pool = [(rng.random(self.shape) * high).astype(self.dtype) for _ in range(POOL_SIZE)]

    def start(self) -> None:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        next_at = time.monotonic()
        for run in range(self.runs):
            if self.stopping:
                return
            self.deliver(
                Start(data={"frames": self.frames, "shape": list(self.shape), "index": run})
            )
            for i in range(self.frames):
                if self.stopping:
                    return
                if period:
                    next_at += period
                    delay = next_at - time.monotonic()
                    if delay > 0 and self.stop_requested.wait(delay):
                        return
                frame = self.pool[i % POOL_SIZE]
                self.deliver(Event(metadata={"frame": i, "pool": i % POOL_SIZE}, payload=frame))
            self.deliver(Stop(data={"frames": self.frames}))
