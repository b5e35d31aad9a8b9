"""The message model: a run is one ``Start``, any number of ``Event``\\ s, one ``Stop``.

Every message carries a run id and a sequence number. The runtime of the stage that
creates a run stamps them; stages downstream keep them, so a sink can tell which run
an event belongs to and whether the run arrived complete.

Sequence numbers inside a run: ``Start.seq == 0``, events are numbered ``0 .. n-1``
in the order the source emitted them, and ``Stop.seq == n``, the number of events the
source emitted for the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

Payload: TypeAlias = bytes | np.ndarray | dict[str, np.ndarray] | None


def _now_ns() -> int:
    return time.time_ns()


@dataclass(eq=False)
class Message:
    """Base of the three message kinds. ``run`` and ``seq`` are stamped by the runtime."""

    run: int = field(default=0, kw_only=True)
    seq: int = field(default=0, kw_only=True)
    timestamp_ns: int = field(default_factory=_now_ns, kw_only=True)
    # Runtime bookkeeping (origin, sender, worker set of a run); never user data.
    routing: dict[str, Any] = field(default_factory=dict, kw_only=True, repr=False)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return _fields_equal(self, other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


@dataclass(eq=False)
class Start(Message):
    """A run begins. ``data`` describes it (sample, exposure, detector geometry...)."""

    data: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Event(Message):
    """One frame of a run: ``metadata`` plus a payload of bytes or numpy array(s)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    payload: Payload = None

    @property
    def nbytes(self) -> int:
        """Size of the payload buffers in bytes."""
        return payload_nbytes(self.payload)


@dataclass(eq=False)
class Stop(Message):
    """A run ends. ``data`` is free-form; ``seq`` is the number of events emitted."""

    data: dict[str, Any] = field(default_factory=dict)


def payload_nbytes(payload: Payload) -> int:
    if payload is None:
        return 0
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, dict):
        return sum(int(a.nbytes) for a in payload.values())
    return len(payload)


def _payload_equal(a: Payload, b: Payload) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_payload_equal(a[k], b[k]) for k in a)
    return a == b


def _fields_equal(a: Message, b: Message) -> bool:
    if (a.run, a.seq, a.timestamp_ns) != (b.run, b.seq, b.timestamp_ns):
        return False
    if isinstance(a, Event) and isinstance(b, Event):
        return a.metadata == b.metadata and _payload_equal(a.payload, b.payload)
    return getattr(a, "data", None) == getattr(b, "data", None)


# Stop.data key an operator sets to the names of the data keys that count only its own
# worker's share of a run (ThresholdFilter: hits, misses). Where the Stops of a
# stage's workers meet, those keys are added up and the marker is removed, so the
# Stop downstream carries run totals, and a later merge does not add them again.
SHARES = "summed"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def add_up_shares(data: dict[str, Any], stops: list[Stop]) -> dict[str, Any]:
    """``data`` with each key the ``stops`` mark as a share replaced by their sum over
    all of them, and without the marker. Keys that are not numbers are left alone."""
    out = {k: v for k, v in data.items() if k != SHARES}
    names = {
        name
        for stop in stops
        if isinstance(stop.data.get(SHARES), list)
        for name in stop.data[SHARES]
        if isinstance(name, str) and name != SHARES
    }
    for name in names:
        values = [stop.data[name] for stop in stops if name in stop.data]
        if values and all(_number(v) for v in values):
            out[name] = sum(values)
    return out
