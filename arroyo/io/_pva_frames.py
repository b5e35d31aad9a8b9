"""NTNDArrays to numpy and back, and where the PVA listener's runs begin and end.

Kept apart from ``arroyo.io.epics`` so it can be read (and tested) without pvapy:
the readers take anything indexable like a pvapy ``PvObject`` (a dict will do), the
builders take pvapy's module as an argument.

An ``NTNDArray`` holds its pixels in the union ``value`` (``ushortValue``,
``floatValue``...), its shape in ``dimension`` (fastest-varying first: x, then y, then
the colour plane where there is one), and, when the areaDetector codec plugin
compressed it, the codec's name in ``codec.name``, the original pixel type in
``codec.parameters`` and the decoded size in ``uncompressedSize``; the pixels are then
``ubyteValue``. The payload's numpy shape is the dimensions reversed (C order: a
512-wide, 256-high mono image is ``(256, 512)``), which is how the bytes lie.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from arroyo.compression import check_size, declared_size
from arroyo.errors import ConfigError, WireError
from arroyo.message import LOST, Encoded, Start, Stop

EXTRA = "pip install 'arroyo[epics]'"


def require() -> Any:
    """pvapy's ``pvaccess`` module, or ``ConfigError`` naming the extra."""
    try:
        import pvaccess
    except ImportError as e:
        msg = f"EPICS PV Access: pvapy is not installed: {EXTRA}"
        raise ConfigError(msg) from e
    return pvaccess


#: pvData's ScalarType numbers (pvapy's ``pva.UBYTE``...) and the union fields.
SCALAR_TYPES = {
    1: "i1", 2: "<i2", 3: "<i4", 4: "<i8", 5: "u1", 6: "<u2", 7: "<u4", 8: "<u8",
    9: "<f4", 10: "<f8",
}  # fmt: skip
FIELDS = {
    "byteValue": "i1", "shortValue": "<i2", "intValue": "<i4", "longValue": "<i8",
    "ubyteValue": "u1", "ushortValue": "<u2", "uintValue": "<u4", "ulongValue": "<u8",
    "floatValue": "<f4", "doubleValue": "<f8",
}  # fmt: skip
FIELD_OF = {np.dtype(v): k for k, v in FIELDS.items()}
#: The codec names areaDetector's NDPluginCodec writes.
CODECS = ("lz4", "bslz4", "blosc", "jpeg")
NT_SCALAR_ARRAY = "epics:nt/NTScalarArray:1.0"
#: Stop.routing[LOST] reasons (what the PV lost, not a stage).
SKIPPED = "uniqueIds the PV skipped"
UNDECODED = "NTNDArrays that did not decode"


def _union(value: Any) -> tuple[str, Any]:
    """(field name, value) of a pvapy union: a tuple of ({name: value}, {name: type})."""
    if isinstance(value, tuple | list) and value and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, dict) and len(value) == 1:
        ((name, inner),) = value.items()
        return str(name), inner
    msg = "the NTNDArray's value union holds no array"
    raise WireError(msg, reason="bad_ntndarray")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def attributes(frame: Any) -> dict[str, Any]:
    """The NTNDArray's attributes as ``{name: value}`` (areaDetector's ColorMode,
    the NDAttributes a site configured)."""
    out: dict[str, Any] = {}
    for attribute in frame["attribute"] or ():
        try:
            _, value = _union(attribute["value"])
        except WireError:
            value = None
        out[str(attribute["name"])] = _plain(value)
    return out


def timestamp(frame: Any, field: str = "timeStamp") -> float:
    stamp = frame[field]
    return float(stamp["secondsPastEpoch"]) + float(stamp["nanoseconds"]) * 1e-9


def shape_of(frame: Any) -> tuple[int, ...]:
    return tuple(int(d["size"]) for d in reversed(frame["dimension"] or ()))


def codec_name(frame: Any) -> str:
    return str(frame["codec"]["name"] or "")


