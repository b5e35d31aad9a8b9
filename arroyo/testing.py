"""In-memory doubles for testing a stage without sockets or processes.

    from arroyo.testing import run_operator, make_run
    out = run_operator(MyOperator(threshold=3), make_run(frames=10, shape=(4, 4)))

``ListListener`` and ``CollectingPublisher`` wire a whole Listener -> Operator ->
Publisher chain in one process, the same way ``arroyo-stage`` does with ZMQ link ends.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Listener, Operator, PassThrough, Publisher


class ListListener(Listener):
    """Delivers a fixed list of messages, then returns from ``start``."""

    def __init__(self, messages: Iterable[Message]) -> None:
        self.messages = list(messages)

    def start(self) -> None:
        for message in self.messages:
            if self.stopping:
                return
            self.deliver(message)


class CollectingPublisher(Publisher):
    """Keeps every published message in ``messages`` (in order)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def publish(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def events(self) -> list[Event]:
        return [m for m in self.messages if isinstance(m, Event)]


def make_run(
    frames: int,
    shape: tuple[int, ...] = (4, 4),
    dtype: str = "uint16",
    run: int = 1,
    data: dict | None = None,
) -> list[Message]:
    """One stamped run: Start, ``frames`` events with arrays of ``shape``, Stop."""
    rng = np.random.default_rng(run)
    messages: list[Message] = [Start(data=dict(data or {}), run=run, seq=0)]
    for i in range(frames):
        array = rng.integers(0, 1000, size=shape).astype(dtype)
        messages.append(Event(metadata={"frame": i}, payload=array, run=run, seq=i))
    messages.append(Stop(data={}, run=run, seq=frames))
    return messages


def compose(
    listener: Listener, operator: Operator | None = None, *publishers: Publisher
) -> Listener:
    """Wire listener -> operator -> publishers (the single-process deployment)."""
    operator = operator or PassThrough()
    for publisher in publishers:
        operator.add_publisher(publisher)
    listener.set_operator(operator)
    return listener


def run_chain(listener: Listener, operator: Operator, *publishers: Publisher) -> None:
    """Run a composed chain to completion, calling every setup/close hook in order."""
    compose(listener, operator, *publishers)
    for publisher in publishers:
        publisher.setup()
    operator.setup()
    listener.setup()
    try:
        listener.start()
    finally:
        listener.close()
        operator.close()
        for publisher in publishers:
            publisher.close()


def run_operator(operator: Operator, messages: Iterable[Message]) -> list[Message]:
    """Feed ``messages`` through ``operator``; return everything it published."""
    sink = CollectingPublisher()
    run_chain(ListListener(messages), operator, sink)
    return sink.messages
