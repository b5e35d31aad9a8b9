"""DECTRIS Stream V1 (codec ``dectris-stream1``): the legacy multipart JSON + binary
stream of an EIGER DCU (SIMPLON ``stream/config/format = legacy``, port 9999).

Messages, each one multipart ZMQ message whose first part names it (``htype``):

- series start: ``dheader-1.0`` (``series``, ``header_detail``); with
  ``header_detail`` ``basic`` or ``all`` a second part holds the detector
  configuration (``nimages``, ``ntrigger``, ``count_time``, ``photon_energy``,
  ``beam_center_x``, ``x_pixel_size``...); with ``all`` three more pairs of parts, a
  JSON header (``dflatfield-1.0``, ``dpixelmask-1.0``, ``dcountrate_table-1.0``:
  ``shape`` [x, y], ``type``) and its raw array; then, if configured, the
  ``header_appendix``;
- image: ``dimage-1.0`` (``series``, ``frame``, ``hash``), ``dimage_d-1.0``
  (``shape`` [x, y], ``type``, ``encoding``, ``size``), the frame's bytes,
  ``dconfig-1.0`` (``start_time``, ``stop_time``, ``real_time`` in ns), then, if
  configured, the ``image_appendix``;
- series end: ``dseries_end-1.0`` (``series``).

What arrives: ``Start.data`` = ``series_id``, ``header_detail``, the configuration's
fields under their SIMPLON names, the arrays (as ``flatfield``, ``pixel_mask``,
``countrate_correction_lookup_table``, shaped [y, x]) and ``appendix`` (parsed if it
is JSON); ``Event.payload`` = the frame, [y, x] (compressed frames stay compressed:
``lz4<`` is one bare LZ4 block, ``bs8/16/32-lz4<`` bitshuffle-LZ4 with the HDF5
12-byte header); ``Event.metadata`` = ``image_id`` (the ``frame``), ``series_id``,
``hash``, ``start_time``/``stop_time``/``real_time`` in seconds, ``appendix``.
``number_of_images`` is ``nimages`` x ``ntrigger`` when the configuration was sent.

Drops (beyond ``arroyo.io.series``'): ``frame_count``, ``bad_header`` (a part that is
not the JSON its place needs), ``bad_message`` (an unknown ``htype``), ``size`` (a
blob of another size than declared), ``unknown_encoding``, ``unknown_type``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from arroyo.compression import check_size, declared_size
from arroyo.errors import WireError
from arroyo.io.dectris import plain
from arroyo.io.guard import loads_json
from arroyo.io.series import SERIES_TIMEOUT, SeriesTracker
from arroyo.message import Encoded, Event, Message

#: The start's array parts, by htype: the name they take in Start.data (Stream V2's).
HEADER_ARRAYS = {
    "dflatfield-1.0": "flatfield",
    "dpixelmask-1.0": "pixel_mask",
    "dcountrate_table-1.0": "countrate_correction_lookup_table",
}
TYPES = ("uint8", "uint16", "uint32", "int32", "float32")
_ENCODING = re.compile(r"^(?:bs(8|16|32)-)?(lz4)?(<)$")


def view_of(frame: Any) -> memoryview:
    """The bytes of a ZMQ frame (or any buffer) without copying them."""
    buf = getattr(frame, "buffer", None)
    view = memoryview(buf if buf is not None else frame)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def json_part(frame: Any, what: str) -> dict[str, Any]:
    obj = loads_json(bytes(view_of(frame)), reason="bad_header")
    if not isinstance(obj, dict):
        msg = f"{what} must be a JSON object"
        raise WireError(msg, reason="bad_header")
    return obj


def dtype_of(name: Any) -> np.dtype[Any]:
    if name not in TYPES:
        msg = f"pixel type {name!r:.40} (known: {', '.join(TYPES)})"
        raise WireError(msg, reason="unknown_type")
    return np.dtype(name).newbyteorder("<")


def shape_of(header: dict[str, Any]) -> tuple[int, int]:
    """A V1 ``shape`` [x, y] (width first) as numpy's (rows, columns)."""
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        msg = f"shape must be [x, y], got {shape!r:.40}"
        raise WireError(msg, reason="bad_header")
    return shape[1], shape[0]


