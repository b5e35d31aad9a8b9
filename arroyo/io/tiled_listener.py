"""Runs out of Tiled: follow a container and emit each run in it as it is written.

    [stage:follow]
    role = listener
    class = arroyo.io.tiled_listener:TiledListener
    url = http://127.0.0.1:8000     ; the Tiled server (api_key = ..., else $TILED_API_KEY)
    node = saxs                     ; the container whose child containers are runs
    arrays = q, I                   ; the run's arrays that make an event (default: data)

The layout it follows is the one ``TiledWriter`` writes (and a Bluesky-style writer,
or any plain Tiled client, can): a run is a child container of ``node``; its frames
are the rows, along the first axis, of the arrays named by ``arrays``, written by
appends (``patch(..., extend=True)``), block writes or whole writes. Event *i* holds
row *i* of each array: the row itself for one array, ``{name: row}`` for several
(dtype and shape kept). A run starts when its container appears (Start's data: the
container's metadata and ``tiled_run``, its key), and stops when its metadata gains
``stop_key`` or when nothing has been written to it for ``quiet_seconds``.

How it knows what it has emitted: by rows, not by Tiled's stream sequence numbers
(which a restarted server numbers from 1 again). For each array it counts the rows it
holds in order. An update carrying rows it already has is skipped (counted as
``duplicate_rows``); an update that starts past them means rows were written while it
was not listening (a reconnect, a stream message expired from the server's cache):
it reads the missing rows over HTTP first (counted as ``rows_read``). At the run's
end it reads what is left up to the array's length. So a frame is emitted once, in
order, whatever the connection did. Runs are emitted one at a time, in the order
their containers appeared; a run that appears while another is open waits.

Websocket messages above 1 MB end Tiled's own client subscription; ``max_frame_mb``
(default 64) bounds ours.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import numpy as np

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._tiled_stream import CONNECTED, RECONNECTED, UNDECODABLE, Follow
from arroyo.io.retry import Backoff, DropCount
from arroyo.io.tiled import jsonable, require
from arroyo.message import LOST, Event, Start, Stop
from arroyo.stage import Listener

log = logging.getLogger("arroyo.io.tiled")

WAIT_SECONDS = 0.2  # how often the main loop looks at the clock (quiet runs, stop)
READ_SECONDS = 30.0  # how long reading a run's rows over HTTP is retried at its end


def _dtype(schema: dict[str, Any]) -> np.dtype | None:
    """The numpy dtype of an array's stream schema (None: not a plain dtype)."""
    kind = schema.get("kind")
    size = schema.get("itemsize")
    order = {"little": "<", "big": ">"}.get(schema.get("endianness", ""), "|")
    if not isinstance(kind, str) or len(kind) != 1 or kind not in "biufcmM":
        return None
    if not isinstance(size, int) or size <= 0:
        return None
    return np.dtype(f"{order}{kind}{size}")


def _plain(value: Any) -> Any:
    """Tiled's read-only metadata views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _rows(message: dict[str, Any], chunks: tuple[int, ...] | None) -> tuple[int, int] | None:
    """The rows ``[first, end)`` an ``array-data`` update wrote (None: cannot tell);
    ``ValueError`` for an update whose shape, offset or block are not what Tiled sends."""
    shape, offset, block = message.get("shape"), message.get("offset"), message.get("block")
    try:
        if not shape:
            return None
        if offset:
            first = int(offset[0])
        elif block:
            if chunks is None:
                return None
            first = sum(chunks[: int(block[0])])
        else:
            first = 0
        end = first + int(shape[0])
    except (TypeError, ValueError, IndexError, KeyError) as e:
        msg = f"shape {shape!r}, offset {offset!r}, block {block!r}: {e}"
        raise ValueError(msg) from e
    if first < 0 or end < first:
        msg = f"rows {first} to {end}"
        raise ValueError(msg)
    return first, end


def _metadata(message: dict[str, Any]) -> dict[str, Any]:
    metadata = message.get("metadata")
    return _plain(metadata) if isinstance(metadata, Mapping) else {}


class _Array:
    """One array of the open run: the rows it holds in order, not yet emitted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: deque[np.ndarray] = deque()
        self.next = 0  # the next row it needs (rows emitted + rows held)
        self.dtype: np.dtype | None = None
        self.chunks: tuple[int, ...] | None = None
        self.follow: Follow | None = None


class _Run:
    def __init__(self, key: str, metadata: dict[str, Any]) -> None:
        self.key = key
        self.metadata = metadata
        self.stopped = False
        self.arrays: dict[str, _Array] = {}
        self.follow: Follow | None = None  # the run container's stream (arrays appear)
        self.emitted = 0
        self.lost = 0
        self.active = time.monotonic()


