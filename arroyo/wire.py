"""The wire format between Arroyo stages (see docs/wire-format.md).

One Arroyo message is one ZMQ multipart message: a msgpack header frame followed by
one raw frame per payload buffer (version 2: small buffers ride inside the header,
and a compressed buffer travels as it came). ``encode`` returns frames ready for
``socket.send_multipart(frames, copy=False)``; ``decode`` takes what
``recv_multipart(copy=False)`` returns (or bytes / memoryviews) and gives numpy arrays
that are views over the received frames, without copying, or ``Encoded`` arrays that
are decoded when user code reads them.

Decoding treats its input as untrusted: every limit is checked before anything is
built, and any failure raises ``WireError`` (never pickle, never an allocation larger
than the frames already received).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from arroyo.compression import CODECS
from arroyo.errors import WireError
from arroyo.message import Encoded, Event, Message, Start, Stop

VERSION = 2  # the newest this Arroyo writes; it reads every version in VERSIONS
VERSIONS = (1, 2)
# Version 2 adds, each only where used (a message that needs none of them is written
# as version 1, so a version-1 peer still reads it): a 4th descriptor element naming
# the compression of its buffer (``Encoded``), buffers inline in the header ("d"),
# and arrays at the top level of a Start's or Stop's data carried as buffers.
INLINE_MAX = 1024  # payloads up to this many bytes ride in the header frame
MAX_HEADER_BYTES = 1 << 20
MAX_BUFFERS = 256
MAX_NDIM = 32
# Fixed-size, pointer-free dtypes only: never object arrays, never structured records.
ALLOWED_KINDS = frozenset("biufcmMSU")

_KIND_TO_TAG = {Start: "S", Event: "E", Stop: "T"}
_TAG_TO_KIND: dict[str, type[Message]] = {v: k for k, v in _KIND_TO_TAG.items()}

PAYLOAD_NONE, PAYLOAD_BYTES, PAYLOAD_ARRAY, PAYLOAD_DICT = 0, 1, 2, 3

Frame = Any  # zmq.Frame, bytes, bytearray or memoryview


def _to_msgpack(obj: Any) -> Any:
    """msgpack ``default`` hook: numpy scalars and small arrays in metadata become plain."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, int):  # msgpack hands over the ints it cannot hold
        msg = "an integer in message metadata is outside msgpack's -2**63 .. 2**64-1"
        raise WireError(msg, reason="encode")
    msg = f"cannot encode {type(obj).__name__} in message metadata (msgpack types only)"
    raise WireError(msg, reason="encode")