def payload_of(frame: Any, shape: tuple[int, ...]) -> tuple[Any, str]:
    """The frame's pixels: a read-only array over pvapy's buffer, or ``Encoded`` for a
    codec the workers decode, or an array decoded here (blosc, jpeg; see
    ``decode_here``). Returns (payload, the arroyo codec name or "")."""
    field, data = _union(frame["value"])
    codec = codec_name(frame)
    if not codec:
        plain = FIELDS.get(field)
        if plain is None:
            msg = f"the NTNDArray's value is a {field!r:.40}, not a numeric array"
            raise WireError(msg, reason="bad_ntndarray")
        array = np.asarray(data, dtype=plain)
        if array.size != math.prod(shape):
            msg = f"{array.size} pixels do not fill the dimensions {shape}"
            raise WireError(msg, reason="bad_ntndarray")
        return array.reshape(shape), ""
    if codec not in CODECS:
        msg = f"codec {codec!r:.40} (areaDetector's are {', '.join(CODECS)})"
        raise WireError(msg, reason="unknown_codec")
    _, kind = _union(frame["codec"]["parameters"])
    dtype = np.dtype(SCALAR_TYPES.get(int(kind), "V"))
    if dtype.kind == "V":  # (pvString, pvBoolean, or no number at all)
        msg = f"codec parameters name pixel type {kind!r:.20}, not a numeric one"
        raise WireError(msg, reason="bad_ntndarray")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    size = dtype.itemsize * math.prod(shape)
    if codec in ("blosc", "jpeg"):
        return decode_here(codec, raw, dtype, shape), ""
    ours = hdf5_framed(codec, raw, size)
    check_size(ours, raw.nbytes, size)
    return Encoded(ours, dtype, shape, raw), ours


def hdf5_framed(codec: str, raw: np.ndarray, size: int) -> str:
    """Arroyo's name for an ``lz4`` / ``bslz4`` buffer. areaDetector's codec plugin
    sends the bare blocks (``lz4-block``, ``bslz4-bare``); a frame read straight from
    an HDF5 chunk (``pvapy-ad-sim-server --hdf-compression-mode``) keeps the filter's
    12-byte header, whose first 8 bytes, the decoded size, tell them apart (a bare
    stream cannot start with them: its first 4 bytes would be a block of 0 bytes)."""
    framed = declared_size(raw) == size
    if codec == "lz4":
        return "lz4" if framed else "lz4-block"
    return "bslz4" if framed else "bslz4-bare"


def decode_here(codec: str, raw: np.ndarray, dtype: np.dtype[Any], shape: Any) -> np.ndarray:
    """blosc and jpeg: no decoder in the core, so the listener decodes them when the
    library is installed (``blosc2`` or ``blosc``; Pillow); else ``no_decoder_*``."""
    try:
        out = _blosc(raw) if codec == "blosc" else _jpeg(raw)
    except ImportError as e:
        package = "blosc2" if codec == "blosc" else "pillow"
        msg = f"{codec} frames need {e.name or e} (pip install {package})"
        raise WireError(msg, reason=f"no_decoder_{codec}") from e
    except Exception as e:  # corrupt data: whatever the library raises
        msg = f"{codec} data does not decode: {e}"
        raise WireError(msg, reason="undecodable") from e
    if codec == "blosc":
        out = out.view(np.uint8).reshape(-1)
        if out.nbytes != dtype.itemsize * math.prod(shape):
            msg = f"blosc data decodes to {out.nbytes} bytes, not the array's"
            raise WireError(msg, reason="size")
        return out.view(dtype).reshape(shape)
    if out.size != math.prod(shape):
        msg = f"a jpeg of {out.shape} does not fill the dimensions {shape}"
        raise WireError(msg, reason="size")
    return out.astype(dtype, copy=False).reshape(shape)


def _jpeg(raw: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(raw.tobytes())))


def _blosc(raw: np.ndarray) -> np.ndarray:
    try:
        import blosc2 as blosc  # (reads blosc1 frames, as areaDetector writes them)
    except ImportError:
        import blosc
    return np.frombuffer(blosc.decompress(raw.tobytes()), np.uint8)


def acquiring(value: Any) -> bool:
    """An acquire PV's value: NTEnum (``{"index": 1, ...}``) or a number."""
    if isinstance(value, dict):
        value = value.get("index", 0)
    try:
        return bool(int(value))
    except (TypeError, ValueError):
        return str(value).lower() == "acquire"


# -- out: what the publisher serves -------------------------------------------------


