"""The decode guard every connector shares (arroyo/io/guard.py): any exception while
decoding foreign input is one counted drop by reason, nesting is bounded before the
JSON parser recurses, and the log stays one line per reason."""

from __future__ import annotations

import json
import logging
from typing import Any

import msgpack
import numpy as np
import pytest

from arroyo import wire
from arroyo.errors import WireError
from arroyo.io.codecs import CodecName, get_codec
from arroyo.io.guard import MAX_DEPTH, DecodeGuard, loads_json
from arroyo.message import Event, Start


def nested_json(depth: int) -> bytes:
    return b'{"a": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


def nested_msgpack_header(depth: int) -> bytes:
    """An Arroyo wire header whose metadata nests ``depth`` levels (the map is one)."""
    head = msgpack.packb({"v": 1, "k": "E", "p": 0})
    # one more pair in the outer map: "m" -> {"a": [[...]]}
    inner = b"\x81\xa1a" + b"\x91" * (depth - 1) + b"\x01"
    return bytes([head[0] + 1]) + head[1:] + b"\xa1m" + inner


def test_json_deeper_than_the_bound_is_refused_before_parsing():
    assert loads_json(nested_json(MAX_DEPTH))["a"]
    for depth in (MAX_DEPTH + 1, 100_000):
        with pytest.raises(WireError) as info:
            loads_json(nested_json(depth))
        assert info.value.reason == "too_deep"
    # brackets inside strings, escaped quotes included, do not nest
    text = b'{"a": "\\"' + b"[" * 1000 + b'", "b": "{{{"}'
    assert loads_json(text)["b"] == "{{{"
    with pytest.raises(WireError) as info:
        loads_json(b"{not json", reason="bad_header")
    assert info.value.reason == "bad_header"


def test_every_exception_is_a_drop_by_reason():
    guard = DecodeGuard("test")

    def recurse(n: int) -> Any:
        return recurse(n + 1)

    header = get_codec("header").decode
    cases: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("too_deep", header, ([nested_json(100_000)],)),
        ("too_deep", wire.decode, ([nested_msgpack_header(MAX_DEPTH + 1)],)),
        ("too_deep", wire.decode, ([nested_msgpack_header(100_000)],)),  # msgpack's own stack
        ("too_deep", recurse, (0,)),  # a RecursionError from a user's codec
        ("unencodable", header, ([b'{"big": 18446744073709551616}'],)),  # 2**64
        ("unencodable", header, ([b'{"small": -9223372036854775809}'],)),  # -2**63 - 1
        ("unencodable", get_codec("json").decode, ([b'{"s": "\\udc00"}'],)),
        ("unencodable", lambda: Event(metadata={"when": object()}), ()),
        ("bad_header", header, ([b"[1, 2]"],)),
        ("frame_size", header, ([b'{"dtype": "<u2", "shape": [4]}', b"\x00" * 7],)),
        ("undecodable", get_codec("json").decode, ([b"\xff\xfe garbage"],)),
        ("undecodable", lambda: 1 / 0, ()),
        ("undecodable", lambda: 5, ()),  # not a message
        ("undecodable", lambda: [Start(), "text"], ()),
    ]
    for reason, function, args in cases:
        before = guard.drops().get(reason, 0)
        assert guard.decode(function, *args) == [], reason
        assert guard.drops()[reason] == before + 1, (reason, guard.drops())
    assert guard.total == len(cases)


def test_good_input_passes_unchanged():
    guard = DecodeGuard("test")
    frame = np.arange(6, dtype="<u2").reshape(2, 3)
    header = json.dumps({"dtype": "<u2", "shape": [2, 3], "deep": json.loads(nested_json(63))})
    (event,) = guard.decode(get_codec("header").decode, [header.encode(), frame.tobytes()])
    assert np.array_equal(event.payload, frame) and event.metadata["deep"]
    assert guard.decode(wire.decode, [nested_msgpack_header(MAX_DEPTH)])[0].metadata["a"]
    assert guard.decode(lambda: None) == []
    assert len(guard.decode(lambda: [Start(), Event()])) == 2
    assert guard.drops() == {}


def test_a_flood_logs_one_line_per_reason_and_thousand(caplog):
    guard = DecodeGuard("flood")
    with caplog.at_level(logging.WARNING, logger="arroyo.io"):
        for _ in range(2500):
            guard.decode(loads_json, nested_json(MAX_DEPTH + 1))
        guard.decode(loads_json, b"not json")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # too_deep: 1st, 1000th, 2000th; undecodable: 1st
    assert lines[0].startswith("flood: dropped 1 (too_deep): WireError: JSON nested deeper")
    assert "(2000 too_deep so far, 2000 in all)" in lines[2]
    assert lines[3].startswith("flood: dropped 1 (undecodable):")
    assert not any(r.exc_info for r in caplog.records)
    assert guard.drops() == {"too_deep": 2500, "undecodable": 1}


def test_codec_names_are_checked():
    for good in ("arroyo", "raw", "json", "header", "array", "json:loads"):
        CodecName().validate(good)
    for bad, text in [
        ("nosuch", "unknown codec: use arroyo, raw"),
        ("no_such_module:f", "cannot import codec no_such_module:f: ModuleNotFoundError"),
        ("json:no_such_function", "cannot import codec json:no_such_function: AttributeError"),
        ("json:__doc__", "codec json:__doc__ is not a function"),
    ]:
        with pytest.raises(ValueError, match=text):
            CodecName().validate(bad)
        with pytest.raises(ValueError, match=text):
            get_codec(bad)