_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's Packer: one per call costs a third of packing a small header.
    (A Packer is not thread-safe, and user listeners may deliver from their own thread.)"""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_to_msgpack, use_bin_type=True)
    return packer


def _array_buffer(array: np.ndarray) -> tuple[list[Any], np.ndarray]:
    dtype = array.dtype
    if dtype.kind not in ALLOWED_KINDS or dtype.shape != () or dtype.names is not None:
        msg = f"cannot send arrays of dtype {dtype!s}; use a numeric, bool or fixed string dtype"
        raise WireError(msg, reason="encode")
    # (not np.ascontiguousarray: it turns 0-d arrays into 1-d ones)
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")
    # A flat uint8 view exports the buffer protocol for every allowed dtype (datetime64
    # does not on its own), and costs no copy for contiguous input.
    return [dtype.str, list(contiguous.shape)], contiguous.reshape(-1).view(np.uint8)


def _encoded_buffer(array: Encoded) -> tuple[list[Any], Any]:
    """An ``Encoded`` array goes out as it came: its compressed bytes, named codec."""
    dtype = array.dtype
    if dtype.kind not in ALLOWED_KINDS or dtype.shape != () or dtype.names is not None:
        msg = f"cannot send arrays of dtype {dtype!s}; use a numeric, bool or fixed string dtype"
        raise WireError(msg, reason="encode")
    data = array.data
    return [dtype.str, list(array.shape), array.codec], data if type(data) is bytes else (
        getattr(data, "buffer", None) or memoryview(data)
    )


def _named_buffers(arrays: dict[Any, Any]) -> tuple[list[list[Any]], list[Any]]:
    descs, bufs = [], []
    for name, array in arrays.items():
        if not isinstance(name, str):
            msg = "a dict payload maps str names to numpy arrays"
            raise WireError(msg, reason="encode")
        if type(array) is Encoded:
            desc, buf = _encoded_buffer(array)
        elif isinstance(array, np.ndarray):
            desc, buf = _array_buffer(array)
        else:
            msg = "a dict payload maps str names to numpy arrays"
            raise WireError(msg, reason="encode")
        descs.append([name, *desc])
        bufs.append(buf)
    return descs, bufs


def _encode_payload(payload: Any) -> tuple[int, list[list[Any]], list[Any]]:
    if payload is None:
        return PAYLOAD_NONE, [], []
    if isinstance(payload, np.ndarray):
        desc, buf = _array_buffer(payload)
        return PAYLOAD_ARRAY, [[None, *desc]], [buf]
    if type(payload) is Encoded:
        desc, buf = _encoded_buffer(payload)
        return PAYLOAD_ARRAY, [[None, *desc]], [buf]
    if isinstance(payload, dict):
        descs, bufs = _named_buffers(payload)
        return PAYLOAD_DICT, descs, bufs
    if isinstance(payload, bytes | bytearray | memoryview):
        return PAYLOAD_BYTES, [[None, None, None]], [payload]
    msg = f"payload must be bytes, a numpy array or a dict of arrays, not {type(payload).__name__}"
    raise WireError(msg, reason="encode")


def encode(message: Message) -> list[Any]:
    """Frames for one message: ``[header, *buffers]``; buffers are not copied."""
    tag = _KIND_TO_TAG.get(type(message))
    if tag is None:
        for cls, t in _KIND_TO_TAG.items():
            if isinstance(message, cls):
                tag = t
                break
        else:
            msg = f"not an Arroyo message: {type(message).__name__}"
            raise WireError(msg, reason="encode")
    header: dict[str, Any] = {
        "v": 1,  # raised to 2 below where the message needs it
        "k": tag,
        "r": message.run,
        "q": message.seq,
        "t": message.timestamp_ns,
    }
    buffers: list[Any] = []
    descs: list[list[Any]] = []
    if isinstance(message, Event):
        header["m"] = message.metadata
        kind, descs, buffers = _encode_payload(message.raw_payload)
        header["p"] = kind
    else:
        data = message.data  # type: ignore[attr-defined]
        arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray | Encoded)}
        if arrays:  # a Start's pixel mask, flatfield...: buffers, not nested lists
            header["m"] = {k: v for k, v in data.items() if k not in arrays}
            descs, buffers = _named_buffers(arrays)
        else:
            header["m"] = data
    if descs:
        header["b"] = descs
        if any(len(d) > 3 for d in descs) or not isinstance(message, Event):
            header["v"] = 2
        if buffers and _small(buffers):
            header["v"] = 2
            header["d"] = [b if type(b) is bytes else bytes(b) for b in buffers]
            buffers = []
    if message.routing:
        header["x"] = message.routing
    try:
        head = _packer().pack(header)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        msg = f"cannot encode message header: {e}"
        raise WireError(msg, reason="encode") from e
    return [head, *buffers]


def _small(buffers: list[Any]) -> bool:
    """Do these buffers ride in the header frame? One frame less per message costs
    raw pyzmq itself 2-3x its rate at 100 B; copying a kilobyte costs nothing."""
    total = 0
    for b in buffers:
        total += len(b) if type(b) is bytes or type(b) is bytearray else b.nbytes
        if total > INLINE_MAX:
            return False
    return True


def _buffer(frame: Frame) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        try:
            buf = memoryview(frame)
        except TypeError as e:
            msg = f"frame of type {type(frame).__name__} is not a buffer"
            raise WireError(msg) from e
    if buf.ndim != 1 or buf.itemsize != 1:
        try:
            buf = buf.cast("B")
        except TypeError as e:  # a strided (non-contiguous) buffer
            msg = f"frame of type {type(frame).__name__} is not a contiguous buffer"
            raise WireError(msg) from e
    return buf


def _reject_ext(code: int, data: bytes) -> Any:
    msg = f"msgpack extension type {code} is not allowed in a header"
    raise WireError(msg)


def _unpack_header(frame: Frame) -> dict[str, Any]:
    # bytes go to msgpack as they are: the receiving link hands headers over as bytes
    buf = frame if type(frame) is bytes else _buffer(frame)
    if len(buf) > MAX_HEADER_BYTES:
        msg = f"header of {len(buf)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        raise WireError(msg, reason="oversized")
    try:
        header = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=False,
            ext_hook=_reject_ext,
            # msgpack decodes ext type -1 itself, never calling ext_hook; as an int of
            # nanoseconds it stays a plain value instead of a msgpack.Timestamp object.
            timestamp=2,
        )
    except WireError:
        raise
    except msgpack.StackError as e:  # its unpacker keeps a stack of 1024 levels: no recursion
        msg = "header nests deeper than msgpack's 1024 levels"
        raise WireError(msg, reason="too_deep") from e
    except Exception as e:  # msgpack raises many types on garbage; all mean "malformed"
        msg = f"header is not valid msgpack: {type(e).__name__}: {e}"
        raise WireError(msg) from e
    if not isinstance(header, dict):
        msg = "header is not a msgpack map"
        raise WireError(msg)
    version = header.get("v")
    if type(version) is not int or version not in VERSIONS:  # not 1.0, not True
        msg = f"unknown wire format version {version!r} (this Arroyo reads 1 and 2)"
        raise WireError(msg, reason="version")
    return header


def _int_field(header: dict[str, Any], key: str, default: int = 0) -> int:
    value = header.get(key, default)
    if type(value) is not int:  # not bool, not float
        msg = f"header field {key!r} must be an integer, got {type(value).__name__}"
        raise WireError(msg)
    return value


def _dict_field(header: dict[str, Any], key: str) -> dict[str, Any]:
    value = header.get(key)
    if type(value) is dict:  # msgpack only ever builds plain dicts
        return value
    if key not in header:
        return {}
    msg = f"header field {key!r} must be a map, got {type(value).__name__}"
    raise WireError(msg)


_DTYPES: dict[str, np.dtype[Any]] = {}  # dtype strings already checked (parsing costs ~1 µs)
_MAX_CACHED_DTYPES = 256  # a hostile peer cannot grow it without bound


def _parse_dtype(text: Any) -> np.dtype[Any]:
    cached = _DTYPES.get(text) if type(text) is str else None
    if cached is not None:
        return cached
    dtype = _check_dtype(text)
    if len(_DTYPES) < _MAX_CACHED_DTYPES:
        _DTYPES[text] = dtype
    return dtype


def _check_dtype(text: Any) -> np.dtype[Any]:
    if not isinstance(text, str) or len(text) > 32:
        msg = f"array dtype must be a short string, got {text!r:.40}"
        raise WireError(msg)
    try:
        dtype = np.dtype(text)
    except Exception as e:
        msg = f"unknown dtype {text!r}"
        raise WireError(msg) from e
    if dtype.kind not in ALLOWED_KINDS or dtype.shape != () or dtype.names is not None:
        msg = f"dtype {text!r} is not allowed on the wire"
        raise WireError(msg)
    if dtype.itemsize == 0:  # 'S0', 'U0': numpy cannot view a buffer as these
        msg = f"dtype {text!r} has no size"
        raise WireError(msg)
    return dtype


def _parse_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        msg = f"array shape must be a list of at most {MAX_NDIM} integers"
        raise WireError(msg)
    for n in shape:
        if type(n) is not int or n < 0:
            msg = f"array shape {shape!r:.60} has a negative or non-integer dimension"
            raise WireError(msg)
    return tuple(shape)


def _decode_array(desc: list[Any], frame: Frame) -> np.ndarray | Encoded:
    dtype = _parse_dtype(desc[1])
    shape = _parse_shape(desc[2])
    buf = _buffer(frame)
    if len(desc) == 4:  # (version 2) compressed: decoded where user code reads it
        codec = desc[3]
        if codec not in CODECS:  # (a list is unhashable: `in` on a tuple compares)
            msg = f"unknown compression {codec!r:.40}"
            raise WireError(msg, reason="encoding")
        return Encoded(codec, dtype, shape, buf)
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(buf):
        msg = f"array {dtype.str}{list(shape)} declares {declared} bytes; its frame has {len(buf)}"
        raise WireError(msg, reason="size")
    try:
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError) as e:
        # An empty array can still declare dims numpy cannot hold: [0, 2**63].
        msg = f"array shape {list(shape)!r:.60} cannot be built: {e}"
        raise WireError(msg) from e


def _descriptors(header: dict[str, Any], frames: Sequence[Frame]) -> tuple[list[Any], Any]:
    """The buffer descriptors and their buffers: the frames after the header, or
    (version 2) the header's own ``d``."""
    descs = header.get("b", [])
    if not isinstance(descs, list) or len(descs) > MAX_BUFFERS:
        msg = f"buffer list must be a list of at most {MAX_BUFFERS} descriptors"
        raise WireError(msg)
    v2 = header["v"] >= 2
    for desc in descs:
        if not isinstance(desc, list) or not (len(desc) == 3 or (v2 and len(desc) == 4)):
            msg = "a buffer descriptor is a list [name, dtype, shape] (or + codec, version 2)"
            raise WireError(msg)
    inline = header.get("d") if v2 else None
    if inline is None:
        if len(frames) != 1 + len(descs):
            msg = f"header describes {len(descs)} buffers but {len(frames) - 1} frames follow it"
            raise WireError(msg, reason="frames")
        return descs, frames[1:]
    if len(frames) != 1:
        msg = f"a header with inline buffers is followed by {len(frames) - 1} frames"
        raise WireError(msg, reason="frames")
    if type(inline) is not list or len(inline) != len(descs):
        msg = f"inline buffers must be a list of {len(descs)} byte strings"
        raise WireError(msg)
    for buf in inline:
        if type(buf) is not bytes:
            msg = "an inline buffer must be a byte string (msgpack bin)"
            raise WireError(msg)
    return descs, inline