class TiledListener(Listener):
    """Emits the runs written into a Tiled container (see the module's docstring).

    Options: ``url``; ``api_key`` (empty: ``TILED_API_KEY``; never logged); ``node``;
    ``arrays``; ``start``: ``live`` (runs that appear from now on), ``all`` (every run
    the node holds, oldest first, then live) or a number (Tiled's stream sequence of
    the node to replay from, as far back as the server keeps it); ``quiet_seconds``;
    ``stop_key``; ``max_frame_mb``.
    """

    def __init__(
        self,
        url: str,
        api_key: str = "",
        node: str = "",
        arrays: str = "data",
        start: str = "live",
        quiet_seconds: Annotated[float, Bounds(gt=0)] = 30.0,
        stop_key: str = "stop",
        max_frame_mb: Annotated[float, Bounds(gt=0)] = 64.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            msg = f"url {url!r}: give the Tiled server as http://HOST:PORT"
            raise ConfigError(msg)
        self.url = url.rstrip("/")
        self._api_key = api_key  # (never in a log line or an error message)
        self.node = node.strip("/")
        self.arrays = [a.strip() for a in arrays.split(",") if a.strip()]
        if not self.arrays:
            msg = "arrays: name at least one array of the run (e.g. data)"
            raise ConfigError(msg)
        self.start_at: int | None = None
        if start not in ("live", "all"):
            try:
                self.start_at = int(start)
            except ValueError:
                msg = f"start {start!r}: live, all or a sequence number"
                raise ConfigError(msg) from None
        self.replay_all = start == "all"
        self.quiet_seconds = quiet_seconds
        self.stop_key = stop_key
        self.max_bytes = int(max_frame_mb * 2**20) + 4096  # (the envelope around a frame)
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._root: Any = None
        self._known: set[str] = set()  # run keys seen (emitted, waiting, or skipped)
        self._waiting: deque[_Run] = deque()
        self._run: _Run | None = None
        self._node_follow: Follow | None = None
        self._dropped = DropCount("TiledListener")
        self.counts: Counter[str] = Counter()

    def __repr__(self) -> str:  # (no api_key in any traceback or log)
        return f"TiledListener(url={self.url!r}, node={self.node!r})"

    # -- the stage's life -------------------------------------------------------------

    def setup(self) -> None:
        self._from_uri = require()

    def start(self) -> None:
        self._node_follow = self._follow(self.node, self.start_at)
        while not self.stopping:
            try:
                path, message = self._queue.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                path, message = "", {}
            if message:
                self._on(path, message)
            self._next_run()
            run = self._run
            if run is not None and run.stopped:
                self._finish(run, "stop")  # (its writer wrote every row before the stop)
            elif run is not None and time.monotonic() - run.active > self.quiet_seconds:
                self._finish(run, "quiet")

    def stop(self) -> None:
        super().stop()
        self._queue.put(("", {}))  # (wake the loop)

    def close(self) -> None:
        for follow in self._follows():
            follow.close()
        for follow in self._follows():
            follow.join(timeout=2)

    def drops(self) -> dict[str, int]:
        return dict(self._dropped.by_reason)

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "waiting_runs": len(self._waiting)}

    def _follows(self) -> Iterable[Follow]:
        runs = [self._run] if self._run is not None else []
        for run in runs:
            yield from (a.follow for a in run.arrays.values() if a.follow is not None)
            if run.follow is not None:
                yield run.follow
        if self._node_follow is not None:
            yield self._node_follow

    def _follow(self, path: str, start_at: int | None = None) -> Follow:
        key = self._api_key or os.environ.get("TILED_API_KEY") or None
        follow = Follow(self.url, path, key, self._queue, self.max_bytes, start_at)
        follow.start()
        return follow

    # -- HTTP (tiled's client) --------------------------------------------------------

    def _node_client(self) -> Any:
        if self._root is None:
            key = self._api_key or os.environ.get("TILED_API_KEY") or None
            root = self._from_uri(self.url, api_key=key)
            self._root = root[self.node] if self.node else root
        return self._root

    def _http(self, what: str, call: Any, patience: float = 0.0) -> Any:
        """``call(node_client)``; retried with backoff for ``patience`` seconds. None
        when it still fails (logged)."""
        backoff = Backoff(f"TiledListener: {what}")
        deadline = time.monotonic() + patience
        while True:
            try:
                result = call(self._node_client())
                backoff.succeeded()
                return result
            except Exception as e:  # (a server that is down, restarting, refusing)
                self._root = None
                self.counts["http_failures"] += 1
                if time.monotonic() >= deadline or self.stopping:
                    log.warning("TiledListener: %s failed: %s: %s", what, type(e).__name__, e)
                    return None
                time.sleep(backoff.failed(e))

    # -- the streams ------------------------------------------------------------------

    def _on(self, path: str, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == UNDECODABLE:
            self._dropped.add(1, "undecodable", f"stream of {path}: {message['why']}")
            return
        run = self._run
        if path == self.node:
            self._on_node(kind, message)
        elif run is not None and run.follow is not None and path == run.follow.path:
            run.active = time.monotonic()
            if kind in (CONNECTED, RECONNECTED):
                self._find_arrays(run)
            elif kind == "container-child-created" and _named(message, run.arrays):
                self._watch_array(run, run.arrays[message["key"]])
        elif run is not None:
            for array in run.arrays.values():
                if array.follow is not None and path == array.follow.path:
                    run.active = time.monotonic()
                    self._on_array(run, array, kind, message)

    def _on_node(self, kind: Any, message: dict[str, Any]) -> None:
        if kind == CONNECTED:
            self._first_listing()
        elif kind == RECONNECTED:
            self.counts["reconnects"] += 1
            self._catch_up_runs()
        elif kind == "container-child-created" and message.get("structure_family") == "container":
            key = str(message.get("key"))
            if self.start_at is not None:  # (a replayed creation opens a listed run)
                self._known.discard(key)
            self._add_run(key, _metadata(message))
        elif kind == "container-child-metadata-updated":
            key, metadata = str(message.get("key")), _metadata(message)
            for run in (self._run, *self._waiting):
                if run is not None and run.key == key:
                    run.metadata = metadata
                    run.stopped = run.stopped or self.stop_key in metadata

    def _first_listing(self) -> None:
        """``live`` and a sequence: the runs already there are not ours; ``all``: they
        are, oldest first."""
        listing = self._http("listing the node", lambda n: list(n.items()), patience=30)
        for key, child in listing or []:
            if self.replay_all:
                self._add_run(key, _plain(child.metadata))
            else:
                self._known.add(key)

    def _catch_up_runs(self) -> None:
        """After a reconnect: runs made while the stream was down, and the open run's
        metadata (its stop may have been missed)."""
        listing = self._http("listing the node", lambda n: list(n.items()), patience=30)
        for key, child in listing or []:
            if key not in self._known:
                self._add_run(key, _plain(child.metadata))
            for run in (self._run, *self._waiting):
                if run is not None and run.key == key:
                    run.metadata = _plain(child.metadata)
                    run.stopped = run.stopped or self.stop_key in run.metadata

    def _add_run(self, key: str, metadata: dict[str, Any]) -> None:
        if key in self._known:
            return
        self._known.add(key)
        run = _Run(key, dict(metadata))
        run.stopped = self.stop_key in run.metadata
        self._waiting.append(run)

    def _next_run(self) -> None:
        if self._run is not None or not self._waiting:
            return
        run = self._run = self._waiting.popleft()
        run.arrays = {name: _Array(name) for name in self.arrays}
        data = jsonable(run.metadata) or {}
        self.deliver(Start(data={**data, "tiled_run": run.key}))
        self.counts["runs"] += 1
        if not run.stopped:  # (a finished run is read whole at its end, at once)
            path = f"{self.node}/{run.key}" if self.node else run.key
            run.follow = self._follow(path)  # (its CONNECTED finds the arrays made so far)
        run.active = time.monotonic()

    def _find_arrays(self, run: _Run) -> None:
        def present(node: Any) -> list[str]:
            container = node[run.key]
            return [name for name in run.arrays if name in container]

        for name in self._http(f"run {run.key}: its arrays", present, patience=5) or []:
            self._watch_array(run, run.arrays[name])

    def _watch_array(self, run: _Run, array: _Array) -> None:
        if array.follow is not None:
            return
        assert run.follow is not None
        array.follow = self._follow(f"{run.follow.path}/{array.name}")

    def _on_array(self, run: _Run, array: _Array, kind: Any, message: dict[str, Any]) -> None:
        if kind == "array-schema":
            schema = message.get("data_type")
            array.dtype = _dtype(schema) if isinstance(schema, dict) else None
        elif kind in (CONNECTED, RECONNECTED):
            array.chunks = self._chunks(run, array)
        elif kind in ("array-data", "array-ref"):
            self._on_rows(run, array, message)

    def _chunks(self, run: _Run, array: _Array) -> tuple[int, ...] | None:
        def chunks(node: Any) -> tuple[int, ...]:
            return tuple(node[run.key][array.name].chunks[0])

        result = self._http(f"run {run.key}: {array.name}'s chunks", chunks, patience=5)
        return tuple(result) if result is not None else None

    # -- rows -------------------------------------------------------------------------

    def _on_rows(self, run: _Run, array: _Array, message: dict[str, Any]) -> None:
        try:
            rows = _rows(message, array.chunks)
        except ValueError as e:  # (foreign input: counted, the run goes on)
            self._dropped.add(1, "malformed", f"stream of {array.name}: {e}")
            return
        if rows is None:
            return  # (read at the run's end, or when a later update leaves a gap)
        first, end = rows
        if end <= array.next:
            self.counts["duplicate_rows"] += end - first
            return
        if first > array.next and not self._read(run, array, first):
            return  # (the rows between could not be read: a later update retries)
        block = self._decode(array, message)
        if block is None:
            # Tiled announces a write before it stores it: these rows are read when a
            # later update or the run's end shows them stored
            self.counts["rows_deferred"] += end - first
        else:
            self.counts["duplicate_rows"] += array.next - first
            array.rows.extend(block[array.next - first :])
            array.next = end
        self._emit(run)

    def _decode(self, array: _Array, message: dict[str, Any]) -> np.ndarray | None:
        payload = message.get("payload")
        if message.get("mimetype") != "application/octet-stream" or array.dtype is None:
            return None
        if not isinstance(payload, bytes):
            return None
        try:
            shape = tuple(int(n) for n in message["shape"])
            return np.frombuffer(payload, array.dtype).reshape(shape)
        except (TypeError, ValueError) as e:
            self._dropped.add(1, "undecodable", f"{array.name}: {e}")
            return None

    def _read(self, run: _Run, array: _Array, end: int, patience: float = 0.0) -> bool:
        """Rows ``[array.next, end)`` over HTTP (written while we were not listening,
        or sent in a form we do not decode)."""
        first = array.next

        def read(node: Any) -> np.ndarray:
            return np.asarray(node[run.key][array.name][first:end])

        block = self._http(f"run {run.key}: {array.name}[{first}:{end}]", read, patience)
        if block is None:
            return False
        array.rows.extend(block)
        array.next = first + len(block)
        self.counts["rows_read"] += len(block)
        return array.next >= end

    def _emit(self, run: _Run) -> None:
        arrays = list(run.arrays.values())
        if run.emitted == 0 and all(a.rows for a in arrays) and "units" not in run.metadata:
            self._refresh(run)
        while all(a.rows for a in arrays):
            rows = {a.name: a.rows.popleft() for a in arrays}
            payload: Any = rows[arrays[0].name] if len(rows) == 1 else rows
            metadata: dict[str, Any] = {"tiled_run": run.key, "frame": run.emitted}
            units = run.metadata.get("units")
            if isinstance(units, dict):  # (what TiledWriter records: axis labels)
                metadata["units"] = units
            self.deliver(Event(metadata=metadata, payload=payload))
            run.emitted += 1
            self.counts["events"] += 1

    def _refresh(self, run: _Run) -> None:
        """The run's metadata read again before its first event: what its writer set
        before writing rows (TiledWriter's ``units``) may come on the node's stream
        after the rows come on the array's."""
        metadata = self._http(f"run {run.key}: its metadata", lambda n: n[run.key].metadata)
        if metadata is not None:
            run.metadata = _plain(metadata)
            run.stopped = run.stopped or self.stop_key in run.metadata

    # -- a run's end ------------------------------------------------------------------

    def _finish(self, run: _Run, ended: str) -> None:
        """Reads what is left of the run, emits it and the Stop, and moves on."""
        target = self._length(run)
        for array in run.arrays.values():
            if array.next < target:
                self._read(run, array, target, patience=READ_SECONDS)
        self._emit(run)
        run.lost = max(0, target - run.emitted)
        stop_data = jsonable(run.metadata.get(self.stop_key)) if ended == "stop" else None
        data: dict[str, Any] = {"tiled_run": run.key, "ended": ended}
        if isinstance(stop_data, dict):
            data = {**stop_data, **data}
        stop = Stop(data=data)
        if run.lost:
            stop.routing[LOST] = {"unreadable in Tiled": run.lost}
            self._dropped.add(run.lost, "unreadable", f"run {run.key}: {run.lost} rows")
        self.deliver(stop)
        for follow in self._follows():
            if follow is not self._node_follow:
                follow.close()
        self._run = None
        log.info("TiledListener: run %s: %d events (%s)", run.key, run.emitted, ended)

    def _length(self, run: _Run) -> int:
        """Rows every array of the run holds (the writer's ``events_written`` caps it:
        an array allocated for more events than the run had)."""

        def lengths(node: Any) -> list[int]:
            container = node[run.key]
            return [int(container[n].shape[0]) if n in container else 0 for n in run.arrays]

        found = self._http(f"run {run.key}: its length", lengths, patience=READ_SECONDS)
        if found is None:
            return max(a.next for a in run.arrays.values())
        length = min(found)
        written = run.metadata.get("events_written")
        return min(length, written) if isinstance(written, int) else length


def _named(message: dict[str, Any], arrays: dict[str, Any]) -> bool:
    """The message's ``key`` is one of ``arrays`` (a key of another type is not)."""
    key = message.get("key")
    return isinstance(key, str) and key in arrays
