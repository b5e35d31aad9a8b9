"""Codecs for the outside world: how a foreign ZMQ peer's frames map to messages.

A codec is a pair of plain functions, like pyzmq's ``send_serialized`` /
``recv_serialized``: ``decode(frames) -> Message | list[Message] | None`` and
``encode(message) -> list of frames | None`` (None: nothing to send for it).

* ``arroyo``: the Arroyo wire format (docs/wire-format.md);
* ``raw``: each ZMQ message is one Event whose payload is the bytes of its frames;
  on output, an event's payload bytes (an array's raw C-order bytes) and nothing for
  Start/Stop;
* ``json``: one JSON object per message; ``{"kind": "start"|"event"|"stop", ...}``
  or any other object (an Event with it as metadata);
* ``array``: each ZMQ message is one frame of raw pixels whose dtype and shape the
  topology gives (``dtype = uint16``, ``shape = 512, 512``); the Event's payload is a
  read-only numpy view over the received bytes. A frame of another size is dropped
  and counted as ``frame_size``;
* ``header``: a JSON header frame (``dtype`` and ``shape``; any other key becomes
  event metadata) followed by the raw frame. A header ``{"kind": "start", ...}`` or
  ``{"kind": "stop", ...}`` alone is a run's Start or Stop, so a foreign stream can
  carry runs (docs/foreign-frames.md);
* ``dectris-stream2``, ``dectris-stream1``, ``htype``: a detector's own stream
  (``arroyo.io.dectris``, ``arroyo.io.dectris_v1``, ``arroyo.io.htype``;
  docs/detectors.md), for listeners only. Unlike the others they are stateful (a
  series is a run): ``get_codec`` builds a new one for each listener, and their
  ``tick`` closes a series whose end never came;
* ``module:function``: the user's own decode (for listeners) or encode (publishers).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from arroyo import wire
from arroyo.errors import WireError
from arroyo.io.guard import loads_json
from arroyo.message import Event, Message, Start, Stop


@dataclass(frozen=True)
class Codec:
    """``tick(now)``, for a stateful codec only, is called by its listener about every
    100 ms with ``time.monotonic()`` and returns the messages time alone makes (the
    Stop of a series that timed out)."""

    name: str
    decode: Callable[[list[Any]], Any]
    encode: Callable[[Message], list[Any] | None]
    tick: Callable[[float], list[Message]] | None = None


def _raw_decode(frames: list[Any]) -> Message:
    data = b"".join(f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames)
    return Event(metadata={}, payload=data)


def _raw_encode(message: Message) -> list[Any] | None:
    if not isinstance(message, Event) or message.payload is None:
        return None
    payload = message.payload
    if isinstance(payload, np.ndarray):
        return [np.ascontiguousarray(payload)]
    if isinstance(payload, dict):
        return [np.ascontiguousarray(a) for a in payload.values()]
    return [payload]


_KINDS = {"start": Start, "stop": Stop}


def _json_decode(frames: list[Any]) -> Message:
    raw = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    obj = loads_json(raw)
    if not isinstance(obj, dict):
        msg = "a JSON message must be an object"
        raise WireError(msg)
    kind = str(obj.get("kind", "event")).lower()
    if kind in _KINDS:
        data = obj.get("data", {k: v for k, v in obj.items() if k != "kind"})
        return _KINDS[kind](data=data if isinstance(data, dict) else {"data": data})
    metadata = obj.get("metadata", obj) if kind == "event" else obj
    return Event(metadata=metadata if isinstance(metadata, dict) else {"value": metadata})


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    return str(obj)


def _json_encode(message: Message) -> list[Any]:
    record: dict[str, Any] = {"kind": type(message).__name__.lower(), "run": message.run}
    record["seq"] = message.seq
    if isinstance(message, Event):
        record["metadata"] = message.metadata
        if isinstance(message.payload, np.ndarray) and message.payload.size <= 4096:
            record["payload"] = message.payload
    else:
        record["data"] = message.data  # type: ignore[attr-defined]
    return [json.dumps(record, default=_json_default).encode()]


def _frame_view(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _as_array(frame: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view of ``frame`` as ``dtype``/``shape``; WireError if the size differs."""
    view = _frame_view(frame)
    expected = dtype.itemsize * math.prod(shape)
    if view.nbytes != expected:
        msg = f"a frame of {view.nbytes} bytes is not {dtype.str} {shape} ({expected} bytes)"
        raise WireError(msg, reason="frame_size")
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


def _array_codec(dtype: str, shape: tuple[int, ...]) -> Codec:
    if not dtype or not shape:
        msg = "codec = array needs the frame's dtype and shape (dtype = uint16, shape = 512, 512)"
        raise ValueError(msg)
    kind = np.dtype(dtype)

    def decode(frames: list[Any]) -> Message:
        if len(frames) != 1:
            msg = f"codec array expects one frame per message, got {len(frames)}"
            raise WireError(msg, reason="frame_count")
        return Event(metadata={}, payload=_as_array(frames[0], kind, shape))

    return Codec("array", decode, _raw_encode)


