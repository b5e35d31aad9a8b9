"""EPICS PV Access: areaDetector frames in (``NTNDArray``), reduced results out.

    [stage:detector]
    role = listener
    class = arroyo.io.epics:PvaListener
    pv = 13SIM1:Pva1:Image          ; the PVA plugin's NTNDArray
    acquire_pv = 13SIM1:cam1:Acquire ; optional: runs follow the acquire state

    [stage:serve]
    role = publisher
    class = arroyo.io.epics:PvaPublisher
    image_pv = arroyo:reduced:image ; 2-D payloads, as an NTNDArray
    array_pv = arroyo:reduced:I     ; 1-D payloads, as an NTScalarArray

The listener monitors the PV and emits an ``Event`` per new array: the payload is
the array (shape: the dimensions reversed, C order), a compressed one (``lz4``,
``bslz4``) travels compressed (``arroyo.message.Encoded``) and is decoded in the
worker that reads it; ``blosc`` and ``jpeg`` are decoded here when their library is
installed. Metadata: ``uniqueId``, ``timestamp`` (seconds), ``dims`` (the
NTNDArray's dimension sizes, x first), ``codec``, ``attributes``, ``pv``. Runs and
losses follow ``arroyo.io._pva_frames.IdRuns`` (docs/epics.md).

pvapy calls the monitor back on its own threads: the callback only copies the
NTNDArray's fields (pvapy reuses the ``PvObject``) onto a bounded queue, and the
stage's main thread does everything else.
When the queue is full the callback waits (backpressure): pvAccess then stops
polling the channel, the server's monitor queue overruns, and the ``uniqueId``\\ s
it skipped are counted missing in the run. Nothing is dropped inside Arroyo.

The publisher is in ``_pva_publisher``.

pvapy is the optional extra ``arroyo[epics]``; without it ``setup`` raises
``ConfigError``. The network settings are pvAccess's ``EPICS_PVA_*`` variables.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._pva_frames import (
    IdRuns,
    acquiring,
    attributes,
    payload_of,
    require,
    shape_of,
    timestamp,
)
from arroyo.io._pva_publisher import PvaPublisher
from arroyo.io.guard import DecodeGuard, describe
from arroyo.io.retry import Backoff
from arroyo.message import Event, Message, Stop
from arroyo.stage import Listener

log = logging.getLogger("arroyo.io.epics")

__all__ = ["PvaListener", "PvaPublisher"]

WAIT_SECONDS = 0.2  # how often the main loop looks at the clock (idle runs, stop)
PUT_SECONDS = 0.5  # how long a waiting pvapy callback sleeps before it looks again
FIELDS_READ = ("uniqueId", "dimension", "codec", "attribute", "timeStamp", "value")


def _channel(pva: Any, name: str) -> Any:
    """A channel to ``name``; ``ca://NAME`` uses Channel Access (an IOC's acquire PV)."""
    if name.startswith("ca://"):
        return pva.Channel(name[5:], pva.CA)
    return pva.Channel(name.removeprefix("pva://"))


