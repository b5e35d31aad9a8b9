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
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

Payload: TypeAlias = bytes | np.ndarray | dict[str, np.ndarray] | None

# Stop.routing key a listener sets to what its outside source lost in the run, by
# reason (``{"images the detector stream lost": 3}``): the runtime carries it to every
# stage downstream, which reports the run incomplete with that count and reason.
LOST = "l"


class Encoded:
    """An array that travels as the compressed bytes it arrived in (a detector's
    bitshuffle-LZ4 frame) and is decoded the first time user code reads
    ``Event.payload``, in whichever process that is (``arroyo.io.compression``).

    ``dtype`` and ``shape`` describe the decoded array; ``data`` (any buffer) holds
    the compressed bytes; ``codec`` names how (``bslz4``, ``lz4``, ``bszstd``...).
    """

    __slots__ = ("codec", "data", "dtype", "shape")

    def __init__(self, codec: str, dtype: Any, shape: Any, data: Any) -> None:
        self.codec = codec
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self.data = data

    @property
    def nbytes(self) -> int:
        """The compressed size: what travels, and what credit and byte counters count."""
        return memoryview(self.data).nbytes

    @property
    def decoded_nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))

    def decode(self) -> np.ndarray:
        from arroyo.compression import decompress  # (bitshuffle/lz4: an optional extra)

        return decompress(self.codec, self.data, self.dtype, self.shape)

    def __repr__(self) -> str:
        return f"Encoded({self.codec!r}, {self.dtype.str!r}, {self.shape}, {self.nbytes} bytes)"


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

    def with_routing(self, routing: dict[str, Any]) -> Message:
        """A shallow copy with other ``routing`` (``dataclasses.replace`` would read an
        Event's payload, and so decode a compressed one)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.routing = routing
        return new

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
    payload: Payload = None  # a property after the class: decodes ``Encoded`` on first read

    @property
    def raw_payload(self) -> Any:
        """The payload as held, without decoding (``Encoded`` arrays stay compressed):
        what the wire format sends."""
        return self.__dict__["_payload"]

    @property
    def nbytes(self) -> int:
        """Size of the payload buffers in bytes (compressed ones as they travel)."""
        return payload_nbytes(self.__dict__["_payload"])


# The held payload lives in the instance dict as "_payload", with "_lazy" saying
# whether it still holds compressed arrays (checked once, when it is set).
def _get_payload(event: Event) -> Payload:
    held = event.__dict__
    payload = held["_payload"]
    if held["_lazy"]:
        if type(payload) is Encoded:
            payload = payload.decode()
        else:  # a dict holding compressed arrays
            payload = {k: v.decode() if type(v) is Encoded else v for k, v in payload.items()}
        held["_payload"], held["_lazy"] = payload, False
    return payload


def _set_payload(event: Event, payload: Any) -> None:
    held = event.__dict__
    held["_payload"] = payload
    held["_lazy"] = type(payload) is Encoded or (
        type(payload) is dict and any(type(v) is Encoded for v in payload.values())
    )


# Event's dataclass __init__ assigns ``self.payload``, which goes through the setter.
# (Hidden from type checkers, for which ``payload`` stays the plain field it reads as.)
if not TYPE_CHECKING:
    Event.payload = property(
        _get_payload, _set_payload, doc="The payload; a compressed one is decoded on first read."
    )


@dataclass(eq=False)
class Stop(Message):
    """A run ends. ``data`` is free-form; ``seq`` is the number of events emitted."""

    data: dict[str, Any] = field(default_factory=dict)


def frame_of(payload: Payload, array: str = "") -> np.ndarray | None:
    """The frame an operator works on: the payload when it is an array, else the dict's
    array named ``array``; None when there is none (the caller drops the event)."""
    if isinstance(payload, np.ndarray):
        return payload
    if isinstance(payload, dict) and array:
        found = payload.get(array)
        return found if isinstance(found, np.ndarray) else None
    return None


def payload_nbytes(payload: Any) -> int:
    if payload is None:
        return 0
    if isinstance(payload, np.ndarray | Encoded):
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
    return _data_equal(getattr(a, "data", None), getattr(b, "data", None))


def _data_equal(a: Any, b: Any) -> bool:
    """A Start's or Stop's data may hold arrays (a detector's pixel mask) at its top level."""
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
        return bool(a == b)
    for key, x in a.items():
        y = b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not _payload_equal(x, y):
                return False
        elif x != y:
            return False
    return True


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
