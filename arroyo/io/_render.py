"""Frames to small coloured PNG images for the viewer page (numpy and zlib only).

The colour tables come from plotly's named colour scales, so the page's colour bar and
the image agree. A PNG here is a palette image (one byte a pixel, the colour table in
its ``PLTE`` chunk): a quarter of an RGB one to compress, send and decode.
"""

from __future__ import annotations

import base64
import functools
import zlib
from typing import Literal

import numpy as np

Colormap = Literal["viridis", "cividis", "inferno", "magma", "plasma", "gray", "hot", "jet"]
Scale = Literal["linear", "log"]
COLORMAPS: tuple[str, ...] = Colormap.__args__  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=16)
def colour_table(name: str) -> bytes:
    """256 RGB triplets (768 bytes) interpolated from plotly's colour scale ``name``."""
    import plotly.colors

    scale = plotly.colors.get_colorscale(name)
    pos = np.array([p for p, _ in scale], dtype=np.float64)
    rgb = np.array([_rgb(c) for _, c in scale], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(x, pos, rgb[:, i]) for i in range(3)], axis=1)
    return np.round(table).astype(np.uint8).tobytes()


@functools.lru_cache(maxsize=16)
def colour_scale(name: str) -> tuple[tuple[float, str], ...]:
    """plotly's colour scale ``name`` as (position, colour) pairs, for the page's bar."""
    import plotly.colors

    return tuple((float(p), str(c)) for p, c in plotly.colors.get_colorscale(name))


def _rgb(colour: str) -> tuple[float, float, float]:
    colour = colour.strip()
    if colour.startswith("#"):
        return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    inside = colour[colour.index("(") + 1 : colour.index(")")]
    r, g, b = (float(v) for v in inside.split(",")[:3])
    return r, g, b


def plane(frame: np.ndarray) -> np.ndarray:
    """The 2-D image to show of ``frame``: itself, or the first plane of its last two axes."""
    while frame.ndim > 2:
        frame = frame[0]
    return frame


def downsample(frame: np.ndarray, max_side: int) -> np.ndarray:
    """Block means so that neither side exceeds ``max_side`` (float32; edges cropped)."""
    f = max(1, -(-max(frame.shape) // max(1, max_side)))
    if f == 1:
        return frame.astype(np.float32)
    h, w = frame.shape[0] // f, frame.shape[1] // f
    if h == 0 or w == 0:
        return frame[: max(h, 1) * f : f, : max(w, 1) * f : f].astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for i in range(f):
        for j in range(f):
            out += frame[i : h * f : f, j : w * f : f]
    out *= 1.0 / (f * f)
    return out


def auto_limits(image: np.ndarray) -> tuple[float, float]:
    """1st and 99.5th percentiles of a sample of the finite pixels."""
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, (1.0, 99.5))
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def to_indices(
    image: np.ndarray, scale: str, vmin: float | None, vmax: float | None
) -> tuple[np.ndarray, float, float]:
    """Scale ``image`` (float32, modified in place) to 0..255; returns the limits used
    (in the scaled space: log10(1 + max(x, 0)) for ``log``)."""
    if scale == "log":
        np.maximum(image, 0, out=image)
        np.log1p(image, out=image)
        image *= 1.0 / np.log(10.0)
        vmin = None if vmin is None else float(np.log10(1 + max(vmin, 0)))
        vmax = None if vmax is None else float(np.log10(1 + max(vmax, 0)))
    lo, hi = auto_limits(image) if vmin is None or vmax is None else (vmin, vmax)
    lo = lo if vmin is None else vmin
    hi = hi if vmax is None else vmax
    if not hi > lo:
        hi = lo + 1e-12
    image -= lo
    image *= 255.0 / (hi - lo)
    np.nan_to_num(image, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), lo, hi


def _chunk(tag: bytes, data: bytes) -> bytes:
    body = tag + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def palette_png(indices: np.ndarray, table: bytes) -> bytes:
    """A PNG (colour type 3) of 2-D uint8 ``indices`` into the 256-colour ``table``."""
    h, w = indices.shape
    raw = np.zeros((h, w + 1), np.uint8)  # each row starts with filter type 0
    raw[:, 1:] = indices
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"PLTE", table),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)),
            _chunk(b"IEND", b""),
        )
    )


def render(
    frame: np.ndarray,
    max_side: int = 1024,
    colormap: str = "viridis",
    scale: str = "linear",
    vmin: float | None = None,
    vmax: float | None = None,
) -> dict[str, object]:
    """What the page needs to draw ``frame``: a data URI and the geometry and limits."""
    image = downsample(plane(np.asarray(frame)), max_side)
    indices, lo, hi = to_indices(image, scale, vmin, vmax)
    png = palette_png(indices, colour_table(colormap))
    return {
        "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        "width": int(indices.shape[1]),
        "height": int(indices.shape[0]),
        "shape": list(np.shape(frame)),
        "limits": [lo, hi],
        "colormap": colormap,
        "colorscale": [list(pair) for pair in colour_scale(colormap)],
        "scale": scale,
        "digest": f"{zlib.crc32(png):08x}",  # tells two drawn images apart cheaply
    }