def _named_arrays(descs: list[Any], buffers: Any) -> dict[str, np.ndarray | Encoded]:
    arrays: dict[str, np.ndarray | Encoded] = {}
    for desc, frame in zip(descs, buffers, strict=True):
        name = desc[0]
        if not isinstance(name, str) or name in arrays:
            msg = f"array name {name!r:.40} is missing or repeated"
            raise WireError(msg)
        arrays[name] = _decode_array(desc, frame)
    return arrays


def _decode_payload(header: dict[str, Any], frames: Sequence[Frame]) -> Any:
    kind = _int_field(header, "p", PAYLOAD_NONE)
    descs, buffers = _descriptors(header, frames)
    if kind == PAYLOAD_NONE and not descs:
        return None
    if kind == PAYLOAD_BYTES and len(descs) == 1 and descs[0][1] is None and len(descs[0]) == 3:
        frame = buffers[0]
        if type(frame) is bytes:
            return frame
        copied = getattr(frame, "bytes", None)  # a zmq.Frame copies itself out the fastest
        return copied if type(copied) is bytes else bytes(_buffer(frame))
    if kind == PAYLOAD_ARRAY and len(descs) == 1:
        return _decode_array(descs[0], buffers[0])
    if kind == PAYLOAD_DICT:
        return _named_arrays(descs, buffers)
    msg = f"payload kind {kind} does not match its {len(descs)} buffer descriptor(s)"
    raise WireError(msg)


