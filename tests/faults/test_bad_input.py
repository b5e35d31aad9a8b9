"""Bad and oversized wire input, slow consumers, and runtime configuration faults."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from arroyo import wire
from arroyo.message import Event, Start, Stop
from tests.conftest import Stages, arroyo_bin, read_jsonl, runs_of, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

INJECT = """
[topology]
name = inject
run_dir = run

[stage:src]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 1
shape = 2

[stage:work]
role = operator
class = arroyo.stage:PassThrough
input = src (push ipc://{tmp}/in.sk)
max_message_bytes = 1048576

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


def bad_messages(rng: random.Random, n: int) -> list[list[bytes]]:
    """n message frame lists that are each certainly invalid, of many kinds."""
    # (an array above wire.INLINE_MAX: its bytes follow the header in a frame of their own)
    good = wire.encode(Event(metadata={"k": 1}, payload=np.arange(1024, dtype="<u2"), run=1))
    head = bytes(good[0])
    body = bytes(memoryview(good[1]))
    header = msgpack.unpackb(head)
    out: list[list[bytes]] = []
    for i in range(n):
        kind = i % 9
        if kind == 0:  # random bytes that are not a control frame
            out.append([bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(0, 64))])
        elif kind == 1:  # header, buffer frame missing
            out.append([head])
        elif kind == 2:  # an extra frame
            out.append([head, body, b"extra"])
        elif kind == 3:  # truncated header
            out.append([head[: rng.randrange(1, len(head) - 1)], body])
        elif kind == 4:  # lying size
            out.append([head, body[: rng.randrange(0, len(body))]])
        elif kind == 5:  # huge declared shape
            h = dict(header, b=[[None, "<u2", [2**40, 2**20]]])
            out.append([msgpack.packb(h), body])
        elif kind == 6:  # unknown version
            out.append([msgpack.packb(dict(header, v=99)), body])
        elif kind == 7:  # control-looking garbage
            out.append([b"\x00Z", rng.randbytes(8)])
        else:  # not msgpack at all
            out.append([b"\xc1" + rng.randbytes(20), body])
    return out


