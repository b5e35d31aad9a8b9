"""The frames of the simulated DCU (``arroyo.io.simulate``): a powder pattern as an
area detector sees it.

Each frame holds Debye-Scherrer rings around a beam centre that is off the middle of
the sensor, a diffuse background, Poisson counting noise, a few hot pixels, and the
gaps between the detector's modules (a horizontal and a vertical band) filled with
the NODATA value (the dtype's largest), as a DECTRIS detector writes masked pixels
when its pixel mask is enabled. The pixel mask of the Start marks the gaps (bit 0)
and the hot pixels (bit 3, over-responding).

Everything here follows from ``(shape, dtype, channels, seed)``: a test rebuilds the
frames the simulator sent with ``synthesize`` and compares them with what arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POOL = 4  # distinct frames a series cycles through (image i carries pool[i % POOL])
HOT_PIXELS = 5
HOT_COUNTS = 8  # a hot pixel counts this many times the brightest ring
MASK_GAP, MASK_HOT = 1, 8  # DECTRIS pixel-mask bits: 0 gap, 3 over-responding
# Expected counts at the brightest ring per dtype: a uint8 detector counts little. A
# photon-counting frame is mostly zeros and ones away from the rings, which is why
# bslz4 shrinks it several times.
_PEAK_COUNTS = {1: 40.0, 2: 200.0, 4: 400.0}


@dataclass(frozen=True)
class Geometry:
    """Where the pattern lies on a sensor of ``shape`` (rows, columns)."""

    shape: tuple[int, int]

    @property
    def beam_center(self) -> tuple[float, float]:
        """(x, y) = (column, row) of the direct beam, in pixels, as SIMPLON gives it."""
        rows, cols = self.shape
        return (round(cols * 0.47, 2), round(rows * 0.53, 2))

    def gap_rows(self) -> slice:
        rows = self.shape[0]
        half = max(1, rows // 64)
        return slice(rows // 2 - half, rows // 2 + half) if rows >= 8 else slice(0, 0)

    def gap_cols(self) -> slice:
        cols = self.shape[1]
        half = max(1, cols // 128)
        return slice(cols // 3 - half, cols // 3 + half) if cols >= 8 else slice(0, 0)


def nodata(dtype: np.dtype) -> int:
    """The value a DECTRIS detector puts in gap and masked pixels: 2**bits - 1."""
    return int(np.iinfo(dtype).max)


def saturation(dtype: np.dtype) -> int:
    """The largest valid count (one below NODATA)."""
    return nodata(dtype) - 1


def hot_pixels(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the hot pixels: fixed by the seed, like a real sensor's."""
    rng = np.random.default_rng([seed, 1])
    n = min(HOT_PIXELS, shape[0] * shape[1])
    flat = rng.choice(shape[0] * shape[1], size=n, replace=False)
    return np.unravel_index(flat, shape)  # type: ignore[return-value]


def pixel_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """The uint32 pixel mask a Start with ``header_detail = all`` carries."""
    geo = Geometry(shape)
    mask = np.zeros(shape, np.uint32)
    mask[geo.gap_rows(), :] |= MASK_GAP
    mask[:, geo.gap_cols()] |= MASK_GAP
    mask[hot_pixels(shape, seed)] |= MASK_HOT
    return mask


def flatfield(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A float32 flatfield close to 1 (what ``header_detail = all`` sends)."""
    rng = np.random.default_rng([seed, 2])
    return (1.0 + 0.02 * rng.standard_normal(shape)).astype(np.float32)


def countrate_table(dtype: np.dtype) -> np.ndarray:
    """A uint32 count-rate correction lookup table: measured -> corrected counts
    (a paralysable dead-time model), up to the saturation value."""
    n = min(saturation(dtype), 4095) + 1
    measured = np.arange(n, dtype=np.float64)
    corrected = measured * (1.0 + measured / (4.0 * n))
    return np.minimum(corrected, saturation(dtype)).astype(np.uint32)


def _expected(geo: Geometry, peak: float) -> np.ndarray:
    """Mean counts per pixel: diffuse scattering plus four rings, weaker outwards."""
    rows, cols = geo.shape
    cx, cy = geo.beam_center
    r = np.hypot(np.arange(rows)[:, None] - cy, np.arange(cols)[None, :] - cx)
    scale = max(min(rows, cols) / 2.0, 2.0)
    counts = 0.004 * peak + 0.1 * peak / (1.0 + (r / (0.1 * scale)) ** 2)
    width = max(0.8, scale / 90)
    for k, radius in enumerate((0.22, 0.38, 0.55, 0.71), start=1):
        counts += peak / k**0.7 * np.exp(-0.5 * ((r - radius * scale) / width) ** 2)
    return counts


def synthesize(
    shape: tuple[int, int],
    dtype: str | np.dtype,
    channels: int,
    seed: int,
    masked: bool = True,
) -> list[list[np.ndarray]]:
    """``POOL`` frames, each a list of ``channels`` read-only arrays of ``shape`` and
    ``dtype``: channel k (a higher energy threshold) counts ``0.7**k`` as much.

    ``masked`` (the detector's ``pixel_mask_enabled``): gap and hot pixels hold
    NODATA, as a DECTRIS detector writes masked pixels; otherwise the gaps read 0 (no
    sensor there) and the hot pixels their own high counts."""
    dt = np.dtype(dtype)
    geo = Geometry(shape)
    rng = np.random.default_rng(seed)
    peak = _PEAK_COUNTS[dt.itemsize]
    base = _expected(geo, peak)
    hot = hot_pixels(shape, seed)
    gap = nodata(dt) if masked else 0
    pool = []
    for _ in range(POOL):
        flicker = max(0.0, 1.0 + 0.05 * rng.standard_normal())
        frame = []
        for k in range(channels):
            counts = rng.poisson(base * flicker * 0.7**k)
            counts[hot] = nodata(dt) if masked else HOT_COUNTS * peak
            np.clip(counts, 0, nodata(dt), out=counts)
            image = counts.astype(dt)
            image[geo.gap_rows(), :] = gap
            image[:, geo.gap_cols()] = gap
            image.setflags(write=False)
            frame.append(image)
        pool.append(frame)
    return pool
