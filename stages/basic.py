"""Small general-purpose operators."""

from __future__ import annotations

import random
import time
from typing import Annotated

import numpy as np

from arroyo.convert import Bounds
from arroyo.message import Event, Message
from arroyo.stage import Operator, Result
from stages.kernels import temporaries


class Delay(Operator):
    """Passes every message on after a random delay of ``min_ms``..``max_ms`` per event
    (simulates uneven work per frame)."""

    def __init__(
        self,
        min_ms: Annotated[float, Bounds(ge=0)] = 0.0,
        max_ms: Annotated[float, Bounds(ge=0)] = 1.0,
        seed: int | None = None,
    ) -> None:
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.rng = random.Random(seed)

    def process(self, message: Message) -> Result:
        if isinstance(message, Event):
            time.sleep(self.rng.uniform(self.min_ms, self.max_ms) / 1000)
        return message


class Decode(Operator):
    """Decodes an event's compressed arrays (a detector's bitshuffle-LZ4 frames,
    ``arroyo.message.Encoded``) here, so they travel on decoded. Without it a frame is
    decoded where user code first reads ``event.payload``; put it after the listener,
    with ``workers = N``, to decode in N processes for stages that cannot."""

    def process(self, message: Message) -> Result:
        if isinstance(message, Event):
            _ = message.payload  # reading it decodes it, once
        return message


class Scale(Operator):
    """Multiplies every array of an event's payload by ``factor`` (as float32)."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor

    def process(self, message: Message) -> Result:
        if isinstance(message, Event) and isinstance(message.payload, np.ndarray):
            payload = message.payload.astype(np.float32) * np.float32(self.factor)
            return Event(metadata=message.metadata, payload=payload)
        return message


class FailOn(Operator):
    """Raises on events whose ``metadata[key]`` is in ``values`` (fault injection)."""

    def __init__(self, values: tuple[int, ...] = (), key: str = "frame") -> None:
        self.values = set(values)
        self.key = key

    def process(self, message: Message) -> Result:
        if isinstance(message, Event) and message.metadata.get(self.key) in self.values:
            msg = f"injected failure on {self.key}={message.metadata[self.key]}"
            raise RuntimeError(msg)
        return message


class Burn(Operator):
    """A fixed amount of numpy work per event (for scaling benchmarks)."""

    def __init__(self, rounds: Annotated[int, Bounds(ge=0)] = 10) -> None:
        self.rounds = rounds

    def process(self, message: Message) -> Result:
        if isinstance(message, Event) and isinstance(message.payload, np.ndarray):
            a = message.payload.astype(np.float32)
            for _ in range(self.rounds):
                a = np.sqrt(a * a + 1.0)
            return Event(metadata={**message.metadata, "sum": float(a.sum())}, payload=None)
        return message


class Temporaries(Operator):
    """``rounds`` of ``np.sqrt(a * a + 1.0).sum()`` over a float64 copy of each event's
    array (``stages.kernels.temporaries``): numpy work with large temporaries, for the
    compute benchmark and the page-fault test. Emits the event's metadata plus ``sum``,
    without the payload."""

    def __init__(self, rounds: int = 12) -> None:
        self.rounds = rounds

    def process(self, message: Message) -> Result:
        if isinstance(message, Event) and isinstance(message.payload, np.ndarray):
            total = temporaries(message.payload, self.rounds)
            return Event(metadata={**message.metadata, "sum": total}, payload=None)
        return message


class Spin(Operator):
    """Spins in pure Python for ``seconds`` on the ``at``-th event this process gets
    (that event then carries ``spun_s``), and passes every message on: one long
    ``process()`` call that keeps the process busy (the GIL taken) without it being
    frozen."""

    def __init__(
        self, seconds: Annotated[float, Bounds(ge=0)] = 5.0, at: Annotated[int, Bounds(ge=1)] = 1
    ) -> None:
        self.seconds = seconds
        self.at = at
        self.events = 0

    def process(self, message: Message) -> Result:
        if not isinstance(message, Event):
            return message
        self.events += 1
        if self.events != self.at:
            return message
        end = time.monotonic() + self.seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return Event(metadata={**message.metadata, "spun_s": self.seconds}, payload=None)
