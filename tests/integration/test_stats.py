"""Counters, `arroyo status`, `top`, run completeness and the metrics endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import pytest

from arroyo.runtime.stats import link_totals
from tests.conftest import arroyo_bin, read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, pids

pytestmark = pytest.mark.timeout(180)


def status(path) -> list[dict]:
    return json.loads(arroyo("status", str(path), "--json").stdout)


def row(rows, stage, worker=0):
    return next(r for r in rows if r["stage"] == stage and r["worker"] == worker)


def test_status_after_a_finite_chain(sup, tmp_path):
    path = sup(frames=500, runs=2, workers=2)
    arroyo("up", str(path))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=60)

    def settled():
        # each process rewrites its file on its own one-second tick: the sink's can
        # show the end of the stream before the source's does
        rows = status(path)
        work = row(rows, "work", 0)["received"] + row(rows, "work", 1)["received"]
        done = row(rows, "sink")["received"] == row(rows, "det")["sent"] == work == 1000
        return rows if done else None

    rows = wait_for(settled, timeout=10)
    assert len(rows) == 4
    for r in rows:
        assert r["state"] == "RUNNING" and r["pid"] > 0 and r["rss_bytes"] > 10_000_000
    assert row(rows, "det")["sent"] == row(rows, "sink")["received"] == 1000
    assert row(rows, "work", 0)["received"] + row(rows, "work", 1)["received"] == 1000
    runs = row(rows, "sink")["runs"]
    assert [(r["run"], r["received"], r["complete"], r["missing"]) for r in runs] == [
        (1, 500, True, 0),
        (2, 500, True, 0),
    ]
    totals = {t["link"]: t for t in link_totals(rows)}
    assert totals["det->work"]["sent"] == totals["det->work"]["received"] == 1000
    assert totals["work->sink"]["difference"] == 0
    text = arroyo("status", str(path)).stdout
    assert "det->work" in text and "sink: run 2: 500/500 events (complete)" in text


LOSSY = """
[topology]
name = lossy
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 20000
shape = 16, 16

[stage:slow]
role = publisher
class = stages.sinks:Discard
delay_ms = 2
input = det (pub)
"""


def test_lossy_pub_link_shows_drops_in_status(topo, tmp_path):
    path = topo(LOSSY)
    from arroyo.control import supervise
    from arroyo.topology import load

    try:
        arroyo("up", str(path))

        def finished():
            # (the stage's row and the link's totals are read from stats files each
            # rewritten once a second: wait until both show the end of the stream)
            rows = status(path)
            det = row(rows, "det")
            link = {t["link"]: t for t in link_totals(rows)}.get("det->slow")
            if link is None or det["sent"] + det["dropped"] < 20000:
                return None
            return rows if link["sent"] + link["dropped"].get("pub_full", 0) >= 20000 else None

        rows = wait_for(finished, timeout=60)
        det = row(rows, "det")
        assert det["dropped"] > 1000, det
        link = {t["link"]: t for t in link_totals(rows)}["det->slow"]
        assert link["dropped"]["pub_full"] == det["dropped"]
        assert link["sent"] + link["dropped"]["pub_full"] == 20000
        text = arroyo("status", str(path)).stdout
        assert "pub_full=" in text
    finally:
        supervise.down(load(path))


SLOW = """
[topology]
name = kill
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 3000
shape = 8, 8
rate_hz = 400

[stage:work]
role = operator
class = stages.basic:Delay
min_ms = 5
max_ms = 9
input = det
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


def test_worker_killed_mid_run_is_reported_incomplete(topo, tmp_path):
    from arroyo.control import supervise
    from arroyo.topology import load

    path = topo(SLOW)
    out = tmp_path / "out.jsonl"
    try:
        arroyo("up", str(path))
        wait_for(lambda: len(read_jsonl(out)) > 400, timeout=30)
        os.kill(pids(path)["work_1"], signal.SIGKILL)
        wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=90)
        (_, received, stop) = runs_of(read_jsonl(out))[0]
        assert stop["data"].get("incomplete") is True
        missing = 3000 - received
        assert missing > 0

        def reported():
            runs = row(status(path), "sink")["runs"]
            return runs[-1] if runs else None

        report = wait_for(reported, timeout=10)
        assert report["complete"] is False
        assert report["emitted"] == 3000 and report["received"] == received
        assert report["missing"] == missing
        assert report["missing_workers"] and report["missing_workers"][0].startswith("work/1/")
        log = arroyo("logs", str(path), "sink").stdout
        assert f"{missing} missing" in log
    finally:
        supervise.down(load(path))


def test_top_prints_one_refresh_to_a_pipe(sup):
    path = sup(frames=100)
    arroyo("up", str(path))
    result = arroyo("top", str(path), "--count", "1")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("arroyo top sup")
    assert "STAGE" in lines[1] and "IN/s" in lines[1]
    assert {"det", "work", "sink"} <= {line.split()[1] for line in lines[2:5]}
    assert "\x1b[" not in result.stdout  # no colour or clearing when not a terminal


def test_prometheus_endpoint(sup):
    path = sup(frames=300)
    arroyo("up", str(path))
    proc = subprocess.Popen(
        [arroyo_bin("arroyo"), "metrics", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:")
        url = line.split()[1]

        det_sent = 'arroyo_events_sent_total{topology="sup",chain="main",stage="det",worker="0"}'

        def scraped():
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            values = [line.split()[-1] for line in body.splitlines() if line.startswith(det_sent)]
            # the stats files refresh once a second: wait until the source's count is in
            return body if values and float(values[0]) == 300 else None

        body = wait_for(scraped, timeout=40)
        assert "# TYPE arroyo_rss_bytes gauge" in body
        assert 'arroyo_up{topology="sup",stage="sink",worker="0"} 1' in body
    finally:
        proc.terminate()
        proc.wait(10)