def servable(array: np.ndarray) -> np.ndarray:
    """``array`` in a type PV Access carries, contiguous and little-endian (``bool``
    as ``uint8``, ``float16`` as ``float32``); ``WireError`` ``unsupported_dtype``
    when none fits (complex numbers)."""
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    native = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if native not in FIELD_OF:
        msg = f"{array.dtype} has no PV Access type"
        raise WireError(msg, reason="unsupported_dtype")
    return np.ascontiguousarray(array, dtype=native)


def ntndarray(pva: Any, image: np.ndarray, uid: int, when: float) -> Any:
    """An NTNDArray of ``image`` (from ``servable``), dimensions x first, with
    areaDetector's ColorMode: mono, or RGB1 for 3-D (``[3, x, y]``, which is
    ``(y, x, 3)`` in C order)."""
    nt = pva.NtNdArray()
    nt["uniqueId"] = uid
    nt["dimension"] = [pva.PvDimension(n, 0, n, 1, False) for n in reversed(image.shape)]
    nt["value"] = {FIELD_OF[image.dtype]: image.reshape(-1)}
    nt["compressedSize"] = nt["uncompressedSize"] = image.nbytes
    stamp = pva.PvTimeStamp(when)
    nt["timeStamp"] = stamp
    nt["dataTimeStamp"] = stamp
    mode = 2 if image.ndim == 3 else 0
    nt["attribute"] = [pva.NtAttribute("ColorMode", pva.PvInt(mode))]
    return nt


def scalar_array(pva: Any, dtype: np.dtype[Any]) -> Any:
    """An empty NTScalarArray of ``dtype`` (pvapy has no class for it)."""
    kind = getattr(pva, FIELD_OF[dtype].removesuffix("Value").upper())
    structure = {
        "value": [kind],
        "descriptor": pva.STRING,
        "timeStamp": pva.PvTimeStamp(),
        "alarm": pva.PvAlarm(),
    }
    return pva.PvObject(structure, NT_SCALAR_ARRAY)


# -- runs -------------------------------------------------------------------------------


class IdRuns:
    """Where runs begin and end by ``uniqueId`` (the rule docs/epics.md states):

    - a run is a sequence of increasing ``uniqueId``\\ s; the first array opens it;
    - an id at most ``max_gap`` past the next expected one stays in the run, and the
      ids between are counted missing (``SKIPPED``);
    - an id that goes back (the IOC restarted, or the array counter was reset, as
      areaDetector users do at each acquisition) or jumps further than ``max_gap``
      closes the run and opens a new one;
    - the id just seen again is a repeat (a monitor that reconnects is sent the PV's
      current value): ``"repeat"``, not emitted;
    - ``close(why)`` ends the run (idle, acquire state, the listener stopping).

    ``admit(uid)`` returns the messages to deliver before the frame's event (a
    Stop, a Start, both, or none), or raises nothing; ``"repeat"`` means drop it.
    """

    def __init__(self, max_gap: int) -> None:
        self.max_gap = max_gap
        self.open = False
        self.last = 0
        self.first = 0
        self.events = 0
        self.skipped = 0
        self.undecoded = 0

    def admit(self, uid: int, start_data: dict[str, Any]) -> list[Any] | str:
        out: list[Any] = []
        if self.open:
            if uid == self.last:
                return "repeat"
            gap = uid - self.last - 1
            if uid < self.last or gap > self.max_gap:
                out += self.close("uniqueId went back" if uid < self.last else "uniqueId jumped")
            else:
                self.skipped += gap
        if not self.open:
            out += self.begin(uid, start_data)
        self.last = uid
        return out

    def begin(self, uid: int, data: dict[str, Any]) -> list[Any]:
        self.open, self.first, self.last = True, uid, uid - 1
        self.events = self.skipped = self.undecoded = 0
        return [Start(data={**data, "first_uniqueId": uid})]

    def close(self, why: str) -> list[Any]:
        if not self.open:
            return []
        self.open = False
        lost = {SKIPPED: self.skipped, UNDECODED: self.undecoded}
        stop = Stop(
            data={
                "closed_by": why,
                "first_uniqueId": self.first,
                "last_uniqueId": self.last,
                "arrays_received": self.events,
                "skipped_uniqueIds": self.skipped,
                "undecoded_arrays": self.undecoded,
            }
        )
        lost = {k: v for k, v in lost.items() if v}
        if lost:
            stop.routing[LOST] = lost
        return [stop]
