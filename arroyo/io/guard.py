"""The one guard between foreign input and a stage: whatever goes wrong while decoding
what the outside world sent is a counted drop, never a crash.

Every connector that turns outside bytes into messages calls its decode through a
``DecodeGuard``: the ZMQ codecs, Redis, and the connectors to come (detector streams,
brokers, EPICS). A listener that let one exception out of ``start()`` would exit and
be restarted, losing what its peer had queued behind the bad message; a Redis stream
entry that crashed it would be read again and crash it again, for ever.

    guard = DecodeGuard(f"zmq listener {endpoint} (json codec)")
    for message in guard.decode(codec.decode, frames):
        self.deliver(message)
    ...
    def drops(self):
        return guard.drops()

Foreign JSON is parsed with ``loads_json``, which refuses nesting deeper than
``MAX_DEPTH`` before the parser starts (Python's parser recurses, and a header nested
100,000 deep exhausts the interpreter's stack). msgpack's C unpacker keeps its own
stack of 1024 levels and never recurses; ``arroyo.wire`` counts deeper input as
``too_deep`` too, and the guard holds what it decodes to the same ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from arroyo import wire
from arroyo.errors import WireError
from arroyo.io.retry import DropCount
from arroyo.message import Event, Message

#: Deepest nesting of lists and maps accepted from the outside world (the outermost
#: object is level 1). Far beyond any header a detector or a LabVIEW program sends,
#: and far below where a recursive parser or msgpack's packer gives up.
MAX_DEPTH = 64
_CONTAINERS = (dict, list, tuple)
_WHY_CHARS = 200  # an exception's text can quote the whole value; a log line should not


class DecodeGuard:
    """Runs one connector's decodes and counts what they drop, by reason.

    Contract:

    - ``decode(function, *args)`` calls ``function(*args)`` and returns the messages
      it made as a list: a Message, an iterable of Messages, or None (nothing) are
      all accepted. Each message is then checked: its metadata/data and routing are
      nested at most ``MAX_DEPTH`` deep, and ``arroyo.wire`` can encode it, so the
      link to the next stage will carry it.
    - Any ``Exception`` on the way, raised by ``function`` or by the checks, is a drop:
      counted once under its reason, logged, and ``decode`` returns ``[]`` (one
      foreign message is one drop, even when it would have made several). Nothing
      propagates but ``BaseException``\\ s that are not ``Exception`` (a
      KeyboardInterrupt, a SystemExit).
    - Reasons: a ``WireError``'s own ``reason`` (``frame_size``, ``bad_header``, ...;
      its default ``malformed`` is counted as ``undecodable``); ``too_deep`` for input
      nested beyond ``MAX_DEPTH`` and for any ``RecursionError``; ``unencodable`` for
      a value the wire cannot carry (an integer outside -2**63 .. 2**64-1, a string
      that is not valid Unicode, an object msgpack does not know); ``undecodable`` for
      every other exception.
    - ``drop(reason, why)`` counts a drop the connector found itself (an entry
      without its field, say), so one counter holds all of them.
    - Logging (``arroyo.io``): the first drop of each reason is one warning line, then
      one line per 1000 of that reason; never a traceback.
    - ``drops()`` is what the connector's ``drops()`` returns: a new dict of counts
      by reason, cheap enough for the stats thread to read every second.
    - Not thread-safe: one guard per thread that decodes.
    """

    def __init__(self, name: str) -> None:
        self.counter = DropCount(name)

    def decode(self, function: Callable[..., Any], *args: Any) -> list[Message]:
        try:
            messages = _as_messages(function(*args))
            for message in messages:
                check_carriable(message)
        except Exception as e:  # foreign input must never stop a stage: count it
            self.drop(reason_of(e), describe(e))
            return []
        return messages

    def drop(self, reason: str, why: str, n: int = 1) -> None:
        self.counter.add(n, reason, why)

    @property
    def total(self) -> int:
        return self.counter.total

    def drops(self) -> dict[str, int]:
        return dict(self.counter.by_reason)


def reason_of(error: Exception) -> str:
    """The drop reason for an exception raised while decoding (see ``DecodeGuard``)."""
    if isinstance(error, RecursionError):
        return "too_deep"
    if isinstance(error, WireError):
        if error.reason == "encode":
            return "unencodable"
        return "undecodable" if error.reason == "malformed" else error.reason
    return "undecodable"


def describe(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _WHY_CHARS else text[:_WHY_CHARS] + "..."


def _as_messages(result: Any) -> list[Message]:
    if result is None:
        return []
    if isinstance(result, Message):
        return [result]
    if not isinstance(result, Iterable):
        msg = f"a decode returned {type(result).__name__}, not a Message, a list or None"
        raise TypeError(msg)
    messages = list(result)
    for m in messages:
        if not isinstance(m, Message):
            msg = f"a decode returned a {type(m).__name__} among its messages"
            raise TypeError(msg)
    return messages


def check_carriable(message: Message) -> None:
    """Raise ``WireError`` unless the link to the next stage can carry ``message``:
    ``too_deep`` beyond ``MAX_DEPTH``, ``encode`` for what msgpack cannot hold. (This
    encodes the message once more; its buffers are not copied when contiguous.)"""
    values = message.metadata if isinstance(message, Event) else message.data  # type: ignore[attr-defined]
    check_depth(values)
    check_depth(message.routing)
    wire.encode(message)


def check_depth(value: Any) -> None:
    """Raise ``WireError`` (``too_deep``) if ``value`` nests lists, tuples and dicts
    more than ``MAX_DEPTH`` deep. Level by level, without recursion. (Map keys are not
    walked: JSON's are strings, and msgpack refuses arrays as keys.)"""
    level = [value] if value and isinstance(value, _CONTAINERS) else []
    for _ in range(MAX_DEPTH):
        if not level:
            return
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, _CONTAINERS)
        ]
    if level:
        msg = f"nested deeper than {MAX_DEPTH} levels"
        raise WireError(msg, reason="too_deep")


# -- foreign JSON ----------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as int8


def loads_json(raw: bytes, reason: str = "malformed") -> Any:
    """Foreign JSON, parsed only if it nests at most ``MAX_DEPTH`` deep.

    Raises ``WireError``: ``too_deep`` (found before parsing, so the recursive parser
    never sees it), or ``reason`` when ``raw`` is not JSON."""
    json_depth_ok(raw)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"not JSON: {e}"
        raise WireError(msg, reason=reason) from e


def json_depth_ok(raw: bytes) -> None:
    """Raise ``WireError`` (``too_deep``) if the JSON text ``raw`` opens more than
    ``MAX_DEPTH`` brackets at once, not counting brackets inside strings."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:  # the common case, at C speed
        return
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    steps = np.frombuffer(brackets.translate(_STEPS), dtype=np.int8)
    if steps.size and int(np.cumsum(steps, dtype=np.int64).max()) > MAX_DEPTH:
        msg = f"JSON nested deeper than {MAX_DEPTH} levels"
        raise WireError(msg, reason="too_deep")
