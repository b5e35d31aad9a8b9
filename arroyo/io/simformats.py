"""What the simulated DCU (``arroyo.io.simulate``) sends, message by message, in the
three formats, built from their public specifications (docs/detectors.md):

* ``dectris-stream2``: one CBOR map per ZMQ message (self-described, tag 55799), key
  ``type`` first: ``start``, ``image``, ``end``. Images are RFC 8746 typed arrays in a
  row-major multi-dimensional array, ``#6.40([[rows, columns], #6.69(bytes)])``
  (tags 64/69/70: uint8, uint16 and uint32 little-endian), the bytes wrapped in the
  DECTRIS compression tag ``#6.56500(["bslz4", elem_size, bytes])`` or
  ``#6.56500(["lz4", 0, bytes])``; times are rationals ``[numerator, denominator]``
  over a 50 MHz time base; dates are tag 0 strings;
* ``dectris-stream1``: multipart JSON + binary: ``dheader-1.0`` (1, 2 or 8 parts for
  ``header_detail`` none / basic / all, plus the appendix), four parts per image
  (``dimage-1.0``, ``dimage_d-1.0`` with ``shape`` [x, y] and ``encoding`` ``<``,
  ``lz4<`` or ``bs<bits>-lz4<``, the blob, ``dconfig-1.0`` in nanoseconds), and
  ``dseries_end-1.0``;
* ``htype``: MAX IV streaming-receiver's secondary stream: ``header`` (+ a JSON part of
  series information), ``image`` + blob (``compression`` ``bslz4`` or ``none``, shape
  [rows, columns]) and ``series_end``, every message numbered by ``msg_number``.

Every encoder takes frames already compressed (``Blob``): the simulator compresses a
handful of frames once and cycles them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import numpy as np

from arroyo.io import simframes

TIME_BASE = 50_000_000  # Hz: the denominator of Stream V2's rationals
PIXEL_SIZE = 75e-6  # m
DISTANCE = 0.12  # m
ENERGY = 12_398.4  # eV (1 angstrom)
TYPED_TAG = {"|u1": 64, "<u2": 69, "<u4": 70, "<f4": 85}  # RFC 8746, little-endian
V1_ENCODING = {"none": "<", "lz4": "lz4<"}  # bslz4: bs<bits>-lz4<
# The compression each format names for the codecs of arroyo.compression.
V1_CODEC = {"none": "none", "lz4": "lz4-block", "bslz4": "bslz4"}


@dataclass(frozen=True)
class Blob:
    """One channel of one frame, compressed once: ``codec`` is the
    ``arroyo.compression`` name (``none``, ``lz4``, ``lz4-block``, ``bslz4``)."""

    codec: str
    dtype: np.dtype
    shape: tuple[int, int]
    data: bytes


@dataclass
class Series:
    """One series (one arm): its ids, image count and the detector's settings."""

    series_id: int
    unique_id: str
    images: int
    dtype: np.dtype
    shape: tuple[int, int]
    channels: list[str]
    frame_time: float
    header_detail: str
    user_data: Any
    seed: int
    pixel_mask: bool = True
    date: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def count_time(self) -> float:
        return self.frame_time * 0.98  # the rest is the readout


def _cbor() -> Any:
    from arroyo.compression import EXTRA, MissingExtra

    try:
        import cbor2
    except ImportError as e:
        msg = f"cbor2 is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    return cbor2


# ---- DECTRIS Stream V2 -------------------------------------------------------------


def _typed(cbor2: Any, dtype: np.dtype, content: Any) -> Any:
    return cbor2.CBORTag(TYPED_TAG[dtype.str], content)


def _v2_array(cbor2: Any, blob: Blob) -> Any:
    """``#6.40([[rows, cols], #6.TYPED(bytes or #6.56500([...]))])``."""
    if blob.codec == "none":
        content: Any = blob.data
    else:
        elem = blob.dtype.itemsize if blob.codec == "bslz4" else 0
        content = cbor2.CBORTag(56500, [blob.codec, elem, blob.data])
    return cbor2.CBORTag(40, [list(blob.shape), _typed(cbor2, blob.dtype, content)])


def _plain_v2_array(cbor2: Any, array: np.ndarray) -> Any:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    inner = _typed(cbor2, array.dtype, array.tobytes())
    return cbor2.CBORTag(40, [list(array.shape), inner]) if array.ndim > 1 else inner


def _rational(seconds: float) -> list[int]:
    return [round(seconds * TIME_BASE), TIME_BASE]


