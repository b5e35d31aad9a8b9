"""The ``htype`` JSON family (codec ``htype``): a JSON header part naming the message,
then the array's bytes. Two dialects, told apart by ``htype``:

- ``array-1.0`` (areaDetector's ADZMQ NDPluginZMQ, PSI's std-daq and bsread
  viewers): ``type``, ``shape``, ``frame``, optional ``endianess`` (sic), ``encoding``
  or ``compression``; each message is one Event of its own (the format has no
  series). ADZMQ (its header has ``ndattr``) gives ``shape`` in areaDetector's order,
  fastest dimension first, which is reversed here; the others give numpy's order.
  Its ``ndattr`` (the NDArray's attributes), ``timeStamp`` and every other field
  become event metadata, ``frame`` as ``image_id``.
- MAX IV's ``streaming-receiver`` secondary stream: ``header`` (a series starts;
  further JSON parts are merged into ``Start.data``), ``image`` (``frame``,
  ``shape`` in numpy order, ``type``, ``compression`` ``bslz4`` or ``none``) and
  ``series_end``: one series is one run (``arroyo.io.series``), ``msg_number`` kept
  as metadata. ``number_of_images`` is ``nimages`` x ``ntrigger`` when the header
  has them.

Compressions: ``none`` (a view of the received bytes), ``lz4`` (one bare LZ4 block, as
areaDetector's codec writes it) and ``bslz4`` (bitshuffle-LZ4, with or without the
HDF5 12-byte header: a bare stream travels as it is (``bslz4-bare``), with no copy of the
compressed bytes). Compressed frames stay compressed until user code reads them.

Drops (beyond ``arroyo.io.series``'): ``frame_count``, ``bad_header``,
``bad_message`` (an unknown ``htype``), ``size``, ``unknown_encoding``,
``unknown_type``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arroyo.compression import check_size, declared_size
from arroyo.errors import WireError
from arroyo.io.dectris import plain
from arroyo.io.dectris_v1 import json_part, raw_array, view_of
from arroyo.io.series import SERIES_TIMEOUT, SeriesTracker
from arroyo.message import Encoded, Event, Message

TYPES = {
    **{name: name for name in ("int8", "uint8", "int16", "uint16", "int32", "uint32")},
    **{name: name for name in ("int64", "uint64", "float32", "float64")},
    "float": "float32",
    "double": "float64",
}
_CODECS = {"": "none", "none": "none", "lz4": "lz4-block", "bslz4": "bslz4"}


class HType:
    """The decoder of one listener (stateful: MAX IV's open series)."""

    name = "htype"

    def __init__(self, channel: str = "", series_timeout: float = SERIES_TIMEOUT) -> None:
        self.tracker = SeriesTracker(series_timeout)

    def decode(self, frames: list[Any]) -> list[Message]:
        header = json_part(frames[0], "the header part")
        htype = header.get("htype")
        if isinstance(htype, list) and len(htype) == 1:  # ADZMQ: ["array-1.0"]
            htype = htype[0]
        if htype == "array-1.0":
            return [self.array(header, frames)]
        if htype == "image":
            event = self.array(header, frames)
            self.tracker.image(None, event.metadata["image_id"])
            return [event]
        if htype == "header":
            data = _fields(header)
            for part in frames[1:]:
                data.update(plain(json_part(part, "a header's part")))
            return self.tracker.start(None, _count(data), data)
        if htype == "series_end":
            return self.tracker.end(None, _fields(header))
        msg = f"htype {htype!r:.40} (array-1.0, header, image or series_end expected)"
        raise WireError(msg, reason="bad_message")

    def tick(self, now: float) -> list[Message]:
        return self.tracker.tick(now)

    def array(self, header: dict[str, Any], frames: list[Any]) -> Event:
        if len(frames) != 2:
            msg = f"an array header is followed by one part, got {len(frames) - 1}"
            raise WireError(msg, reason="frame_count")
        frame = header.get("frame")
        if not isinstance(frame, int) or isinstance(frame, bool):
            msg = f"frame must be an integer, got {frame!r:.40}"
            raise WireError(msg, reason="bad_header")
        dtype, shape = _dtype(header), _shape(header)
        codec = header.get("compression", header.get("encoding", ""))
        payload: Any = _payload(codec, dtype, shape, view_of(frames[1]))
        metadata = _fields(header)
        for key in ("frame", "type", "shape", "compression", "encoding", "endianess"):
            metadata.pop(key, None)
        metadata["image_id"] = frame
        return Event(metadata=metadata, payload=payload)


def _fields(header: dict[str, Any]) -> dict[str, Any]:
    return {k: plain(v) for k, v in header.items() if k != "htype"}


def _dtype(header: dict[str, Any]) -> np.dtype[Any]:
    name = TYPES.get(header.get("type"))  # type: ignore[arg-type]
    if name is None:
        msg = f"pixel type {header.get('type')!r:.40} (known: {', '.join(TYPES)})"
        raise WireError(msg, reason="unknown_type")
    big = header.get("endianess", "little") == "big"
    return np.dtype(name).newbyteorder(">" if big else "<")


def _shape(header: dict[str, Any]) -> tuple[int, ...]:
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        msg = f"shape must be a list of 1 to 4 sizes, got {shape!r:.40}"
        raise WireError(msg, reason="bad_header")
    return tuple(reversed(shape)) if "ndattr" in header else tuple(shape)


def _payload(codec: Any, dtype: np.dtype[Any], shape: tuple[int, ...], blob: memoryview) -> Any:
    name = _CODECS.get(codec) if isinstance(codec, str) else None
    if name is None:
        msg = f"compression {codec!r:.40} (known: none, lz4, bslz4)"
        raise WireError(msg, reason="unknown_encoding")
    if name == "none":
        return raw_array(blob, dtype, shape)
    decoded = dtype.itemsize * math.prod(shape)
    check_size(name, len(blob), decoded)
    if name == "bslz4" and declared_size(blob) != decoded:
        # A bare bitshuffle stream (bitshuffle.compress_lz4's output) starts with a
        # block's 4-byte size, never with the frame's 8-byte size: it travels as it is.
        name = "bslz4-bare"
    return Encoded(name, dtype, shape, blob)


def _count(data: dict[str, Any]) -> int | None:
    nimages, ntrigger = data.get("nimages"), data.get("ntrigger", 1)
    if not isinstance(nimages, int) or not isinstance(ntrigger, int):
        return None
    return nimages * max(ntrigger, 1)
