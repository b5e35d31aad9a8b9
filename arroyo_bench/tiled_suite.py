"""The Tiled suite (issue 22): the Tiled writer's events/s and the Tiled listener's
latency against a local Tiled server, each beside Tiled's own client doing the same
work in the same run.

One ``tiled serve config`` (SQLite catalog, file storage, streaming cache in memory)
on this host serves both. Two writing cases:

* ``profiles``: 3,000 events of a 1-D profile, ``{"q", "I"}`` of 1,000 float64;
* ``images``: 300 events of a 512 x 512 float32 image (1 MiB).

Sides, interleaved (in turn first), a fresh container each, after a warm-up run:

* ``tiled client loop`` (the reference): the requests a careful hand-written client
  makes: arrays preallocated ``(count, ...)``, then for each batch of 8 MiB (the
  writer's default ``batch_mb``) one ``patch`` per array at its offset and one
  append of ``seq``/``timestamp_ns`` rows to an appendable table; the Stop's metadata
  at the end;
* ``TiledWriter``: the writer class in this process (its own writer thread, default
  options), fed the run as fast as ``publish`` takes it; timed from its first event
  to ``close()`` returning with everything written. The stage's ZMQ hop is left out:
  at ~40 ms per request, the HTTP dominates by far.

Latency (``listener``): frames are appended one per request, 50 ms apart, to an
array that both a ``TiledListener`` (in this process, its events recorded by a bare
operator) and Tiled's own ``Subscription`` follow at the same time; each side's
latency is the time from the start of the write request to the frame in hand (the
Event delivered / the callback run). 512 x 512 float32 frames and 32 x 32 ones.
Run as part of ``scripts/bench`` (``--only tiled``).
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from arroyo.control.tiled_server import TiledServer
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Operator, Result
from arroyo_bench.measure import log
from arroyo_bench.plans import Plan

BATCH_BYTES = 8 << 20  # the writer's default batch_mb
CASES = {"profiles": (3_000, None), "images": (300, (512, 512))}
REFERENCE, WRITER = "tiled client loop", "TiledWriter"
LATENCY_FRAMES = 100
LATENCY_GAP = 0.05  # seconds between two appends


def _events(case: str, count: int) -> list[Event]:
    rng = np.random.default_rng(0)
    shape = CASES[case][1]
    if shape is None:
        q = np.linspace(0.01, 5.0, 1000)
        pool: list[Any] = [{"q": q, "I": rng.random(1000)} for _ in range(8)]
    else:
        pool = [rng.random(shape, dtype="float32") for _ in range(8)]
    return [Event({"frame": i}, pool[i % 8], run=1, seq=i) for i in range(count)]


def _arrays(event: Event) -> dict[str, np.ndarray]:
    payload = event.payload
    if isinstance(payload, dict):
        return {str(k): np.asarray(v) for k, v in payload.items()}
    return {"data": np.asarray(payload)}


def _reference(node: Any, key: str, events: list[Event]) -> float:
    """The hand-written client: seconds to write the run."""
    import pyarrow
    from tiled.client.base import DataSource
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily

    began = time.perf_counter()
    run = node.create_container(key=key, metadata={"start": {"frames": len(events)}})
    first = _arrays(events[0])
    arrays = {}
    for name, a in first.items():
        shape = (len(events), *a.shape)
        per_chunk = max(1, (4 << 20) // a.nbytes)
        chunks0 = tuple(min(per_chunk, len(events) - i) for i in range(0, len(events), per_chunk))
        structure = ArrayStructure(
            shape=shape,
            chunks=(chunks0, *((n,) for n in a.shape)),
            data_type=BuiltinDtype.from_numpy_dtype(a.dtype),
        )
        source = DataSource(structure=structure, structure_family=StructureFamily.array)
        arrays[name] = run.new(StructureFamily.array, [source], key=name)
    per_batch = max(1, BATCH_BYTES // sum(a.nbytes for a in first.values()))
    table = None
    for offset in range(0, len(events), per_batch):
        batch = events[offset : offset + per_batch]
        for name, client in arrays.items():
            client.patch(np.stack([_arrays(e)[name] for e in batch]), offset=(offset,))
        rows = pyarrow.table({"seq": [e.seq for e in batch],
                              "timestamp_ns": [e.timestamp_ns for e in batch]})  # fmt: skip
        if table is None:
            table = run.create_appendable_table(rows.schema, key="events")
        table.append_partition(0, rows)
    run.update_metadata(metadata={"stop": {}, "complete": True})
    return time.perf_counter() - began


def _writer(server: TiledServer, node: str, events: list[Event]) -> float:
    from arroyo.io.tiled import TiledWriter

    writer = TiledWriter(url=server.url, api_key=server.key, node=node)
    writer.setup()
    began = time.perf_counter()
    writer.publish(Start(data={"frames": len(events)}, run=1))
    for event in events:
        writer.publish(event)
    writer.publish(Stop(data={}, run=1, seq=len(events)))
    writer.close()
    seconds = time.perf_counter() - began
    if writer.counts["events"] != len(events):
        msg = f"TiledWriter wrote {writer.counts['events']} of {len(events)} events"
        raise RuntimeError(msg)
    return seconds


def _writing(server: TiledServer, client: Any, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for case, (count, _) in CASES.items():
        events = _events(case, count)
        nbytes = sum(e.nbytes for e in events)
        row: dict[str, Any] = {"suite": "tiled", "case": case, "count": count}
        runs: dict[str, list[float]] = {REFERENCE: [], WRITER: []}
        client.create_container(key=f"{case}_warm_up")  # (the server's first writes
        _reference(client[f"{case}_warm_up"], "run_00001", events[:50])  # are slower)
        for rep in range(repeats):
            for side in (REFERENCE, WRITER) if rep % 2 == 0 else (WRITER, REFERENCE):
                node = f"{case}_{side.split()[0].lower()}_{rep}"
                client.create_container(key=node)
                if side == REFERENCE:
                    seconds = _reference(client[node], "run_00001", events)
                else:
                    seconds = _writer(server, node, events)
                runs[side].append(seconds)
                log(f"  tiled {case} {side} #{rep + 1}: {count / seconds:,.0f} events/s")
        for side, times in runs.items():
            median = statistics.median(times)
            row[side] = {"events_s": count / median, "mb_s": nbytes / median / 1e6, "runs": times}
        row["ratio"] = row[WRITER]["events_s"] / row[REFERENCE]["events_s"]
        rows.append(row)
    return rows


class _Clock(Operator):
    """Records when each event reaches it (the listener's Event out)."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def process(self, message: Message) -> Result:
        return message

    def handle(self, message: Message) -> list[Message]:
        if isinstance(message, Event):
            self.seen.setdefault(int(message.metadata["frame"]), time.perf_counter())
        return []


def _latency(server: TiledServer, client: Any, side: int) -> dict[str, Any]:
    from arroyo.io.tiled_listener import TiledListener

    node = f"latency_{side}"
    raw = client.create_container(key=node)
    clock = _Clock()
    listener = TiledListener(url=server.url, api_key=server.key, node=node)
    listener.set_operator(clock)
    listener.setup()
    thread = threading.Thread(target=listener.start, daemon=True)
    thread.start()
    time.sleep(1.0)  # (subscribed)
    run = raw.create_container("run_1")
    frame = np.random.default_rng(1).random((1, side, side), dtype="float32")
    array = run.write_array(frame, key="data")
    seen: dict[int, float] = {}

    def callback(update: Any) -> None:
        offset = getattr(update, "offset", None)
        seen.setdefault(int(offset[0]) if offset else 0, time.perf_counter())

    subscription = array.subscribe()
    subscription.new_data.add_callback(callback)  # (held weakly: `callback` stays alive)
    subscription.start_in_thread(max_size=64 << 20)
    time.sleep(0.5)
    sent = {}
    try:
        for i in range(1, LATENCY_FRAMES + 1):
            sent[i] = time.perf_counter()
            array.patch(frame, offset=(i,), extend=True)
            time.sleep(LATENCY_GAP)
        time.sleep(1.0)
    finally:
        subscription.disconnect()
        listener.stop()
        thread.join(10)
        listener.close()
    row: dict[str, Any] = {"suite": "tiled latency", "frame": f"{side} x {side} float32"}
    for name, times in (("Subscription", seen), ("TiledListener", clock.seen)):
        ms = sorted(1000 * (times[i] - sent[i]) for i in sent if i in times)
        row[name] = {"n": len(ms), "median_ms": statistics.median(ms) if ms else None,
                     "p90_ms": ms[int(0.9 * len(ms)) - 1] if ms else None}  # fmt: skip
        log(f"  tiled latency {side}x{side} {name}: {row[name]}")
    ours, theirs = row["TiledListener"]["median_ms"], row["Subscription"]["median_ms"]
    row["ratio"] = ours / theirs if ours and theirs else None
    return row


def tiled(plan: Plan) -> dict[str, Any]:
    """The suite: the writer's rows and the listener's latency rows."""
    with tempfile.TemporaryDirectory(prefix="arroyo-bench-tiled-") as tmp:
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = TiledServer(f"http://127.0.0.1:{port}", Path(tmp) / "tiled")
        server.start()
        try:
            client = server.client()
            writing = _writing(server, client, max(2, plan.repeats - 2))
            latency = [_latency(server, client, side) for side in (512, 32)]
        finally:
            server.stop()
    return {"writer": writing, "latency": latency}
