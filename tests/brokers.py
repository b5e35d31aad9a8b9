"""What the broker tests share (Redis, RabbitMQ, NATS): a listener run in a thread
with what it delivers collected, and a run of awkward arrays for the codecs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Listener, PassThrough
from arroyo.testing import CollectingPublisher, compose


@contextmanager
def listening(listener: Listener) -> Iterator[CollectingPublisher]:
    """Run ``listener.start()`` in a thread, collecting what it delivers."""
    sink = CollectingPublisher()
    compose(listener, PassThrough(), sink)
    listener.setup()
    name = type(listener).__name__
    thread = threading.Thread(target=listener.start, name=name, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        listener.stop()
        thread.join(5)
        listener.close()
        assert not thread.is_alive(), f"{name}.start() did not return after stop()"


def arrays_run(**fourth: Any) -> list[Message]:
    """Run 3: arrays of several dtypes and byte orders, a strided view, a 0-d array, a
    dict payload (its event's metadata gains ``fourth``) and raw bytes."""
    rng = np.random.default_rng(3)
    big = rng.normal(size=(40, 30)).astype(">f8")
    return [
        Start(data={"detector": "pilatus", "sample": "LaB6"}, run=3),
        Event(metadata={"i": 0}, payload=rng.integers(0, 4000, (64, 64)).astype("<u2"), run=3),
        Event(metadata={"i": 1}, payload=big[::3, ::2], run=3, seq=1),  # not contiguous
        Event(metadata={"i": 2}, payload=np.array(2.5, dtype="<f4"), run=3, seq=2),  # 0-d
        Event(
            metadata={"i": 3, **fourth},
            payload={"image": rng.random((3, 5)).astype("c8"), "mask": np.zeros(3, "u1")},
            run=3,
            seq=3,
        ),
        Event(metadata={"i": 4}, payload=b"\x00raw\xff", run=3, seq=4),
        Stop(data={"frames": 5}, run=3, seq=5),
    ]
