"""Runs into Tiled: one container per run, its events as arrays and a table.

    [stage:tiled]
    role = publisher
    class = arroyo.io.tiled:TiledWriter
    input = reduce
    url = http://127.0.0.1:8000     ; the Tiled server (api_key = ..., else $TILED_API_KEY)
    node =                          ; a container under which runs go (empty: the root)

Each run is a container ``run_NNNNN`` (``run_NNNNN-2``... when the name is taken) with
the Start's JSON-able data as metadata (``start``). The run's first event decides the
layout: an array payload is the array ``data``; a dict payload one array per name.
Each is ``(n, *shape)``, preallocated when the Start says how many events
(``count_key``), else grown batch by batch. Scalars (``seq``, ``timestamp_ns`` and the
first event's numeric metadata) are rows of the appendable table ``events``. At Stop
the container's metadata gets ``stop`` and the completeness (docs/tiled.md).

The HTTP runs in a writer thread: ``publish`` only queues (and blocks only when
``queue_mb`` are waiting: backpressure). Events go in batches, bounded by
``batch_mb`` and by ``batch_seconds``. A failing server is retried with backoff
(``arroyo.io.retry``); what the writer gives up on after ``give_up_seconds`` is
counted in ``drops()`` by reason and recorded in the run's metadata when it can be.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._nexus_layout import stop_attrs
from arroyo.io.retry import Backoff, DropCount
from arroyo.message import LOST, Event, Message, Start, Stop
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.io.tiled")

EXTRA = "pip install 'arroyo[tiled]'"
CHUNK_BYTES = 4 << 20  # about this much per chunk along the event axis
JSON_ITEMS = 10_000  # a Start array larger than this is not copied into the metadata
_DONE = object()


class GiveUp(Exception):
    """An operation the writer stopped retrying; ``reason`` is its drop reason."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def require() -> Any:
    """The Tiled client (``from_uri``), or ``ConfigError`` naming the extra."""
    # Our own backoff retries; tiled's would hold the writer ~25 s per request. Unless
    # the user set it, one attempt (tiled reads the variable once, at import).
    own_retries = "TILED_RETRY_ATTEMPTS" not in os.environ
    if own_retries:
        os.environ["TILED_RETRY_ATTEMPTS"] = "1"
    try:
        import pyarrow  # noqa: F401  (the table's rows)
        from tiled.client import from_uri, utils
    except ImportError as e:
        msg = f"Tiled: {e.name or e} is not installed: {EXTRA}"
        raise ConfigError(msg) from e
    if own_retries:  # (imported before us, in --inline mode say)
        utils.TILED_RETRY_ATTEMPTS = 1
    # httpx logs every request at INFO: a line per request would bury the stage's log
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
    return from_uri


def jsonable(value: Any) -> Any:
    """``value`` as JSON types, or None for what has no small JSON form."""
    if isinstance(value, dict):
        out = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= JSON_ITEMS else None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _arrays(event: Event) -> dict[str, np.ndarray]:
    payload = event.payload
    if isinstance(payload, np.ndarray):
        return {"data": payload}
    if isinstance(payload, dict):
        return {str(k): np.asarray(v) for k, v in payload.items()}
    return {}


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | bool | np.integer | np.floating | np.bool_)


class _Run:
    """What the writer knows of one run's container."""

    def __init__(self, run: int, start: Start | None, count_key: str) -> None:
        self.run = run
        self.start = start
        count = start.data.get(count_key) if start is not None else None
        self.count = count if isinstance(count, int) and count > 0 else 0
        self.node: Any = None  # the container client, once made
        self.key = ""
        self.arrays: dict[str, Any] = {}  # name -> array client
        self.allocated: dict[str, int] = {}  # name -> rows the array has
        self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.columns: list[str] | None = None  # the table's metadata keys
        self.table: Any = None
        self.received = self.written = self.table_rows = 0
        self.dropped: Counter[str] = Counter()