def fake_source(tmp_path: Path) -> tuple[zmq.Context, zmq.Socket, bytes]:
    """Bind the link the operator connects to, and answer its HELLO."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(f"ipc://{tmp_path}/in.sk")
    assert sock.poll(30_000), "the operator never said HELLO"
    peer, verb, *_ = sock.recv_multipart()
    assert verb == b"\x00H"
    sock.send_multipart([peer, b"\x00W", msgpack.packb({"id": "src/0/1@nowhere"})])
    return ctx, sock, peer


def rss(stages: Stages, key: str) -> int:
    return psutil.Process(stages.procs[key].pid).memory_info().rss


def test_ten_thousand_bad_messages_are_counted_and_valid_ones_arrive(topo, stages, tmp_path):
    path = topo(INJECT)
    stages.start(path, "sink")
    stages.start(path, "work")
    ctx, sock, peer = fake_source(tmp_path)
    rng = random.Random(7)
    bad = bad_messages(rng, 10_000)
    try:
        wait_for(lambda: rss(stages, "work.0") > 0)
        time.sleep(0.5)
        before = rss(stages, "work.0")
        sock.send_multipart([peer, *wire.encode(Start(data={"n": 1}, run=1))])
        valid = 0
        for i, frames in enumerate(bad):
            sock.send_multipart([peer, *frames])
            if i % 10 == 0:
                ev = Event(
                    metadata={"i": valid}, payload=np.full(8, valid, "<i4"), run=1, seq=valid
                )
                sock.send_multipart([peer, *wire.encode(ev)], copy=False)
                valid += 1
        sock.send_multipart([peer, *wire.encode(Stop(data={}, run=1, seq=valid))])
        out = tmp_path / "out.jsonl"
        wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=60)
        (_, n, _) = runs_of(read_jsonl(out))[0]
        assert n == valid == 1000
        got = [r["metadata"]["i"] for r in read_jsonl(out) if r["kind"] == "Event"]
        assert got == list(range(1000))
        assert stages.procs["work.0"].poll() is None, "the operator died"
        assert rss(stages, "work.0") - before < 50 * 2**20

        def counted():
            try:
                stats = json.loads((tmp_path / "run" / "stats" / "work.0.json").read_text())
            except (OSError, ValueError):
                return None
            link = next(lk for lk in stats["links"] if lk["link"] == "src->work")
            return link["dropped"] if sum(link["dropped"].values()) == 10_000 else None

        drops = wait_for(counted, timeout=10)
        assert {"malformed", "frames", "size", "version", "bad_control"} <= drops.keys(), drops
        # The events of run 1 whose header decoded (a frame missing or extra, a lying or
        # huge size) were lost at the worker: the sink reports the run incomplete by that
        # many, charged to the link (the other bad messages name no run)
        lost = sum(1 for i in range(10_000) if i % 9 in (1, 2, 4, 5))

        def sink_report():
            # the sink writes its stats file on a period: the run's report may not be in
            # it yet when the run's Stop has reached out.jsonl
            try:
                sink = json.loads((tmp_path / "run" / "stats" / "sink.0.json").read_text())
            except (OSError, ValueError):
                return None
            return sink["runs"][0] if len(sink["runs"]) == 1 else None

        report = wait_for(sink_report, timeout=10)
        assert not report["complete"], report
        assert report["losses"] == {"dropped as undecodable on src->work at work": lost}
        assert report["missing"] == lost
    finally:
        sock.close(0)
        ctx.term()
    assert stages.stop_all()["work.0"] == 0


def test_oversized_message_is_refused_and_the_stage_lives(topo, stages, tmp_path):
    path = topo(INJECT)
    stages.start(path, "sink")
    stages.start(path, "work")
    ctx, sock, peer = fake_source(tmp_path)
    try:
        ok = Event(metadata={"ok": 1}, payload=np.ones(16, np.uint8), run=0)
        sock.send_multipart([peer, *wire.encode(ok)], copy=False)
        out = tmp_path / "out.jsonl"
        wait_for(lambda: len(read_jsonl(out)) == 1, timeout=30)
        before = rss(stages, "work.0")
        # 64 MiB against a 1 MiB max_message_bytes: zmq cuts the peer off unread
        huge = Event(metadata={}, payload=np.zeros(64 * 2**20, np.uint8), run=0)
        sock.send_multipart([peer, *wire.encode(huge)], copy=False)
        time.sleep(2.0)
        assert stages.procs["work.0"].poll() is None, "the operator died"
        assert rss(stages, "work.0") - before < 16 * 2**20, "the oversized message was read"
        assert [r["metadata"] for r in read_jsonl(out)] == [{"ok": 1}]
    finally:
        sock.close(0)
        ctx.term()
    assert stages.stop_all()["work.0"] == 0


SLOW = """
[topology]
name = slow
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 3000
shape = 64, 64

[stage:sink]
role = publisher
class = stages.sinks:Discard
delay_ms = 1
hwm = 50
input = det
"""


def test_slow_consumer_push_link_applies_backpressure(topo, stages, tmp_path):
    path = topo(SLOW)
    stages.start(path, "sink")
    stages.start(path, "det")
    stats = tmp_path / "run" / "stats"

    def snap(name):
        try:
            return json.loads((stats / f"{name}.0.json").read_text())
        except (OSError, ValueError):
            return None

    wait_for(lambda: snap("det") and snap("det")["sent"] > 100, timeout=30)
    first = snap("det")["sent"]
    time.sleep(1.0)
    # the source is held to the sink's pace (~1000/s), not its own (>20,000/s)
    assert snap("det")["sent"] - first < 2000
    assert rss(stages, "det.0") < 300 * 2**20
    wait_for(lambda: snap("sink") and snap("sink")["received"] == 3000, timeout=60)
    assert snap("sink")["dropped"] == 0 and snap("det")["dropped"] == 0
    assert all(c == 0 for c in stages.stop_all().values())


def test_endpoint_taken_by_another_process_names_the_stage(topo, stages):
    path = topo(SLOW)
    first = stages.start(path, "sink")
    wait_for(lambda: "started as" in stages.log("sink.0"), timeout=20)
    log = Path(stages.tmp_path) / "second.log"
    with log.open("wb") as f:
        second = subprocess.run(
            [arroyo_bin("arroyo-stage"), str(path), "sink"],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=30,
        )
    assert second.returncode == 2
    text = log.read_text()
    assert "stage sink:" in text and "in use" in text and "Traceback" not in text
    assert first.poll() is None
    stages.stop_all()


def test_run_dir_not_writable_is_one_clear_line(topo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = topo(SLOW.replace("run_dir = run", f"run_dir = {blocker}/run"))
    result = subprocess.run(
        [arroyo_bin("arroyo"), "up", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(blocker) in result.stderr and "run_dir" in result.stderr
