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
* ``module:function``: the user's own decode (for listeners) or encode (publishers).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from arroyo import wire
from arroyo.errors import WireError
from arroyo.message import Event, Message, Start, Stop


@dataclass(frozen=True)
class Codec:
    name: str
    decode: Callable[[list[Any]], Any]
    encode: Callable[[Message], list[Any] | None]


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
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"not JSON: {e}"
        raise WireError(msg) from e
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


BUILTIN = {
    "arroyo": Codec("arroyo", wire.decode, wire.encode),
    "raw": Codec("raw", _raw_decode, _raw_encode),
    "json": Codec("json", _json_decode, _json_encode),
}


def get_codec(name: str) -> Codec:
    """A built-in codec by name, or ``module:function`` (used for both directions)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        msg = f"unknown codec {name!r}: use arroyo, raw, json or module:function"
        raise ValueError(msg)
    func = getattr(importlib.import_module(module_name), attr)
    return Codec(name, func, func)