class StreamV2:
    """DECTRIS Stream V2 messages (one frame each)."""

    codecs: ClassVar[dict[str, str]] = {"none": "none", "lz4": "lz4", "bslz4": "bslz4"}

    def __init__(self) -> None:
        self.cbor2 = _cbor()

    def _dumps(self, body: dict[str, Any]) -> list[bytes]:
        return [self.cbor2.dumps(self.cbor2.CBORTag(55799, body))]

    def start(self, s: Series) -> list[bytes]:
        x, y = simframes.Geometry(s.shape).beam_center
        body: dict[str, Any] = {
            "type": "start",
            "series_id": s.series_id,
            "series_unique_id": s.unique_id,
            "arm_date": s.date,
            "beam_center_x": x,
            "beam_center_y": y,
            "channels": s.channels,
            "count_time": s.count_time,
            "countrate_correction_enabled": False,
            "detector_description": "Arroyo simulated DECTRIS EIGER2 (arroyo simulate)",
            "detector_serial_number": "SIM-0001",
            "detector_translation": [0.0, 0.0, DISTANCE],
            "flatfield_enabled": False,
            "frame_time": s.frame_time,
            "goniometer": {"omega": {"increment": 0.1, "start": 0.0}},
            "image_size_x": s.shape[1],
            "image_size_y": s.shape[0],
            "incident_energy": ENERGY,
            "incident_wavelength": 12_398.4 / ENERGY,
            "number_of_images": s.images,
            "pixel_mask_enabled": s.pixel_mask,
            "pixel_size_x": PIXEL_SIZE,
            "pixel_size_y": PIXEL_SIZE,
            "saturation_value": simframes.saturation(s.dtype),
            "sensor_material": "Si",
            "sensor_thickness": 450e-6,
            "threshold_energy": {c: ENERGY / 2 * (1 + 0.2 * k) for k, c in enumerate(s.channels)},
            "user_data": s.user_data,
            "virtual_pixel_interpolation_enabled": False,
        }
        if s.header_detail == "all":
            body.update(self._start_arrays(s))
        return self._dumps(body)

    def _start_arrays(self, s: Series) -> dict[str, Any]:
        cb = self.cbor2
        mask = simframes.pixel_mask(s.shape, s.seed)
        flat = simframes.flatfield(s.shape, s.seed)
        return {
            "flatfield": {c: _plain_v2_array(cb, flat) for c in s.channels},
            "pixel_mask": {c: _plain_v2_array(cb, mask) for c in s.channels},
            "countrate_correction_lookup_table": _plain_v2_array(
                cb, simframes.countrate_table(s.dtype)
            ),
        }

    def image(self, s: Series, image_id: int, blobs: list[Blob]) -> list[bytes]:
        start = image_id * s.frame_time
        body = {
            "type": "image",
            "series_id": s.series_id,
            "series_unique_id": s.unique_id,
            "image_id": image_id,
            "real_time": _rational(s.count_time),
            "series_date": s.date,
            "start_time": _rational(start),
            "stop_time": _rational(start + s.count_time),
            "user_data": s.user_data,
            "data": {c: _v2_array(self.cbor2, b) for c, b in zip(s.channels, blobs, strict=True)},
        }
        return self._dumps(body)

    def end(self, s: Series) -> list[bytes]:
        body = {"type": "end", "series_id": s.series_id, "series_unique_id": s.unique_id}
        return self._dumps(body)


# ---- DECTRIS Stream V1 -------------------------------------------------------------


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _v1_type(dtype: np.dtype) -> str:
    return dtype.name  # uint8, uint16, uint32, float32


