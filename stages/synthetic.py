"""Synthetic sources for demos, tests and benchmarks."""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np

from arroyo.convert import Bounds
from arroyo.message import Event, Start, Stop
from arroyo.stage import Listener

POOL_SIZE = 8

# Expected counts (before Poisson noise and the dark offset) of the pattern's parts.
_BACKGROUND = 20.0  # flat floor, reached far from the centre
_SCATTER = 200.0  # extra diffuse scattering at the centre, falling off with radius
_RING = 600.0  # height of the innermost ring; outer rings are weaker
_PEAK = (1000.0, 3000.0)  # range of a Bragg peak's height
_PEAK_SIGMA = 1.5  # pixels
_FLICKER = 0.05  # relative frame-to-frame beam intensity variation


class DetectorSimulator(Listener):
    """Emits ``runs`` runs of Start, ``frames`` Events carrying a frame, Stop.

    Contract:

    - Each frame looks like an area detector image of a powder sample: a ``dark``
      offset, a diffuse background falling off from ``center``, ``rings`` concentric
      Debye-Scherrer rings (2-D shapes only), ``peaks`` sharp Gaussian spots at random
      places, all with Poisson counting noise; values are clipped to ``dtype``'s range.
      1-D frames get background and peaks; frames of more than 2 dimensions get the
      2-D pattern in each slice of their last two axes.
    - ``center`` is ``(row, column)`` in pixels; by default the middle of the frame,
      ``((rows - 1) / 2, (columns - 1) / 2)``.
    - The frames are made once, in ``__init__``, into ``pool`` (``POOL_SIZE`` arrays,
      reproducible from ``seed``); event ``i`` of a run carries ``pool[i % POOL_SIZE]``
      (the same read-only array object every time), so generating frames costs nothing
      in the send loop. Event metadata: ``frame`` (``i``) and ``pool`` (the pool index).
    - ``Start.data``: ``frames``, ``shape``, ``index`` (0-based run number), ``dtype``,
      ``dark``, ``center``. ``Stop.data``: ``frames``.
    - ``rate_hz = 0`` sends as fast as the link takes them; otherwise events are paced
      at that rate. ``stop()`` makes ``start()`` return before the next event.
    """

    def __init__(
        self,
        frames: int,
        shape: tuple[int, ...],
        runs: int = 1,
        dtype: str = "uint16",
        rate_hz: Annotated[float, Bounds(ge=0)] = 0.0,
        seed: int = 0,
        dark: float = 100.0,
        rings: int = 3,
        peaks: int = 5,
        center: tuple[float, float] | None = None,
    ) -> None:
        if frames < 0 or runs < 0:
            msg = "frames and runs must be >= 0"
            raise ValueError(msg)
        if rings < 0 or peaks < 0:
            msg = f"rings and peaks must be >= 0, got rings={rings}, peaks={peaks}"
            raise ValueError(msg)
        if any(n < 0 for n in shape):
            msg = f"shape must not have negative sizes, got {tuple(shape)}"
            raise ValueError(msg)
        self.frames = frames
        self.runs = runs
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.rate_hz = rate_hz
        self.dark = float(dark)
        self.rings = rings
        self.peaks = peaks
        self.center = _default_center(self.shape) if center is None else tuple(center)
        rng = np.random.default_rng(seed)
        self.pool = make_pool(self.shape, self.dtype, rng, self.dark, rings, peaks, self.center)

    def start(self) -> None:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        next_at = time.monotonic()
        for run in range(self.runs):
            if self.stopping:
                return
            self.deliver(Start(data=self._start_data(run)))
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

    def _start_data(self, run: int) -> dict:
        return {
            "frames": self.frames,
            "shape": list(self.shape),
            "index": run,
            "dtype": self.dtype.str,
            "dark": self.dark,
            "center": [float(c) for c in self.center],
        }


def _default_center(shape: tuple[int, ...]) -> tuple[float, float]:
    rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1] if shape else 1)
    return ((rows - 1) / 2, (cols - 1) / 2)


def make_pool(
    shape: tuple[int, ...],
    dtype: np.dtype,
    rng: np.random.Generator,
    dark: float,
    rings: int,
    peaks: int,
    center: tuple[float, ...],
) -> list[np.ndarray]:
    """``POOL_SIZE`` noisy read-only frames of the simulated pattern (see DetectorSimulator)."""
    base = np.broadcast_to(_smooth_pattern(shape, rings, center), shape)
    pool = []
    for _ in range(POOL_SIZE):
        expected = base * max(0.0, 1.0 + _FLICKER * rng.standard_normal())  # a new array
        _add_peaks(expected, peaks, rng)
        counts = np.asarray(rng.poisson(expected), dtype=np.float64)
        counts += dark
        frame = _to_dtype(counts, dtype)
        frame.setflags(write=False)  # shared by every event that carries it
        pool.append(frame)
    return pool


def _smooth_pattern(shape: tuple[int, ...], rings: int, center: tuple[float, ...]) -> np.ndarray:
    """Expected counts without peaks: background plus, for 2-D and more, the rings."""
    if len(shape) < 2:
        return np.full(shape, _BACKGROUND)
    rows, cols = shape[-2:]
    y = np.arange(rows, dtype=np.float64)[:, None] - center[0]
    x = np.arange(cols, dtype=np.float64)[None, :] - center[1]
    r = np.hypot(y, x)
    r_max = max(min(rows, cols) / 2, 1.0)
    pattern = _BACKGROUND + _SCATTER / (1.0 + (r / (0.1 * r_max)) ** 2)
    width = max(1.0, r_max / (8 * (rings + 1)))
    for k in range(1, rings + 1):
        radius = r_max * k / (rings + 1)
        height = _RING / np.sqrt(k)
        pattern += height * np.exp(-0.5 * ((r - radius) / width) ** 2)
    return pattern


def _add_peaks(expected: np.ndarray, peaks: int, rng: np.random.Generator) -> None:
    """Adds ``peaks`` Gaussian spots in place, each over a small window of the last axes."""
    if expected.size == 0 or expected.ndim == 0:
        return
    spatial = min(expected.ndim, 2)
    half = int(np.ceil(4 * _PEAK_SIGMA))
    for _ in range(peaks):
        where = tuple(int(rng.integers(0, n)) for n in expected.shape)
        height = rng.uniform(*_PEAK)
        lead, pos = where[: expected.ndim - spatial], where[expected.ndim - spatial :]
        box: tuple[Any, ...] = tuple(
            slice(max(0, p - half), min(n, p + half + 1))
            for p, n in zip(pos, expected.shape[-spatial:], strict=True)
        )
        grids = np.ogrid[box]
        dist2 = sum((g - p) ** 2 for g, p in zip(grids, pos, strict=True))
        expected[(*lead, *box)] += height * np.exp(-0.5 * dist2 / _PEAK_SIGMA**2)


def _to_dtype(counts: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        np.clip(np.rint(counts, out=counts), info.min, info.max, out=counts)
    return counts.astype(dtype)
