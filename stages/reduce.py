"""Stock reductions for detector frames: corrections, ROI sums, binning, statistics,
radial profiles and hit-finding.

All of them share one convention (``FrameOperator``): ``Start`` and ``Stop`` pass
through (``ThresholdFilter`` adds its counts to ``Stop.data``; ``DarkFlatCorrection``
resets its per-run dark at ``Start``), and each event's *frame* is

- the payload itself when it is a numpy array;
- ``payload[array]`` when the payload is a dict of arrays and the ``array`` option
  names one of them;
- otherwise there is no frame and the event passes through untouched (bytes, ``None``,
  a dict without that array).

Received arrays are read-only views of the message buffer: every operator here makes
new arrays and new metadata dicts and never writes into its input.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from arroyo.convert import Bounds
from arroyo.message import SHARES, Event, Message, Payload, Start, Stop, frame_of
from arroyo.stage import Operator, Result


class FrameOperator(Operator):
    """Base of the operators in this module: finds the frame of each event."""

    array: str = ""

    def process(self, message: Message) -> Result:
        if not isinstance(message, Event):
            return self.control(message)
        frame = self.frame_of(message.payload)
        if frame is None:
            return message
        return self.on_frame(message, frame)

    def control(self, message: Message) -> Result:
        """Start, Stop (and any other non-event message): passed on by default."""
        return message

    @abstractmethod
    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        """Handle one event whose frame is ``frame``."""

    def frame_of(self, payload: Payload) -> np.ndarray | None:
        return frame_of(payload, self.array)

    def with_frame(self, payload: Payload, frame: np.ndarray) -> Payload:
        """``payload`` with its frame replaced by ``frame`` (other arrays kept)."""
        if isinstance(payload, dict):
            return {**payload, self.array: frame}
        return frame


def derive(event: Event, payload: Payload, **metadata: Any) -> Event:
    """A new event for the same run, sequence number and time, with extra metadata."""
    return Event(
        metadata={**event.metadata, **metadata},
        payload=payload,
        run=event.run,
        seq=event.seq,
        timestamp_ns=event.timestamp_ns,
    )


def _number(value: Any) -> int | float:
    """A numpy scalar as a JSON-friendly Python int (integer kinds) or float."""
    return int(value) if np.asarray(value).dtype.kind in "biu" else float(value)


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        msg = f"cannot read the {what} file {path}: {e}"
        raise ValueError(msg) from e


class DarkFlatCorrection(FrameOperator):
    """Dark and flat-field correction: ``(frame - dark) / flat``, as float32.

    - ``dark`` is ``dark_file`` (a ``.npy`` array the shape of a frame, or broadcastable
      to it) when given, else the constant ``dark_value``.
    - ``flat`` is ``flat_file`` (``.npy``), used as is (normalise it to a mean of 1
      yourself if you want counts preserved); without it there is no division. Pixels
      whose flat is below ``min_flat`` (or not finite) are dead: they come out as 0.
    - ``dark_from_first = N > 0``: the first N events of each run are not emitted;
      their mean becomes the run's dark (replacing ``dark_value``/``dark_file``), and
      the following events are corrected with it. With several workers, each worker
      averages the first N events *it* receives, so use one worker when the dark
      frames must be exactly the run's first N. A run shorter than N emits nothing.
    - ``scale`` multiplies the corrected frame (a gain, 1 by default). It is live:
      ``arroyo set TOPOLOGY STAGE scale=2`` changes it between two events.
    - Corrected events get metadata ``dark`` = ``"value"``, ``"file"`` or ``"first"``.
    - Files are read at ``setup()`` (or the first event when ``setup`` was not called):
      a missing or unreadable file raises ``ValueError`` naming it, so the stage fails
      at start-up. A dark or flat whose shape does not fit a frame raises
      ``ValueError`` for that event (the runtime counts it and goes on).
    """

    live_options: ClassVar[tuple[str, ...]] = ("scale",)

    def __init__(
        self,
        dark_value: float = 0.0,
        dark_file: Path | None = None,
        flat_file: Path | None = None,
        min_flat: Annotated[float, Bounds(gt=0)] = 1e-3,
        dark_from_first: int = 0,
        array: str = "",
        scale: float = 1.0,
    ) -> None:
        if dark_from_first < 0:
            msg = f"dark_from_first must be >= 0, got {dark_from_first}"
            raise ValueError(msg)
        self.dark_value = dark_value
        self.dark_file = dark_file
        self.flat_file = flat_file
        self.min_flat = min_flat
        self.dark_from_first = dark_from_first
        self.array = array
        self.scale = scale
        self._loaded = False
        self._dark: np.ndarray | np.float32 = np.float32(dark_value)
        self._gain: np.ndarray | None = None  # 1 / flat, 0 at dead pixels
        self._run_dark: np.ndarray | None = None
        self._dark_sum: np.ndarray | None = None
        self._dark_count = 0

    def setup(self) -> None:
        if self._loaded:
            return
        if self.dark_file is not None:
            self._dark = _load_array(self.dark_file, "dark").astype(np.float32)
        if self.flat_file is not None:
            flat = _load_array(self.flat_file, "flat").astype(np.float64)
            live = np.isfinite(flat) & (flat >= self.min_flat)
            gain = np.zeros(flat.shape, dtype=np.float32)
            np.divide(1.0, flat, out=gain, where=live, casting="unsafe")
            self._gain = gain
        self._loaded = True

    def control(self, message: Message) -> Result:
        if isinstance(message, Start):
            self._run_dark, self._dark_sum, self._dark_count = None, None, 0
        return message

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        self.setup()
        if self._run_dark is None and self.dark_from_first:
            self._collect_dark(frame)  # a dark frame of this run: not emitted
            return None
        dark = self._run_dark if self._run_dark is not None else self._dark
        self._check_shape("dark", dark, frame)
        out = frame.astype(np.float32)
        out -= dark
        if self._gain is not None:
            self._check_shape("flat", self._gain, frame)
            out *= self._gain
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        source = "first" if self._run_dark is not None else "file" if self.dark_file else "value"
        return derive(event, self.with_frame(event.payload, out), dark=source)

    def _collect_dark(self, frame: np.ndarray) -> None:
        if self._dark_sum is None:
            self._dark_sum = np.zeros(frame.shape, dtype=np.float64)
        elif self._dark_sum.shape != frame.shape:
            msg = f"dark frame shape {frame.shape} differs from the first {self._dark_sum.shape}"
            raise ValueError(msg)
        self._dark_sum += frame
        self._dark_count += 1
        if self._dark_count == self.dark_from_first:
            self._run_dark = (self._dark_sum / self._dark_count).astype(np.float32)
            self._dark_sum = None

    @staticmethod
    def _check_shape(what: str, array: Any, frame: np.ndarray) -> None:
        shape = np.shape(array)
        try:
            result = np.broadcast_shapes(shape, frame.shape)
        except ValueError:
            result = None
        if result != frame.shape:
            msg = f"{what} shape {shape} does not fit frame shape {frame.shape}"
            raise ValueError(msg)


class RoiSums(FrameOperator):
    """Sums of rectangular regions of interest, as event metadata ``roi_sums``.

    ``rois`` is a flat list of ``y0, y1, x0, x1`` quadruples (Python slice bounds,
    end exclusive, on the last two axes of the frame; for frames of more than two
    dimensions each sum runs over all leading axes too). ``roi_sums`` is a list with
    one number per ROI, in order: an int for integer frames, else a float. A ROI that
    does not lie inside the frame raises ``ValueError`` for that event. The payload is
    dropped (the event carries metadata only) unless ``keep_payload`` is true.
    """

    def __init__(self, rois: tuple[int, ...], keep_payload: bool = False, array: str = "") -> None:
        if not rois or len(rois) % 4:
            msg = f"rois must be y0, y1, x0, x1 quadruples, got {len(rois)} numbers"
            raise ValueError(msg)
        boxes = [tuple(rois[i : i + 4]) for i in range(0, len(rois), 4)]
        for y0, y1, x0, x1 in boxes:
            if not (0 <= y0 < y1 and 0 <= x0 < x1):
                msg = f"ROI {y0}, {y1}, {x0}, {x1}: need 0 <= y0 < y1 and 0 <= x0 < x1"
                raise ValueError(msg)
        self.rois = boxes
        self.keep_payload = keep_payload
        self.array = array

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        if frame.ndim < 2:
            msg = f"RoiSums needs frames of 2 or more dimensions, got shape {frame.shape}"
            raise ValueError(msg)
        rows, cols = frame.shape[-2:]
        acc = np.float64 if frame.dtype.kind in "fc" else None
        sums = []
        for y0, y1, x0, x1 in self.rois:
            if y1 > rows or x1 > cols:
                msg = f"ROI {y0}, {y1}, {x0}, {x1} is outside a frame of shape {frame.shape}"
                raise ValueError(msg)
            sums.append(_number(frame[..., y0:y1, x0:x1].sum(dtype=acc)))
        return derive(event, event.payload if self.keep_payload else None, roi_sums=sums)


class Bin(FrameOperator):
    """Downsamples the last two axes (the only axis of a 1-D frame) by ``factor``.

    Each output pixel is the sum (``mode = sum``) or mean (``mode = mean``) of a
    ``factor`` x ``factor`` block; rows and columns left over at the far edges, when
    the size is not a multiple of ``factor``, are cropped. Output dtype: ``sum`` gives
    int64 for integer frames, float64 for float64 and float32 for other floats;
    ``mean`` gives float64 for float64 frames and float32 otherwise. A frame smaller
    than one block raises ``ValueError``. Metadata gets ``bin`` = ``factor``.
    """

    def __init__(
        self,
        factor: Annotated[int, Bounds(ge=1)] = 2,
        mode: Literal["sum", "mean"] = "mean",
        array: str = "",
    ) -> None:
        if factor < 1:
            msg = f"factor must be >= 1, got {factor}"
            raise ValueError(msg)
        if mode not in ("sum", "mean"):
            msg = f"mode must be 'sum' or 'mean', got {mode!r}"
            raise ValueError(msg)
        self.factor = factor
        self.mode = mode
        self.array = array

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        return derive(event, self.with_frame(event.payload, self.bin(frame)), bin=self.factor)

    def bin(self, frame: np.ndarray) -> np.ndarray:
        f, nd = self.factor, min(frame.ndim, 2)
        if nd == 0 or any(n < f for n in frame.shape[-nd:]):
            msg = f"cannot bin a frame of shape {frame.shape} by {f}"
            raise ValueError(msg)
        lead = frame.shape[: frame.ndim - nd]
        kept = [n // f for n in frame.shape[-nd:]]
        crop: tuple[Any, ...] = (..., *(slice(0, k * f) for k in kept))
        cropped = frame[crop]
        blocks = cropped.reshape(*lead, *(d for k in kept for d in (k, f)))
        axes = tuple(len(lead) + 2 * i + 1 for i in range(nd))
        if self.mode == "mean":
            dtype = np.float64 if frame.dtype == np.float64 else np.float32
            return blocks.mean(axis=axes, dtype=np.float64).astype(dtype)
        if frame.dtype.kind in "biu":
            return blocks.sum(axis=axes, dtype=np.int64)
        dtype = np.float64 if frame.dtype == np.float64 else np.float32
        return blocks.sum(axis=axes, dtype=np.float64).astype(dtype)


class FrameStats(FrameOperator):
    """Adds the frame's ``min``, ``max``, ``mean``, ``std`` and ``sum`` to the metadata
    (as Python floats, computed in float64; names prefixed by ``prefix``). The payload
    is passed on unchanged (the same array). NaNs propagate into the statistics."""

    def __init__(self, prefix: str = "", array: str = "") -> None:
        self.prefix = prefix
        self.array = array

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        if frame.size == 0:
            msg = f"no statistics of an empty frame (shape {frame.shape})"
            raise ValueError(msg)
        p = self.prefix
        stats = {
            f"{p}min": float(frame.min()),
            f"{p}max": float(frame.max()),
            f"{p}mean": float(frame.mean(dtype=np.float64)),
            f"{p}std": float(frame.std(dtype=np.float64)),
            f"{p}sum": float(frame.sum(dtype=np.float64)),
        }
        return derive(event, event.payload, **stats)


class RadialProfile(FrameOperator):
    """Azimuthal average ``I(r)`` of a 2-D frame around ``center``.

    - ``center`` is ``(row, column)`` in pixels; by default the middle of the frame,
      ``((rows - 1) / 2, (columns - 1) / 2)``.
    - The radii 0..``r_max`` are cut into ``bins`` equal bins (``r_max`` by default is
      the largest distance of any pixel from the centre); pixels beyond ``r_max`` are
      left out. A pixel at distance ``d`` is in bin ``floor(d / r_max * bins)``.
    - The payload becomes ``{"r": bin centres, "I": mean value of the pixels in each
      bin}``, both float64 of length ``bins``; a bin without pixels has ``I = nan``.
      With a dict payload the frame's array is replaced by ``r`` and ``I`` and other
      arrays are kept. Metadata is the frame's plus ``center``.
    - The pixel-to-bin map is computed once per frame shape.
    """

    def __init__(
        self,
        center: tuple[float, float] | None = None,
        bins: Annotated[int, Bounds(ge=1)] = 100,
        r_max: float | None = None,
        array: str = "",
    ) -> None:
        if bins < 1:
            msg = f"bins must be >= 1, got {bins}"
            raise ValueError(msg)
        if r_max is not None and not r_max > 0:
            msg = f"r_max must be > 0, got {r_max}"
            raise ValueError(msg)
        self.center = None if center is None else (float(center[0]), float(center[1]))
        self.bins = bins
        self.r_max = r_max
        self.array = array
        self._shape: tuple[int, ...] | None = None
        self._index: np.ndarray = np.empty(0, dtype=np.intp)
        self._counts: np.ndarray = np.empty(0, dtype=np.intp)
        self._r: np.ndarray = np.empty(0)
        self._center = (0.0, 0.0)

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        if frame.ndim != 2:
            msg = f"RadialProfile needs 2-D frames, got shape {frame.shape}"
            raise ValueError(msg)
        if frame.shape != self._shape:
            self._prepare(frame.shape)
        sums = np.bincount(self._index, weights=frame.ravel(), minlength=self.bins + 1)
        intensity = np.full(self.bins, np.nan)
        np.divide(sums[: self.bins], self._counts, out=intensity, where=self._counts > 0)
        profile = {"r": self._r.copy(), "I": intensity}
        if isinstance(event.payload, dict):
            rest = {k: v for k, v in event.payload.items() if k != self.array}
            payload: Payload = {**rest, **profile}
        else:
            payload = profile
        return derive(event, payload, center=list(self._center))

    def _prepare(self, shape: tuple[int, ...]) -> None:
        rows, cols = shape
        cy, cx = self.center or ((rows - 1) / 2, (cols - 1) / 2)
        y = np.arange(rows, dtype=np.float64)[:, None] - cy
        x = np.arange(cols, dtype=np.float64)[None, :] - cx
        dist = np.hypot(y, x).ravel()
        r_max = self.r_max if self.r_max is not None else max(float(dist.max(initial=0)), 1e-12)
        index = np.floor(dist * (self.bins / r_max)).astype(np.intp)
        # r_max itself (and rounding just below it) falls in the last bin; pixels beyond
        # r_max go to an overflow bin ``bins`` that is never reported.
        np.minimum(index, self.bins - 1, out=index)
        index[dist > r_max] = self.bins
        self._index = index
        self._counts = np.bincount(index, minlength=self.bins + 1)[: self.bins]
        self._r = (np.arange(self.bins) + 0.5) * (r_max / self.bins)
        self._center = (float(cy), float(cx))
        self._shape = shape


class ThresholdFilter(FrameOperator):
    """A hit-finder: keeps only events whose frame has at least ``min_pixels`` pixels
    strictly above ``threshold``; the others are dropped.

    Kept events carry metadata ``bright_pixels`` (that count) and the same payload.
    The filter counts kept (``hits``) and dropped (``misses``) events per run (reset at
    ``Start``) and adds both to the run's ``Stop.data`` (a new Stop with the same run,
    sequence number and routing). Events without a frame pass untouched and are not
    counted. With several workers each worker counts its own share and marks the two
    keys as shares (``summed``); where the workers' Stops merge downstream they are
    added up, so the Stop that reaches the sink carries the run's totals.

    ``threshold`` and ``min_pixels`` are live: ``arroyo set TOPOLOGY STAGE
    threshold=120`` changes them between two events on every worker.
    """

    live_options: ClassVar[tuple[str, ...]] = ("threshold", "min_pixels")

    def __init__(
        self, threshold: float, min_pixels: Annotated[int, Bounds(ge=1)] = 1, array: str = ""
    ) -> None:
        if min_pixels < 0:
            msg = f"min_pixels must be >= 0, got {min_pixels}"
            raise ValueError(msg)
        self.threshold = threshold
        self.min_pixels = min_pixels
        self.array = array
        self.hits = 0
        self.misses = 0

    def control(self, message: Message) -> Result:
        if isinstance(message, Start):
            self.hits = self.misses = 0
        elif isinstance(message, Stop):
            data = {**message.data, "hits": self.hits, "misses": self.misses,
                    SHARES: ["hits", "misses"]}  # fmt: skip
            return Stop(
                data=data,
                run=message.run,
                seq=message.seq,
                timestamp_ns=message.timestamp_ns,
                routing=dict(message.routing),
            )
        return message

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        bright = int(np.count_nonzero(frame > self.threshold))
        if bright < self.min_pixels:
            self.misses += 1
            return None
        self.hits += 1
        return derive(event, event.payload, bright_pixels=bright)