_HEADER_KEYS = ("kind", "dtype", "shape")


def _header_of(frame: Any) -> dict[str, Any]:
    header = loads_json(bytes(_frame_view(frame)), reason="bad_header")
    if not isinstance(header, dict):
        msg = "header frame must be a JSON object"
        raise WireError(msg, reason="bad_header")
    return header


def _header_decode(frames: list[Any]) -> Message:
    header = _header_of(frames[0])
    kind = str(header.get("kind", "event")).lower()
    rest = {k: v for k, v in header.items() if k not in _HEADER_KEYS}
    if kind in _KINDS:
        return _KINDS[kind](data=rest)
    if kind != "event":
        msg = f"header kind {kind!r} is not start, event or stop"
        raise WireError(msg, reason="bad_header")
    if "dtype" not in header and "shape" not in header and len(frames) == 1:
        return Event(metadata=rest)
    if len(frames) != 2:
        msg = f"an event header is followed by one frame, got {len(frames) - 1}"
        raise WireError(msg, reason="frame_count")
    try:
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(n) for n in header["shape"])
    except (KeyError, TypeError, ValueError) as e:
        msg = f"event header needs a valid dtype and shape: {e}"
        raise WireError(msg, reason="bad_header") from e
    if dtype.hasobject or any(n < 0 for n in shape):
        msg = f"event header declares an unusable frame: {dtype.str} {shape}"
        raise WireError(msg, reason="bad_header")
    return Event(metadata=rest, payload=_as_array(frames[1], dtype, shape))


def _header_encode(message: Message) -> list[Any] | None:
    if isinstance(message, Start | Stop):
        record = {"kind": type(message).__name__.lower(), **message.data}
        return [json.dumps(record, default=_json_default).encode()]
    payload = message.payload if isinstance(message, Event) else None
    if not isinstance(payload, np.ndarray):
        return None
    array = np.ascontiguousarray(payload)
    record = {**message.metadata, "dtype": array.dtype.str, "shape": list(array.shape)}  # type: ignore[attr-defined]
    return [json.dumps(record, default=_json_default).encode(), array]


BUILTIN = {
    "arroyo": Codec("arroyo", wire.decode, wire.encode),
    "raw": Codec("raw", _raw_decode, _raw_encode),
    "json": Codec("json", _json_decode, _json_encode),
    "header": Codec("header", _header_decode, _header_encode),
}


DETECTORS = ("dectris-stream2", "dectris-stream1", "htype")
NAMES = (
    "arroyo, raw, json, array, header, dectris-stream2, dectris-stream1, htype or module:function"
)


def get_codec(
    name: str,
    dtype: str = "",
    shape: tuple[int, ...] = (),
    channel: str = "",
    series_timeout: float = 300.0,
) -> Codec:
    """A built-in codec by name, or ``module:function`` (used for both directions).
    ``array`` needs the frame's ``dtype`` and ``shape``; the detector codecs take the
    ``channel`` to keep (Stream V2) and the ``series_timeout`` in seconds, and are
    built anew on each call. ``ValueError`` names what is wrong with ``name``."""
    if name == "array":
        return _array_codec(dtype, tuple(shape))
    if name in DETECTORS:
        return _detector_codec(name, channel, series_timeout)
    if name in BUILTIN:
        return BUILTIN[name]
    func = _user_function(name)
    return Codec(name, func, func)


def _detector_codec(name: str, channel: str, series_timeout: float) -> Codec:
    # Imported here: the detector formats need numpy views of CBOR and the
    # compression extra only where a listener uses them.
    from arroyo.compression import require
    from arroyo.io.dectris import StreamV2, decodes_only
    from arroyo.io.dectris_v1 import StreamV1
    from arroyo.io.htype import HType

    require()  # a listener without bitshuffle/lz4 fails at once, naming the extra
    kinds = {"dectris-stream2": StreamV2, "dectris-stream1": StreamV1, "htype": HType}
    decoder = kinds[name](channel=channel, series_timeout=series_timeout)
    return Codec(name, decoder.decode, decodes_only(name), decoder.tick)


def _user_function(name: str) -> Callable[..., Any]:
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        msg = f"unknown codec: use {NAMES}"
        raise ValueError(msg)
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # whatever importing the user's module raises
        msg = f"cannot import codec {name}: {type(e).__name__}: {e}"
        raise ValueError(msg) from e
    if not callable(func):
        msg = f"codec {name} is not a function"
        raise ValueError(msg)
    return func


@dataclass(frozen=True)
class CodecName:
    """Marks a string option as a codec name, ``Annotated[str, CodecName()]``, so that
    loading the topology (``arroyo check`` as well as ``up``) refuses one that is
    neither built in nor an importable ``module:function``."""

    def validate(self, value: str) -> None:
        if value != "array" and value not in BUILTIN and value not in DETECTORS:
            _user_function(value)
