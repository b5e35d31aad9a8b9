"""Wire format version 2 (docs/wire-format.md §9): compressed buffers that travel as
they came, small buffers inside the header frame, arrays in a Start's data; and
version 1 still read."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from arroyo import wire
from arroyo.compression import compress
from arroyo.errors import WireError
from arroyo.message import Encoded, Event, Start, Stop
from tests.conftest import need_detectors

need_detectors()

pytestmark = pytest.mark.timeout(60)


FRAME = (np.arange(64 * 48, dtype="<u2") % 97).reshape(64, 48)


def header_of(frames: list[Any]) -> dict[str, Any]:
    return msgpack.unpackb(bytes(memoryview(frames[0]).cast("B")))


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


@pytest.mark.parametrize(
    "payload",
    [b"x" * 100, np.arange(10, dtype=">f4"), {"a": np.zeros(3, "u1"), "b": np.ones((2, 2))}],
    ids=["bytes", "array", "dict"],
)
def test_a_small_payload_rides_in_the_header_frame(payload: Any) -> None:
    event = Event(metadata={"i": 1}, payload=payload, run=3, seq=4)
    frames = wire.encode(event)
    assert len(frames) == 1
    header = header_of(frames)
    assert header["v"] == 2 and len(header["d"]) == len(header["b"])
    assert wire.decode(as_bytes(frames)) == event


def test_a_payload_above_the_inline_limit_keeps_its_frame_and_version_1() -> None:
    event = Event(payload=np.zeros(wire.INLINE_MAX + 1, "u1"))
    frames = wire.encode(event)
    assert len(frames) == 2 and header_of(frames)["v"] == 1
    assert wire.decode(as_bytes(frames)) == event


@pytest.mark.parametrize("codec", ["bslz4", "bslz4-bare", "lz4", "bszstd", "lz4-block", "none"])
def test_a_compressed_frame_travels_compressed_and_decodes_on_first_read(codec: str) -> None:
    packed = compress(codec, FRAME)
    event = Event(
        metadata={"image_id": 0}, payload=Encoded(codec, FRAME.dtype, FRAME.shape, packed)
    )
    frames = wire.encode(event)
    header = header_of(frames)
    if len(packed) > wire.INLINE_MAX:
        assert len(frames) == 2 and bytes(memoryview(frames[1])) == packed
    assert header["v"] == 2 and header["b"] == [[None, "<u2", [64, 48], codec]]
    decoded = wire.decode(as_bytes(frames))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.raw_payload, Encoded)  # nothing decoded yet
    np.testing.assert_array_equal(decoded.payload, FRAME)
    assert isinstance(decoded.raw_payload, np.ndarray)  # decoded once, kept


def test_a_forwarded_compressed_frame_is_not_decoded_again() -> None:
    packed = compress("bslz4", FRAME)
    event = Event(payload={"c0": Encoded("bslz4", "<u2", FRAME.shape, packed), "c1": FRAME})
    first = wire.decode(as_bytes(wire.encode(event)))
    again = wire.encode(first)  # a stage that never read the payload sends it on
    assert bytes(memoryview(again[1])) == packed
    assert header_of(again)["b"][0][3] == "bslz4"
    assert first.nbytes == len(packed) + FRAME.nbytes


def test_start_arrays_travel_as_buffers_and_come_back_by_name() -> None:
    mask = np.zeros((300, 200), "<u4")
    mask[5, 7] = 1
    start = Start(data={"pixel_mask": mask, "energy": 8000.0, "flat": np.ones(4, "<f4")}, run=2)
    frames = wire.encode(start)
    header = header_of(frames)
    assert header["v"] == 2 and header["m"] == {"energy": 8000.0}
    back = wire.decode(as_bytes(frames))
    assert isinstance(back, Start) and back == start
    np.testing.assert_array_equal(back.data["pixel_mask"], mask)


def test_a_compressed_start_array_is_decoded_on_arrival() -> None:
    packed = compress("bslz4", FRAME)
    start = Start(data={"flatfield": Encoded("bslz4", "<u2", FRAME.shape, packed)})
    back = wire.decode(as_bytes(wire.encode(start)))
    np.testing.assert_array_equal(back.data["flatfield"], FRAME)


def test_version_1_messages_are_still_read() -> None:
    head = {"v": 1, "k": "E", "r": 1, "q": 0, "t": 5, "m": {}, "p": 2, "b": [[None, "<u2", [2]]]}
    event = wire.decode([msgpack.packb(head), b"\x01\x00\x02\x00"])
    np.testing.assert_array_equal(event.payload, [1, 2])
    stop = wire.decode([msgpack.packb({"v": 1, "k": "T", "r": 1, "q": 1, "t": 0, "m": {}})])
    assert isinstance(stop, Stop)


def _event(**fields: Any) -> dict[str, Any]:
    return {"v": 2, "k": "E", "r": 1, "q": 0, "t": 0, "m": {}, "p": 2, **fields}


@pytest.mark.parametrize(
    ("header", "extra", "reason"),
    [
        ({"v": 1, "b": [[None, "<u2", [2], "bslz4"]]}, [b"1234"], "malformed"),  # v1 has 3
        (_event(b=[[None, "<u2", [2], "zip"]]), [b"1234"], "encoding"),
        (_event(b=[[None, "<u2", [2], ["bslz4"]]]), [b"1234"], "encoding"),
        (_event(b=[[None, "<u2", [2]]], d=[b"1234"]), [b"1234"], "frames"),
        (_event(b=[[None, "<u2", [2]]], d=[b"12", b"34"]), [], "malformed"),
        (_event(b=[[None, "<u2", [2]]], d=["1234"]), [], "malformed"),
        (_event(b=[[None, "<u2", [2]]], d=[b"123"]), [], "size"),
        ({"v": 2, "k": "S", "m": {"a": 1}, "b": [["a", "<u1", [1]]], "d": [b"1"]}, [], "malformed"),
        ({"v": 1, "k": "S", "m": {}, "b": [["a", "<u2", [2]]]}, [b"1234"], "frames"),
    ],
    ids=["v1-codec", "unknown-codec", "codec-not-str", "inline-and-frame", "inline-count",
         "inline-not-bin", "inline-size", "start-array-shadows-data", "v1-start-buffers"],
)  # fmt: skip
def test_malformed_version_2_is_refused_with_its_reason(
    header: dict[str, Any], extra: list[bytes], reason: str
) -> None:
    header = {"k": "E", "r": 1, "q": 0, "t": 0, "m": {}, "p": 2, **header}
    with pytest.raises(WireError) as info:
        wire.decode([msgpack.packb(header), *extra])
    assert info.value.reason == reason, str(info.value)


def test_a_corrupt_compressed_frame_fails_where_it_is_read_with_a_reason() -> None:
    packed = bytearray(compress("bslz4", FRAME))
    packed[20:40] = b"\xff" * 20
    event = wire.decode(
        as_bytes(wire.encode(Event(payload=Encoded("bslz4", "<u2", FRAME.shape, packed))))
    )
    with pytest.raises(WireError) as info:
        _ = event.payload
    assert info.value.reason == "undecodable"


def test_a_compressed_frame_cannot_declare_a_bomb() -> None:
    head = _event(b=[[None, "<u2", [2**20, 2**12], "bslz4"]])
    event = wire.decode([msgpack.packb(head), b"\x00" * 64])
    with pytest.raises(WireError) as info:
        _ = event.payload
    assert info.value.reason == "size"