def raw_array(view: memoryview, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    expected = dtype.itemsize * math.prod(shape)
    if len(view) != expected:
        msg = f"{len(view)} bytes for a {dtype.str} {list(shape)} array of {expected}"
        raise WireError(msg, reason="size")
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


class StreamV1:
    """The decoder of one listener (stateful: the open series)."""

    name = "dectris-stream1"

    def __init__(self, channel: str = "", series_timeout: float = SERIES_TIMEOUT) -> None:
        self.tracker = SeriesTracker(series_timeout)  # (one channel: ``channel`` unused)

    def decode(self, frames: list[Any]) -> list[Message]:
        header = json_part(frames[0], "the first part")
        htype = header.get("htype")
        if htype == "dimage-1.0":
            return self.image(header, frames)
        if htype == "dheader-1.0":
            return self.start(header, frames[1:])
        if htype == "dseries_end-1.0":
            fields = {k: v for k, v in header.items() if k != "htype"}
            return self.tracker.end(header.get("series"), fields)
        msg = f"htype {htype!r:.40} (dheader-1.0, dimage-1.0 or dseries_end-1.0 expected)"
        raise WireError(msg, reason="bad_message")

    def tick(self, now: float) -> list[Message]:
        return self.tracker.tick(now)

    def start(self, header: dict[str, Any], parts: list[Any]) -> list[Message]:
        detail = header.get("header_detail")
        data: dict[str, Any] = {"series_id": header.get("series"), "header_detail": detail}
        config: dict[str, Any] = {}
        if detail in ("basic", "all") and parts:
            config = json_part(parts[0], "the detector configuration")
            data.update(config)
            parts = parts[1:]
        while parts:
            part, parts = parts[0], parts[1:]
            obj = _appendix(part)
            name = HEADER_ARRAYS.get(str(obj.get("htype"))) if isinstance(obj, dict) else None
            if name is not None and parts:
                assert isinstance(obj, dict)
                shape = shape_of(obj)
                data[name] = np.array(
                    raw_array(view_of(parts[0]), dtype_of(obj.get("type")), shape)
                )
                parts = parts[1:]
            else:
                data["appendix"] = obj
        return self.tracker.start(header.get("series"), _count(config), data)

    def image(self, header: dict[str, Any], frames: list[Any]) -> list[Message]:
        if len(frames) not in (4, 5):
            msg = f"an image is 4 parts (5 with its appendix), got {len(frames)}"
            raise WireError(msg, reason="frame_count")
        frame = header.get("frame")
        if not isinstance(frame, int):
            msg = f"frame must be an integer, got {frame!r:.40}"
            raise WireError(msg, reason="bad_header")
        info = json_part(frames[1], "dimage_d-1.0")
        payload: Any = _payload(info, view_of(frames[2]))  # (an array or an Encoded)
        times = json_part(frames[3], "dconfig-1.0")
        metadata: dict[str, Any] = {"image_id": frame, "series_id": header.get("series")}
        if "hash" in header:
            metadata["hash"] = header["hash"]
        for key in ("start_time", "stop_time", "real_time"):
            value = times.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                metadata[key] = value / 1e9
        if len(frames) == 5:
            metadata["appendix"] = _appendix(frames[4])
        self.tracker.image(header.get("series"), frame)
        return [Event(metadata=metadata, payload=payload)]


def _payload(info: dict[str, Any], blob: memoryview) -> np.ndarray | Encoded:
    dtype, shape = dtype_of(info.get("type")), shape_of(info)
    size = info.get("size")
    if isinstance(size, int) and size != len(blob):
        msg = f"a blob of {len(blob)} bytes, declared {size}"
        raise WireError(msg, reason="size")
    encoding = info.get("encoding")
    match = _ENCODING.match(encoding) if isinstance(encoding, str) else None
    if match is None or (match.group(1) and not match.group(2)):
        msg = f"encoding {encoding!r:.40} (known: <, lz4<, bs8-lz4<, bs16-lz4<, bs32-lz4<)"
        raise WireError(msg, reason="unknown_encoding")
    bits, lz4 = match.group(1), match.group(2)
    if not lz4:
        return raw_array(blob, dtype, shape)
    decoded = dtype.itemsize * math.prod(shape)
    codec = "bslz4" if bits else "lz4-block"
    if bits and int(bits) != 8 * dtype.itemsize:
        msg = f"encoding {encoding} for {dtype.name} pixels"
        raise WireError(msg, reason="bad_header")
    check_size(codec, len(blob), decoded)
    if bits and declared_size(blob) != decoded:
        msg = f"the bitshuffle header does not declare the {decoded} bytes of the frame"
        raise WireError(msg, reason="size")
    return Encoded(codec, dtype, shape, blob)


def _appendix(frame: Any) -> Any:
    """An appendix part (or an array's header): its JSON if it is JSON, else text."""
    raw = bytes(view_of(frame))
    try:
        return plain(loads_json(raw, reason="bad_header"))
    except WireError as e:
        if e.reason == "too_deep":
            raise
        return raw.decode("utf-8", errors="replace")


def _count(config: dict[str, Any]) -> int | None:
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    if not isinstance(nimages, int) or not isinstance(ntrigger, int):
        return None
    return nimages * max(ntrigger, 1)