class TiledWriter(Publisher):
    """Writes each run to a Tiled container (see the module's docstring).

    Options: ``url`` of the server; ``api_key`` (empty: the environment's
    ``TILED_API_KEY``; never logged); ``node``: path of the container runs go in;
    ``count_key``: the Start key giving the number of events (arrays preallocated);
    ``batch_mb``/``batch_seconds``: a batch is written when this much is waiting or
    this long after its first event; ``queue_mb``: ``publish`` blocks beyond this;
    ``give_up_seconds``: how long one write is retried before it is dropped.
    """

    def __init__(
        self,
        url: str,
        api_key: str = "",
        node: str = "",
        count_key: str = "frames",
        batch_mb: Annotated[float, Bounds(gt=0)] = 8.0,
        batch_seconds: Annotated[float, Bounds(gt=0)] = 0.5,
        queue_mb: Annotated[float, Bounds(gt=0)] = 256.0,
        give_up_seconds: Annotated[float, Bounds(ge=0)] = 60.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            msg = f"url must start with http:// or https://, got {url!r}"
            raise ValueError(msg)
        for name, value in (("batch_mb", batch_mb), ("batch_seconds", batch_seconds)):
            if value <= 0:
                msg = f"{name} must be > 0, got {value!r}"
                raise ValueError(msg)
        self.url, self.node_path, self.count_key = url, node.strip("/"), count_key
        self._api_key = api_key  # (never in a log line or an error message)
        self.batch_bytes = int(batch_mb * 2**20)
        self.batch_seconds = batch_seconds
        self.queue_bytes = int(queue_mb * 2**20)
        self.give_up_seconds = give_up_seconds
        self.counts: Counter[str] = Counter()
        self.dropped = DropCount("TiledWriter")
        self._queue: queue.Queue[Any] = queue.Queue()
        self._room = threading.Condition()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self._root: Any = None
        self._failing_since: float | None = None
        self._runs: dict[int, _Run] = {}

    def __repr__(self) -> str:  # (no api_key in any traceback or log)
        return f"TiledWriter(url={self.url!r}, node={self.node_path!r})"

    # -- the stage's thread ---------------------------------------------------------

    def setup(self) -> None:
        self._from_uri = require()
        self._thread = threading.Thread(target=self._work, name="tiled-writer", daemon=True)
        self._thread.start()

    def publish(self, message: Message) -> None:
        if self._thread is None:
            self.setup()
        size = message.nbytes if isinstance(message, Event) else 0
        with self._room:  # backpressure: wait while queue_mb are waiting
            self._room.wait_for(lambda: self._queued < self.queue_bytes)
            self._queued += size
        self._queue.put((message, size))

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_DONE)
        self._thread.join()
        self._thread = None

    def drops(self) -> dict[str, int]:
        return dict(self.dropped.by_reason)

    def stats(self) -> dict[str, Any]:
        return {k: self.counts[k] for k in ("runs", "events", "requests", "retries")}

    # -- the writer thread ------------------------------------------------------------

    def _work(self) -> None:
        batch: list[Event] = []
        size, first_at = 0, 0.0
        while True:
            wait = self.batch_seconds - (time.monotonic() - first_at) if batch else None
            try:
                item = self._queue.get(timeout=max(0.0, wait) if wait is not None else None)
            except queue.Empty:
                item = None
            if item is None or item is _DONE or not isinstance(item[0], Event):
                self._flush(batch)  # (time's up, a boundary, or the end)
                batch, size = [], 0
            if item is _DONE:
                self._finish_open()
                return
            if item is None:
                continue
            message, nbytes = item
            with self._room:
                self._queued -= nbytes
                self._room.notify_all()
            if isinstance(message, Event):
                if batch and batch[-1].run != message.run:
                    self._flush(batch)
                    batch, size = [], 0
                if not batch:
                    first_at = time.monotonic()
                batch.append(message)
                size += nbytes
                if size >= self.batch_bytes:
                    self._flush(batch)
                    batch, size = [], 0
            elif isinstance(message, Start):
                self._finish(message.run, None)  # a second Start closes the first
                self._open(_Run(message.run, message, self.count_key))
            elif isinstance(message, Stop):
                self._finish(message.run, message)

    def _retry(self, what: str, call: Callable[[bool], Any]) -> Any:
        """``call(retrying)`` until it succeeds; ``GiveUp`` after give_up_seconds of
        failures, or at once for a request the server refuses (4xx)."""
        backoff = Backoff(f"TiledWriter: {what}")
        retrying = False
        while True:
            try:
                if self._root is None:
                    self._connect()
                result = call(retrying)
                self.counts["requests"] += 1
                backoff.succeeded()
                self._failing_since = None
                return result
            except Exception as e:  # (any failure of the far side is retried)
                status = getattr(getattr(e, "response", None), "status_code", 0)
                reason = ""
                if 400 <= status < 500 and status not in (409, 429):
                    reason = "refused"
                else:  # an outage counts from its first failure, not this write's:
                    # a queue of batches behind a dead server is given up in one go
                    began = self._failing_since = self._failing_since or time.monotonic()
                    if time.monotonic() - began >= self.give_up_seconds:
                        reason = "tiled_down"
                if reason:
                    raise GiveUp(reason, f"{what}: {type(e).__name__}: {e}") from e
                self._root = None if status == 0 else self._root
                delay = backoff.failed(e)
                self.counts["retries"] += 1
                retrying = True
                time.sleep(delay)

    def _connect(self) -> None:
        key = self._api_key or os.environ.get("TILED_API_KEY") or None
        root = self._from_uri(self.url, api_key=key)
        self._root = root[self.node_path] if self.node_path else root
        for run in self._runs.values():  # the old clients hold a dead connection
            run.node = None
            run.arrays.clear()
            run.table = None

    # -- one run ----------------------------------------------------------------------

    def _node(self, run: _Run) -> Any:
        if run.node is None:
            run.node = self._root[run.key]
        return run.node

    def _open(self, run: _Run) -> None:
        self._runs[run.run] = run
        start = run.start
        metadata = {
            "arroyo_run": run.run,
            "start": jsonable(start.data) if start is not None else None,
            "start_time_ns": start.timestamp_ns if start is not None else None,
        }

        def create(retrying: bool) -> None:
            k = 1
            while True:
                key = f"run_{run.run:05d}" if k == 1 else f"run_{run.run:05d}-{k}"
                try:
                    run.node = self._root.create_container(key=key, metadata=metadata)
                except Exception as e:
                    taken = getattr(getattr(e, "response", None), "status_code", 0) == 409
                    if not taken:
                        raise
                    if retrying:  # (made by our attempt whose answer was lost)
                        run.node = self._root[key]
                    else:
                        k += 1
                        continue
                run.key = key
                return

        try:
            self._retry(f"create the container of run {run.run}", create)
            self.counts["runs"] += 1
        except GiveUp as e:
            run.key = ""
            log.error("run %d: no container in Tiled (%s)", run.run, e)

    def _flush(self, batch: list[Event]) -> None:
        if not batch:
            return
        run = self._runs.get(batch[0].run)
        if run is None:  # events without a Start: a container all the same
            run = _Run(batch[0].run, None, self.count_key)
            self._open(run)
        run.received += len(batch)
        if not run.key:
            self._drop(run, len(batch), "no_container", "its container could not be made")
            return
        arrays = [_arrays(e) for e in batch]
        if not run.shapes and arrays[0]:
            run.shapes = {k: (v.shape, v.dtype) for k, v in arrays[0].items()}
            self._note_units(run, batch[0])
        good = [i for i, a in enumerate(arrays) if self._fits(run, a)]
        if len(good) < len(batch):
            self._drop(run, len(batch) - len(good), "layout", "arrays unlike the run's first")
        if not good:
            return
        try:
            for name, (_, dtype) in run.shapes.items():
                block = np.stack([arrays[i][name] for i in good]).astype(dtype, copy=False)
                self._retry(f"write {name} of run {run.run}", self._writer(run, name, block))
            rows = self._rows(run, [batch[i] for i in good])
            self._retry(f"append the events of run {run.run}", self._appender(run, rows))
        except GiveUp as e:
            self._drop(run, len(good), e.reason, str(e))
            return
        run.written += len(good)
        self.counts["events"] += len(good)

    def _note_units(self, run: _Run, first: Event) -> None:
        """The first event's ``units`` (``{"q": "nm^-1"}``, as the pyFAI stage gives
        them) go in the container's metadata, so a reader can label the arrays' axes."""
        units = jsonable(first.metadata.get("units"))
        if not isinstance(units, dict) or not units:
            return

        def update(retrying: bool) -> None:
            self._node(run).update_metadata(metadata={"units": units})

        try:
            self._retry(f"record the units of run {run.run}", update)
        except GiveUp as e:  # (a label, not data: logged, not a drop)
            log.warning("run %d: units not recorded: %s", run.run, e)

    def _fits(self, run: _Run, arrays: dict[str, np.ndarray]) -> bool:
        if arrays.keys() != run.shapes.keys():
            return False
        return all(a.shape == run.shapes[k][0] for k, a in arrays.items())

    def _writer(self, run: _Run, name: str, block: np.ndarray) -> Callable[[bool], None]:
        offset = run.written  # rows go where their events go: a retry rewrites them

        def write(retrying: bool) -> None:
            node = self._node(run)
            if name not in run.arrays:
                if name in node:  # (made before a reconnect)
                    run.arrays[name] = node[name]
                    run.allocated[name] = run.arrays[name].shape[0]
                else:
                    self._allocate(run, node, name, block)
            client = run.arrays[name]
            end = offset + len(block)
            client.patch(block, offset=(offset,), extend=end > run.allocated[name])
            run.allocated[name] = max(run.allocated[name], end)

        return write

    def _allocate(self, run: _Run, node: Any, name: str, block: np.ndarray) -> None:
        """The array, ``(count, *shape)`` when the Start gave a count (so a run's
        writes never grow it), else the size of the first batch (grown per batch)."""
        from tiled.client.base import DataSource
        from tiled.structures.array import ArrayStructure, BuiltinDtype
        from tiled.structures.core import StructureFamily

        rows = max(run.count, len(block))
        per_chunk = max(1, CHUNK_BYTES // max(1, block[0].nbytes))
        chunks0 = (per_chunk,) * (rows // per_chunk) + (
            (rows % per_chunk,) if rows % per_chunk else ()
        )
        shape = (rows, *block.shape[1:])
        structure = ArrayStructure(
            shape=shape,
            chunks=(chunks0, *((n,) for n in block.shape[1:])),
            data_type=BuiltinDtype.from_numpy_dtype(block.dtype),
        )
        source = DataSource(structure=structure, structure_family=StructureFamily.array)
        run.arrays[name] = node.new(StructureFamily.array, [source], key=name)
        run.allocated[name] = 0 if run.count == 0 else rows

    def _rows(self, run: _Run, events: list[Event]) -> dict[str, list[Any]]:
        if run.columns is None:
            first = events[0].metadata
            run.columns = [k for k, v in first.items() if isinstance(k, str) and _scalar(v)]
            run.columns = [k for k in run.columns if k not in ("seq", "timestamp_ns")]
        rows: dict[str, list[Any]] = {"seq": [e.seq for e in events]}
        rows["timestamp_ns"] = [e.timestamp_ns for e in events]
        for key in run.columns:
            values = [e.metadata.get(key) for e in events]
            rows[key] = [float(v) if _scalar(v) else float("nan") for v in values]  # type: ignore[arg-type]
        return rows

    def _appender(self, run: _Run, rows: dict[str, list[Any]]) -> Callable[[bool], None]:
        import pyarrow

        frame = pyarrow.table(rows)

        def append(retrying: bool) -> None:
            node = self._node(run)
            if run.table is None:
                if "events" in node:
                    run.table = node["events"]
                else:
                    run.table = node.create_appendable_table(frame.schema, key="events")
            if retrying:  # an append is not idempotent: count what is there first
                there = self._table_length(run)
                skip = there - run.table_rows
                run.table_rows = there
                if skip >= len(frame):
                    return
            else:
                skip = 0
            run.table.append_partition(0, frame.slice(max(0, skip)))
            run.table_rows += len(frame) - max(0, skip)

        return append

    def _table_length(self, run: _Run) -> int:
        try:
            return len(run.table.read())
        except Exception:
            # Tiled 0.2.20 answers 500 to reading an appendable table with no rows yet
            if run.table_rows == 0:
                return 0
            raise

    def _drop(self, run: _Run, n: int, reason: str, why: str) -> None:
        run.dropped[reason] += n
        self.dropped.add(n, reason, f"run {run.run}: {why}")

    def _finish(self, number: int, stop: Stop | None) -> None:
        run = self._runs.pop(number, None)
        if run is None:
            if stop is None:
                return
            run = _Run(number, None, self.count_key)
            self._open(run)
            self._runs.pop(number, None)
        if not run.key:
            log.error(
                "run %d: lost (%d events): Tiled never took its container", number, run.received
            )
            return
        losses = stop.routing.get(LOST) if stop is not None else None
        attrs = stop_attrs(
            stop.data if stop is not None else None,
            losses if isinstance(losses, dict) else {},
            stop.seq if stop is not None else None,
            run.received,
            run.written,
        )
        if run.dropped:  # what this writer gave up on makes the run incomplete here
            attrs.update(incomplete=True, complete=False, writer_dropped=dict(run.dropped))
        metadata = {**attrs, "stop": jsonable(stop.data) if stop is not None else None}
        if stop is not None:
            metadata["stop_time_ns"] = stop.timestamp_ns

        def update(retrying: bool) -> None:
            self._node(run).update_metadata(metadata=metadata)

        try:
            self._retry(f"update the metadata of run {number}", update)
        except GiveUp as e:
            self.dropped.add(1, "stop_not_recorded", f"run {number}: {e}")

    def _finish_open(self) -> None:
        for number in list(self._runs):
            log.warning("run %d still open at close: marked incomplete in Tiled", number)
            self._finish(number, None)
