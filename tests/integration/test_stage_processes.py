"""Real arroyo-stage processes linked by real ZMQ sockets."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import zmq

from arroyo.topology import load
from tests.conftest import Stages, read_jsonl, runs_of, wait_for

pytestmark = pytest.mark.timeout(120)

CHAIN = """
[topology]
name = chain
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = 8, 8
rate_hz = {rate}

[stage:work]
role = operator
class = {op}
input = det
workers = {workers}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


def chain(topo, frames=100, runs=1, rate=0, workers=1, op="stages.basic:Scale\nfactor = 2"):
    return topo(
        CHAIN.format(frames=frames, runs=runs, rate=rate, workers=workers, op=op, tmp="{tmp}")
    )


def start_chain(stages: Stages, path: Path, workers: int = 1) -> None:
    stages.start(path, "sink")
    for w in range(workers):
        stages.start(path, "work", w)
    stages.start(path, "det")


def test_three_stage_push_chain_delivers_values(topo, stages, tmp_path):
    path = chain(topo, frames=50, runs=2)
    start_chain(stages, path)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=30)
    runs = runs_of(read_jsonl(out))
    assert [(r, n) for r, n, _ in runs] == [(1, 50), (2, 50)]
    # the operator doubled every frame: compare against the simulator's own pool
    from stages.synthetic import DetectorSimulator

    pool = DetectorSimulator(frames=1, shape=(8, 8)).pool
    events = [r for r in read_jsonl(out) if r["kind"] == "Event"]
    for ev in events:
        expected = 2 * pool[ev["metadata"]["pool"]].astype(np.float64).sum()
        assert ev["payload"]["sum"] == pytest.approx(expected)
        assert ev["payload"]["dtype"] == "<f4"
    assert [e["seq"] for e in events[:50]] == list(range(50))
    codes = stages.stop_all()
    assert all(c == 0 for c in codes.values()), stages.dump()


def test_runs_survive_three_workers_with_random_delays(topo, stages, tmp_path):
    path = chain(
        topo, frames=500, runs=20, workers=3, op="stages.basic:Delay\nmax_ms = 0.6\nseed = 1"
    )
    start_chain(stages, path, workers=3)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 20, timeout=90)
    runs = runs_of(read_jsonl(out))
    assert [r for r, _, _ in runs] == list(range(1, 21))
    for run, n, stop in runs:
        assert n == 500, f"run {run}: {n} events"
        assert stop["seq"] == 500
        assert "incomplete" not in stop["data"]
    seqs = {}
    for r in read_jsonl(out):
        if r["kind"] == "Event":
            seqs.setdefault(r["run"], set()).add(r["seq"])
    assert all(s == set(range(500)) for s in seqs.values())
    # every worker took a share
    for w in range(3):
        stats = json.loads((tmp_path / "run" / "stats" / f"work.{w}.json").read_text())
        assert stats["received"] > 500, stats
    assert all(c == 0 for c in stages.stop_all().values()), stages.dump()


def test_sigterm_sources_first_loses_nothing(topo, stages, tmp_path):
    path = chain(topo, frames=1_000_000, runs=1, rate=3000, workers=2)
    start_chain(stages, path, workers=2)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 2000, timeout=30)
    codes = stages.stop_all(["det.0", "work.0", "work.1", "sink.0"])
    assert all(c == 0 for c in codes.values()), stages.dump()
    runs = runs_of(read_jsonl(out))
    assert len(runs) == 1
    _run, n, stop = runs[0]
    assert stop["data"].get("interrupted") is True
    assert n == stop["seq"] > 2000, f"sink got {n} events, source emitted {stop['seq']}"


def test_crashing_process_costs_one_event(topo, stages, tmp_path):
    path = chain(topo, frames=40, op="stages.basic:FailOn\nvalues = 7, 19")
    start_chain(stages, path)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=30)
    (_, n, stop) = runs_of(read_jsonl(out))[0]
    assert n == 38 and stop["seq"] == 40
    frames = [r["metadata"]["frame"] for r in read_jsonl(out) if r["kind"] == "Event"]
    assert 7 not in frames and 19 not in frames
    stages.stop_all()
    stats = json.loads((tmp_path / "run" / "stats" / "work.0.json").read_text())
    assert stats["errors"] == 2
    assert "injected failure on frame=7" in stages.log("work.0")
    assert "run 1 seq 7" in stages.log("work.0")


def test_on_error_stop_is_fatal(topo, stages, tmp_path):
    path = chain(topo, frames=40, op="stages.basic:FailOn\nvalues = 3\non_error = stop")
    start_chain(stages, path)
    assert stages.wait("work.0", timeout=30) == 1
    stages.stop_all()


PUBSUB = """
[topology]
name = fan
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 300
runs = 2
shape = 4, 4

[stage:a]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/a.jsonl
input = det (pub)

[stage:b]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/b.jsonl
input = det (pub)
"""