class PvaListener(Listener):
    """Emits the arrays of an ``NTNDArray`` PV as runs (see the module docstring).

    Options: ``pv``; ``acquire_pv`` (a PV whose value is nonzero while the detector
    acquires; ``ca://`` for Channel Access; empty: runs by ``uniqueId`` alone);
    ``max_gap`` (the most ``uniqueId``\\ s a run may skip, counted missing, before a
    jump starts a new run); ``idle_seconds`` (a run with no array for this long is
    closed; 0: never); ``acquire_grace`` (seconds after the acquire PV reads done
    that late arrays still join the run); ``queue_size`` (arrays waiting for the
    main thread, and pvAccess's own monitor queue); ``request`` (the pvRequest's
    fields).
    """

    def __init__(
        self,
        pv: str,
        acquire_pv: str = "",
        max_gap: Annotated[int, Bounds(ge=0)] = 1000,
        idle_seconds: Annotated[float, Bounds(ge=0)] = 10.0,
        acquire_grace: Annotated[float, Bounds(ge=0)] = 1.0,
        queue_size: Annotated[int, Bounds(ge=1)] = 16,
        request: str = "field()",
    ) -> None:
        if not pv.strip():
            msg = "pv: name the NTNDArray PV (the areaDetector PVA plugin's output)"
            raise ConfigError(msg)
        self.pv = pv.strip()
        self.acquire_pv = acquire_pv.strip()
        self.idle_seconds = idle_seconds
        self.acquire_grace = acquire_grace
        self.queue_size = queue_size
        self.request = request
        self.runs = IdRuns(max_gap)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(queue_size)
        self._closing = threading.Event()
        self._guard = DecodeGuard(f"PvaListener {self.pv}")
        self._channels: list[Any] = []
        self._last_array = 0.0
        self._acquiring = False
        self._done_at: float | None = None  # the acquire PV read done at
        self._new_run = False  # the acquire PV started one: the next array opens it
        self._connected = False
        self.counts: Counter[str] = Counter()
        self._overruns = 0

    def __repr__(self) -> str:
        return f"PvaListener(pv={self.pv!r})"

    # -- the stage's life -------------------------------------------------------------

    def setup(self) -> None:
        self._pva = require()

    def start(self) -> None:
        self._monitor(self.pv, self._on_array)
        if self.acquire_pv:
            self._monitor(self.acquire_pv, self._on_acquire, "field(value)")
        next_look = 0.0
        while not self.stopping:
            try:
                kind, item = self._queue.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                kind, item = "", None
            if kind == "array":
                self._array(item)
            elif kind == "connected":
                self._link(bool(item))
            elif kind == "acquire":
                self._acquire(bool(item))
            now = time.monotonic()
            self._maybe_close(now)
            if now >= next_look:
                next_look = now + 1.0
                self._overruns = self._monitor_overruns()
        self._boundaries(self.runs.close("listener stopped"))

    def stop(self) -> None:
        super().stop()
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(("", None))  # (wake the loop)

    def close(self) -> None:
        self._closing.set()
        for channel in self._channels:
            try:
                channel.stopMonitor()
            except Exception as e:  # (a channel that never connected)
                log.debug("PvaListener: stopping a monitor: %s", describe(e))
        self._channels.clear()

    def drops(self) -> dict[str, int]:
        return self._guard.drops()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "queued": self._queue.qsize(),
            "connected": int(self._connected),
            "monitor_overruns": self._overruns,
        }

    # -- pvapy's threads: hand over, nothing else -------------------------------------

    def _monitor(self, name: str, callback: Any, request: str = "") -> None:
        request = request or f"record[queueSize={self.queue_size}]{self.request}"
        backoff = Backoff(f"PvaListener: monitoring {name}")
        while not self.stopping:
            try:
                channel = _channel(self._pva, name)
                if name == self.pv:
                    channel.setConnectionCallback(self._on_connection)
                channel.monitor(callback, request)
            except Exception as e:  # (pvapy raises its own PvaException)
                time.sleep(backoff.failed(e))
                continue
            backoff.succeeded()
            self._channels.append(channel)
            return

    def _hand_over(self, kind: str, item: Any) -> None:
        """Called on pvapy's threads: wait while the queue is full (backpressure)."""
        try:
            self._queue.put_nowait((kind, item))
            return
        except queue.Full:
            self.counts["waits"] += 1  # (a Counter's += is one bytecode on the GIL'd dict)
        while not self._closing.is_set():
            try:
                self._queue.put((kind, item), timeout=PUT_SECONDS)
                return
            except queue.Full:
                continue

    def _on_array(self, pv_object: Any) -> None:
        # pvapy reuses the PvObject once the callback returns: take the fields now
        # (plain Python values; the pixels a view that keeps pvData's own buffer)
        try:
            frame = {field: pv_object[field] for field in FIELDS_READ}
        except Exception as e:  # not an NTNDArray: the main thread counts it
            frame = {"error": describe(e)}
        self._hand_over("array", frame)

    def _on_connection(self, connected: bool) -> None:
        self._hand_over("connected", connected)

    def _on_acquire(self, pv_object: Any) -> None:
        try:
            value = acquiring(pv_object["value"])
        except Exception as e:  # a PV of another shape: say so once, read it as 0
            log.warning("PvaListener: %s: %s", self.acquire_pv, describe(e))
            value = False
        self._hand_over("acquire", value)

    # -- the main thread --------------------------------------------------------------

    def _array(self, frame: dict[str, Any]) -> None:
        if "error" in frame:
            self._guard.drop("bad_ntndarray", frame["error"])
            return
        try:
            uid = int(frame["uniqueId"])
            shape = shape_of(frame)
        except Exception as e:  # not an NTNDArray at all
            self._guard.drop("bad_ntndarray", describe(e))
            return
        if not shape:
            self.counts["empty"] += 1  # (a record's initial value, before any image)
            return
        if self._new_run:
            self._new_run = False
            self._boundaries(self.runs.close("acquire started"))
        admitted = self.runs.admit(uid, {"pv": self.pv})
        if isinstance(admitted, str):
            self.counts["repeats"] += 1  # (the PV's value sent again on reconnect)
            return
        self._boundaries(admitted)
        self._last_array = time.monotonic()
        events = self._guard.decode(self._event, frame, uid, shape)
        if not events:
            self.runs.undecoded += 1
            return
        self.runs.events += 1
        self.counts["arrays"] += 1
        for message in events:
            self.deliver(message)

    def _boundaries(self, messages: list[Message]) -> None:
        """Deliver a run's Start or Stop; a Stop is logged with what the run got."""
        for message in messages:
            if isinstance(message, Stop):
                d = message.data
                log.info(
                    "PvaListener: %s: run closed (%s): %d arrays, %d uniqueIds skipped, "
                    "%d undecoded",
                    self.pv,
                    d["closed_by"],
                    d["arrays_received"],
                    d["skipped_uniqueIds"],
                    d["undecoded_arrays"],
                )
            self.deliver(message)

    def _event(self, frame: Any, uid: int, shape: tuple[int, ...]) -> Message:
        payload, codec = payload_of(frame, shape)
        metadata = {
            "uniqueId": uid,
            "timestamp": timestamp(frame),
            "dims": list(reversed(shape)),
            "codec": codec or str(frame["codec"]["name"] or ""),
            "attributes": attributes(frame),
            "pv": self.pv,
        }
        return Event(metadata=metadata, payload=payload)

    def _link(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            self.counts["connects"] += 1
            log.info("PvaListener: %s connected", self.pv)
        else:
            self.counts["disconnects"] += 1
            log.warning("PvaListener: %s disconnected; pvAccess reconnects", self.pv)

    def _acquire(self, acquiring: bool) -> None:
        if acquiring and not self._acquiring:
            self._new_run = True
            self._done_at = None
        elif not acquiring and self._acquiring:
            self._done_at = time.monotonic()
        self._acquiring = acquiring

    def _maybe_close(self, now: float) -> None:
        if not self.runs.open:
            return
        why = ""
        if self._done_at is not None and now - max(self._done_at, self._last_array) > (
            self.acquire_grace
        ):
            why, self._done_at = "acquire done", None
        elif (
            self.idle_seconds
            and not self._acquiring
            and now - self._last_array > (self.idle_seconds)
        ):
            why = "idle"
        if why:
            self._boundaries(self.runs.close(why))

    def _monitor_overruns(self) -> int:
        for channel in self._channels[:1]:
            try:
                return int(channel.getMonitorCounters().get("nOverruns", 0))
            except Exception:  # (pvapy builds without the counters)
                return self._overruns
        return self._overruns
