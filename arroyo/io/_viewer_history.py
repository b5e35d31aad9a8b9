"""Where the viewer looks back: the events of the last runs, by run and index.

The page steps through the *events* of a run as the viewer saw them, numbered from 0
in arrival order (``index``; with a ``pub`` tap that dropped some, it differs from
``seq``). The parts that arrive for one event from several inputs (the detector's
frame on one link, its radial profile from an operator on another, both with the same
run and seq) are one ``Slot``: the page shows its frame, its 1-D arrays and its
scalars together.

``History`` is the seam. ``Ring`` is the in-memory implementation the viewer fills as
it publishes; a second one (reading a recording folder written by
``arroyo.io.recording:Recorder``) only has to answer the same three questions. Its
slots hold payloads as they travelled: a compressed detector frame (``Encoded``)
stays compressed and is decoded only when a page asks to see it, on the server's
drawing thread.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from arroyo.message import Event, payload_nbytes


@dataclass(slots=True)
class Part:
    """One event as it arrived: its payload as held (compressed arrays stay so)."""

    metadata: dict[str, Any]
    payload: Any
    timestamp_ns: int
    when: float | None  # seconds since the viewer started (the series' time axis), or
    # None for an event from before it started (one read back from a recording)
    nbytes: int


@dataclass(slots=True)
class Slot:
    """One event of a run as the page shows it: the parts that share its run and seq."""

    run: int
    seq: int
    index: int  # its place among the run's events, from 0
    start: dict[str, Any]  # the run's Start data (units, geometry...), shared
    parts: list[Part] = field(default_factory=list)
    n: int = 0  # the viewer's frame number once a part holds a frame (0: none yet)
    gone: bool = False  # evicted from the ring

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass(frozen=True, slots=True)
class RunKept:
    """A run's range: events ``first .. count - 1`` can be shown (``first == count``:
    none any more)."""

    run: int
    first: int
    count: int


class History(Protocol):
    """What the viewer's server asks of a store of past events. Calls come from the
    server's thread while the stage's thread adds to it: answer quickly, never block
    on I/O for long (a recording reader should read one slot, not a run)."""

    def runs(self) -> list[RunKept]:
        """The runs that can be looked at, oldest first."""
        ...

    def slot(self, run: int, index: int) -> Slot | None:
        """Event ``index`` of ``run``, or None when it is not (or no longer) kept."""
        ...

    def describe(self) -> str:
        """What it holds, for a page asking for a frame it no longer has
        (``the ring holds the last 200 frames...``)."""
        ...


class _Run:
    __slots__ = ("by_seq", "count", "first", "last_gone_seq", "slots", "start")

    def __init__(self, start: dict[str, Any]) -> None:
        self.start = start
        self.slots: collections.deque[Slot] = collections.deque()
        self.by_seq: dict[int, Slot] = {}
        self.count = 0  # slots ever made for this run
        self.first = 0  # index of the oldest one still kept
        self.last_gone_seq = -1  # a late part for an evicted event is not kept again


class Ring:
    """The last events in memory, bounded three ways: at most ``keep_frames`` events,
    ``keep_bytes`` bytes of payload (as held: compressed frames count compressed) and
    ``keep_runs`` runs. The oldest go first.

    ``add`` is called by the stage's thread for every event (a few dict and deque
    operations under a lock no one holds for long); the server's thread reads."""

    def __init__(self, keep_frames: int, keep_bytes: int, keep_runs: int) -> None:
        self.keep_frames = keep_frames
        self.keep_bytes = keep_bytes
        self.keep_runs = keep_runs
        self.nbytes = 0
        self.events = 0  # slots kept now
        self.evicted = 0  # slots evicted so far
        self._runs: collections.OrderedDict[int, _Run] = collections.OrderedDict()
        self._order: collections.deque[Slot] = collections.deque()  # oldest first
        self._lock = threading.Lock()

    # -- the stage's thread ----------------------------------------------------------

    def start(self, run: int, data: dict[str, Any]) -> None:
        """A run begins: its Start data is what its slots' ``start`` holds, without
        arrays (a detector's pixel mask would weigh on the ring uncounted)."""
        data = {k: v for k, v in data.items() if not isinstance(v, np.ndarray)}
        with self._lock:
            kept = self._runs.get(run)
            if kept is None:
                self._runs[run] = _Run(data)
                self._trim()
            else:
                kept.start.update(data)

    def add(self, event: Event, when: float) -> Slot:
        """Keep ``event`` (call before anything reads ``event.payload``, which would
        decode a compressed one in place). Returns its slot, which may already have
        been evicted when the event is larger than the ring."""
        raw = event.raw_payload
        part = Part(event.metadata, raw, event.timestamp_ns, when, payload_nbytes(raw))
        with self._lock:
            kept = self._runs.get(event.run)
            if kept is None:
                kept = self._runs[event.run] = _Run({})
            slot = kept.by_seq.get(event.seq)
            if slot is None:
                slot = self._new_slot(kept, event)
            slot.parts.append(part)
            if not slot.gone:
                self.nbytes += part.nbytes
                self._trim()
        return slot

    def _new_slot(self, kept: _Run, event: Event) -> Slot:
        slot = Slot(event.run, event.seq, kept.count, kept.start)
        if event.seq <= kept.last_gone_seq:
            slot.gone = True  # its event was evicted already: shown live, not kept
            return slot
        kept.count += 1
        kept.slots.append(slot)
        kept.by_seq[event.seq] = slot
        self._order.append(slot)
        self.events += 1
        return slot

    def _trim(self) -> None:
        while len(self._runs) > self.keep_runs:
            _, kept = self._runs.popitem(last=False)
            for slot in kept.slots:
                self._forget(slot)  # its entry in _order is skipped when reached
        while self._order and (self.events > self.keep_frames or self.nbytes > self.keep_bytes):
            slot = self._order.popleft()
            if slot.gone:
                continue
            kept = self._runs[slot.run]
            kept.slots.popleft()  # per run, slots are evicted in the order they came
            kept.first = slot.index + 1
            kept.last_gone_seq = max(kept.last_gone_seq, slot.seq)
            del kept.by_seq[slot.seq]
            self._forget(slot)
        while self._order and self._order[0].gone:
            self._order.popleft()

    def _forget(self, slot: Slot) -> None:
        slot.gone = True
        self.events -= 1
        self.nbytes -= slot.nbytes
        self.evicted += 1

    # -- the server's thread ---------------------------------------------------------

    def runs(self) -> list[RunKept]:
        with self._lock:
            return [RunKept(r, k.first, k.count) for r, k in self._runs.items()]

    def slot(self, run: int, index: int) -> Slot | None:
        with self._lock:
            kept = self._runs.get(run)
            if kept is None or not kept.first <= index < kept.count:
                return None
            return kept.slots[index - kept.first]

    def describe(self) -> str:
        mib = self.keep_bytes / (1 << 20)
        return (
            f"the ring holds the last {self.keep_frames} frames, {mib:g} MiB, {self.keep_runs} runs"
        )