class StreamV1:
    """DECTRIS Stream V1 (legacy) multipart messages; one channel only."""

    codecs: ClassVar[dict[str, str]] = V1_CODEC

    def start(self, s: Series) -> list[bytes]:
        parts = [
            _json({"htype": "dheader-1.0", "series": s.series_id, "header_detail": s.header_detail})
        ]
        if s.header_detail in ("basic", "all"):
            parts.append(_json(self._config(s)))
        if s.header_detail == "all":
            x_y = [s.shape[1], s.shape[0]]
            arrays = (
                ("dflatfield-1.0", x_y, simframes.flatfield(s.shape, s.seed)),
                ("dpixelmask-1.0", x_y, simframes.pixel_mask(s.shape, s.seed)),
                ("dcountrate_table-1.0", None, simframes.countrate_table(s.dtype)),
            )
            for htype, shape, array in arrays:
                # every array part says [x, y]; the table is one row of x entries
                shape = shape or [array.size, 1]
                parts.append(_json({"htype": htype, "shape": shape, "type": _v1_type(array.dtype)}))
                parts.append(np.ascontiguousarray(array).tobytes())
        if s.user_data is not None:  # the header appendix
            parts.append(_json(s.user_data))
        return parts

    def _config(self, s: Series) -> dict[str, Any]:
        x, y = simframes.Geometry(s.shape).beam_center
        return {
            "beam_center_x": x,
            "beam_center_y": y,
            "bit_depth_image": s.dtype.itemsize * 8,
            "count_time": s.count_time,
            "countrate_correction_applied": False,
            "description": "Arroyo simulated DECTRIS EIGER (arroyo simulate)",
            "detector_distance": DISTANCE,
            "detector_number": "SIM-0001",
            "flatfield_correction_applied": False,
            "frame_time": s.frame_time,
            "nimages": s.images,
            "ntrigger": 1,
            "omega_increment": 0.1,
            "omega_start": 0.0,
            "photon_energy": ENERGY,
            "pixel_mask_applied": s.pixel_mask,
            "sensor_material": "Si",
            "sensor_thickness": 450e-6,
            "threshold_energy": ENERGY / 2,
            "trigger_mode": "ints",
            "virtual_pixel_correction_applied": False,
            "wavelength": 12_398.4 / ENERGY,
            "x_pixel_size": PIXEL_SIZE,
            "x_pixels_in_detector": s.shape[1],
            "y_pixel_size": PIXEL_SIZE,
            "y_pixels_in_detector": s.shape[0],
        }

    def image(self, s: Series, image_id: int, blobs: list[Blob]) -> list[bytes]:
        (blob,) = blobs
        if blob.codec == "bslz4":
            encoding = f"bs{blob.dtype.itemsize * 8}-lz4<"
        else:
            encoding = V1_ENCODING["lz4" if blob.codec == "lz4-block" else "none"]
        start_ns = round(image_id * s.frame_time * 1e9)
        count_ns = round(s.count_time * 1e9)
        return [
            _json(
                {
                    "htype": "dimage-1.0",
                    "series": s.series_id,
                    "frame": image_id,
                    "hash": hashlib.md5(blob.data).hexdigest(),
                }
            ),
            _json(
                {
                    "htype": "dimage_d-1.0",
                    "shape": [blob.shape[1], blob.shape[0]],
                    "type": _v1_type(blob.dtype),
                    "encoding": encoding,
                    "size": len(blob.data),
                }
            ),
            blob.data,
            _json(
                {
                    "htype": "dconfig-1.0",
                    "start_time": start_ns,
                    "stop_time": start_ns + count_ns,
                    "real_time": count_ns,
                }
            ),
        ]

    def end(self, s: Series) -> list[bytes]:
        return [_json({"htype": "dseries_end-1.0", "series": s.series_id})]


# ---- htype (MAX IV streaming-receiver's secondary stream) ---------------------------


class Htype:
    """MAX IV streaming-receiver's secondary stream; one channel, bslz4 or none."""

    codecs: ClassVar[dict[str, str]] = {"none": "none", "bslz4": "bslz4"}

    def __init__(self) -> None:
        self.msg_number = 0

    def _number(self) -> int:
        self.msg_number += 1
        return self.msg_number - 1

    def start(self, s: Series) -> list[bytes]:
        info = {
            "series_id": s.series_id,
            "series_unique_id": s.unique_id,
            "count_time": s.count_time,
            "nimages": s.images,
            "ntrigger": 1,
            "photon_energy": ENERGY,
        }
        if s.user_data is not None:
            info["user_data"] = s.user_data
        head = {
            "htype": "header",
            "msg_number": self._number(),
            "filename": f"/tmp/arroyo-simulate/series_{s.series_id:05d}.h5",
        }
        return [_json(head), _json(info)]

    def image(self, s: Series, image_id: int, blobs: list[Blob]) -> list[bytes]:
        (blob,) = blobs
        head = {
            "htype": "image",
            "msg_number": self._number(),
            "frame": image_id,
            "shape": list(blob.shape),
            "type": blob.dtype.name,
            "compression": "bslz4" if blob.codec == "bslz4" else "none",
        }
        return [_json(head), blob.data]

    def skip(self) -> None:
        """An image lost before it was numbered leaves no gap in ``msg_number``; one
        lost after leaves one: the simulator drops after (the gap shows it)."""
        self.msg_number += 1

    def end(self, s: Series) -> list[bytes]:
        return [_json({"htype": "series_end", "msg_number": self._number()})]


class Encoder(Protocol):
    """What every format's encoder offers: the compressions it carries (ours -> the
    ``arroyo.compression`` codec), and the frames of each message."""

    codecs: ClassVar[dict[str, str]]

    def start(self, s: Series) -> list[bytes]: ...
    def image(self, s: Series, image_id: int, blobs: list[Blob]) -> list[bytes]: ...
    def end(self, s: Series) -> list[bytes]: ...


FORMATS: dict[str, Callable[[], Encoder]] = {
    "dectris-stream2": StreamV2,
    "dectris-stream1": StreamV1,
    "htype": Htype,
}

CODECS = {
    name: cls.codecs
    for name, cls in (
        ("dectris-stream2", StreamV2),
        ("dectris-stream1", StreamV1),
        ("htype", Htype),
    )
}
