"""The send path's frame choices (``arroyo.runtime.link.send_frames``): small frames are
copied, large ones go zero-copy, and a payload that is a whole view of a received
frame is re-sent as that frame (libzmq's buffer, by reference)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from arroyo import wire
from arroyo.message import Event
from arroyo.runtime.link import COPY_BELOW, _received_frame, send_frames

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx: zmq.Context[Any] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    b.bind("inproc://send-frames")
    a.connect("inproc://send-frames")
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def _relay(a: zmq.Socket[Any], b: zmq.Socket[Any], message: Event) -> list[Any]:
    send_frames(a, wire.encode(message))
    assert b.poll(5000)
    return b.recv_multipart(copy=False)


def test_a_forwarded_payload_is_the_received_frame(pair) -> None:
    a, b = pair
    array = np.arange(COPY_BELOW, dtype="<u2").reshape(256, -1)
    frames = _relay(a, b, Event(metadata={"i": 1}, payload=array))
    decoded = wire.decode(frames)
    (buffer,) = wire.encode(decoded)[1:]
    assert _received_frame(buffer) is frames[1]
    # and through a second hop the bytes are unchanged
    again = wire.decode(_relay(a, b, decoded))
    np.testing.assert_array_equal(again.payload, array)


def test_part_of_a_received_frame_is_sent_as_it_is(pair) -> None:
    a, b = pair
    array = np.arange(COPY_BELOW, dtype="<u2")
    decoded = wire.decode(_relay(a, b, Event(payload=array)))
    part = Event(payload=decoded.payload[1:])
    (buffer,) = wire.encode(part)[1:]
    assert _received_frame(buffer) is buffer
    np.testing.assert_array_equal(wire.decode(_relay(a, b, part)).payload, array[1:])


def test_small_and_byte_payloads_round_trip(pair) -> None:
    a, b = pair
    for payload in (b"x" * 100, memoryview(b"y" * 300), np.ones(10, dtype="<f8")):
        got = wire.decode(_relay(a, b, Event(payload=payload))).payload
        assert bytes(memoryview(got)) == bytes(memoryview(payload))