def _decode_data(header: dict[str, Any], frames: Sequence[Frame]) -> dict[str, Any]:
    """A Start's or Stop's data; (version 2) with its arrays put back by name."""
    data = _dict_field(header, "m")
    if header["v"] < 2 or ("b" not in header and "d" not in header):
        if len(frames) != 1 or "b" in header:
            msg = "Start and Stop messages carry no buffers (in version 1)"
            raise WireError(msg, reason="frames")
        return data
    descs, buffers = _descriptors(header, frames)
    arrays = _named_arrays(descs, buffers)
    for name, array in arrays.items():
        if name in data:
            msg = f"array {name!r:.40} is also a key of the message's data"
            raise WireError(msg)
        # a Start's arrays are few and read by every worker: decoded here, once
        data[name] = array.decode() if type(array) is Encoded else array
    return data


def decode(frames: Sequence[Frame]) -> Message:
    """The message in ``frames``; raises ``WireError`` (only) on anything invalid."""
    if (type(frames) is not list and not isinstance(frames, Sequence)) or len(frames) == 0:
        msg = "a message needs at least a header frame"
        raise WireError(msg, reason="frames")
    if len(frames) > MAX_BUFFERS + 1:
        msg = f"{len(frames)} frames exceed the limit of {MAX_BUFFERS + 1}"
        raise WireError(msg, reason="frames")
    header = _unpack_header(frames[0])
    tag = header.get("k")
    cls = _TAG_TO_KIND.get(tag) if isinstance(tag, str) else None  # a list is unhashable
    if cls is None:
        msg = f"unknown message kind {header.get('k')!r:.20}"
        raise WireError(msg)
    run, seq, stamp = _int_field(header, "r"), _int_field(header, "q"), _int_field(header, "t")
    routing = _dict_field(header, "x")
    if cls is Event:
        meta = _dict_field(header, "m")
        payload = _decode_payload(header, frames)
        return Event(meta, payload, run=run, seq=seq, timestamp_ns=stamp, routing=routing)
    data = _decode_data(header, frames)
    return cls(data=data, run=run, seq=seq, timestamp_ns=stamp, routing=routing)  # type: ignore[call-arg]


def event_run(frames: Sequence[Frame]) -> int | None:
    """The run id of an Event whose header decodes though the message does not (a
    size that does not match, a bad dtype): so a stage can charge the loss to its run.
    None when there is no such header."""
    try:
        header = _unpack_header(frames[0])
    except (WireError, IndexError, TypeError):
        return None
    run = header.get("r")
    return run if header.get("k") == "E" and type(run) is int and run > 0 else None


def frames_nbytes(frames: Sequence[Frame]) -> int:
    """Total size of a frame list in bytes, for byte counters and credit."""
    total = 0
    for f in frames:
        # len() of a zmq.Frame, bytes or flat uint8 array is its size; a memoryview's
        # len() counts items. (Asking a Frame for .buffer would build a memoryview.)
        total += f.nbytes if type(f) is memoryview else len(f)
    return total