def test_pubsub_fanout_late_subscribers_see_first_messages(topo, stages, tmp_path):
    path = topo(PUBSUB)
    stages.start(path, "det")  # the source first: subscribers join late
    import time

    time.sleep(1.0)
    stages.start(path, "a")
    stages.start(path, "b")
    for name in "ab":
        out = tmp_path / f"{name}.jsonl"
        wait_for(lambda out=out: len(runs_of(read_jsonl(out))) == 2, timeout=30)
        runs = runs_of(read_jsonl(out))
        assert [(r, n) for r, n, _ in runs] == [(1, 300), (2, 300)]
        assert read_jsonl(out)[0]["kind"] == "Start"
    assert all(c == 0 for c in stages.stop_all().values()), stages.dump()


FOREIGN = """
[topology]
name = foreign
run_dir = run

[stage:ingest]
role = listener
class = arroyo.io.zmq:ZMQListener
endpoint = {src}
socket = pull
bind = true
codec = raw

[stage:work]
role = operator
class = arroyo.stage:PassThrough
input = ingest

[stage:out]
role = publisher
class = arroyo.io.zmq:ZMQPublisher
endpoint = {dst}
socket = push
bind = true
codec = raw
input = work
"""


def test_raw_foreign_producer_to_plain_pull(topo, stages, tmp_path):
    src = f"ipc://{tmp_path}/src.sk"
    dst = f"ipc://{tmp_path}/dst.sk"
    path = topo(FOREIGN.format(src=src, dst=dst))
    load(path)
    stages.start(path, "out")
    stages.start(path, "work")
    stages.start(path, "ingest")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    try:
        push.connect(src)
        pull.connect(dst)
        payloads = [f"frame-{i}".encode() * (i + 1) for i in range(200)]
        for p in payloads:
            push.send(p)
        got = []
        while len(got) < len(payloads):
            assert pull.poll(20_000), f"only {len(got)} arrived\n{stages.dump()}"
            got.append(pull.recv())
        assert got == payloads
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
    assert all(c == 0 for c in stages.stop_all().values()), stages.dump()


def test_bad_class_option_at_init_exits_2(topo, stages):
    path = chain(topo, frames=-5)
    proc = stages.start(path, "det")
    assert proc.wait(20) == 2
    log = stages.log("det.0")
    assert "stage det: cannot create stages.synthetic:DetectorSimulator" in log
    assert "Traceback" not in log


def test_sigint_also_stops_cleanly(topo, stages, tmp_path):
    path = chain(topo, frames=10)
    start_chain(stages, path)
    wait_for(lambda: len(runs_of(read_jsonl(tmp_path / "out.jsonl"))) == 1)
    for key in ["det.0", "work.0", "sink.0"]:
        stages.signal(key, signal.SIGINT)
    assert [stages.wait(k) for k in ["det.0", "work.0", "sink.0"]] == [0, 0, 0]


def test_hit_counts_of_two_filter_workers_add_up_at_the_sink(topo, stages, tmp_path):
    # every pixel is above -1: every frame is a hit, split between the two workers
    op = "stages.reduce:ThresholdFilter\nthreshold = -1"
    path = chain(topo, frames=400, runs=2, rate=2000, workers=2, op=op)
    start_chain(stages, path, workers=2)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=60)
    for _, n, stop in runs_of(read_jsonl(out)):
        assert n == 400
        assert (stop["data"]["hits"], stop["data"]["misses"]) == (400, 0), stop
        assert "summed" not in stop["data"]
    codes = stages.stop_all()
    assert all(c == 0 for c in codes.values()), stages.dump()


def test_a_pub_link_from_two_workers_into_a_sink_merges_whole_runs(topo, stages, tmp_path):
    path = chain(topo, frames=300, runs=2, rate=1000, workers=2, op="arroyo.stage:PassThrough")
    path.write_text(path.read_text().replace("input = work\n", "input = work (pub)\n"))
    start_chain(stages, path, workers=2)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=60)
    runs = runs_of(read_jsonl(out))
    assert [(r, n) for r, n, _ in runs] == [(1, 300), (2, 300)]
    assert all("incomplete" not in stop["data"] for _, _, stop in runs), runs
    stats_file = tmp_path / "run" / "stats" / "sink.0.json"
    reports = wait_for(
        lambda: (
            stats_file.exists()
            and len(json.loads(stats_file.read_text())["runs"]) == 2
            and json.loads(stats_file.read_text())["runs"]
        ),
        timeout=10,
    )
    assert [(r["run"], r["received"], r["complete"]) for r in reports] == [
        (1, 300, True),
        (2, 300, True),
    ]
    assert all(c == 0 for c in stages.stop_all().values()), stages.dump()
