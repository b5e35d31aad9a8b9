"""Faults under load with the real supervisord: SIGKILLs and clean stops, repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import read_jsonl, wait_for
from tests.integration.conftest import arroyo, pids

# Each step below waits for a count of events or processes with its own deadline, so a
# slow machine fails at the step that is slow; the whole-test timeout only guards
# against a hang, and is far above what ten cycles take at any load seen (62-105 s
# quiet; a fresh clone at load 16-23 went past 300 s).
pytestmark = [pytest.mark.faults, pytest.mark.timeout(1200)]

KILLS = 10

GRAPH = """
[topology]
name = faults
run_dir = run

[chain:main]
stages = det, a, b, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = 100000
shape = 8, 8
rate_hz = {rate}

[stage:a]
role = operator
class = stages.basic:Delay
max_ms = 0.2
input = det
workers = 2

[stage:b]
role = operator
class = stages.basic:Delay
max_ms = 0.2
input = a
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = b
"""


def by_run(records: list[dict]) -> tuple[dict[int, list[int]], dict[int, dict]]:
    events: dict[int, list[int]] = defaultdict(list)
    stops: dict[int, dict] = {}
    for r in records:
        if r["kind"] == "Event":
            events[r["run"]].append(r["seq"])
        elif r["kind"] == "Stop":
            stops[r["run"]] = r
    return events, stops


@pytest.fixture
def graph(topo, tmp_path):
    paths: list[Path] = []

    def make(frames: int = 600, rate: int = 600) -> Path:
        path = topo(GRAPH.format(frames=frames, rate=rate, tmp="{tmp}"))
        paths.append(path)
        arroyo("up", str(path))
        return path

    yield make
    for path in paths:
        supervise.down(load(path), timeout=60)


def lines(path: Path) -> int:
    """Records the sink has written so far: counting newlines is cheap enough to poll,
    where parsing a file of 100,000 records every 50 ms loads the machine itself."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def whole_runs(out: Path) -> int:
    return sum(r["kind"] == "Stop" and not r["data"].get("incomplete") for r in read_jsonl(out))


def sink_report(path: Path) -> dict[int, dict]:
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    sink = next(r for r in rows if r["stage"] == "sink")
    return {r["run"]: r for r in sink["runs"]}


@pytest.mark.parametrize("victim", ["det_0", "a_1", "sink_0", "a__b_0"])
def test_sigkill_ten_times_under_load(graph, tmp_path, victim):
    path = graph()
    out = tmp_path / "out.jsonl"
    wait_for(lambda: lines(out) > 500, timeout=30)
    for _ in range(KILLS):
        old = pids(path)[victim]
        os.kill(old, signal.SIGKILL)
        # back and flowing again (bounds for a loaded 2-core CI machine: it takes
        # about a second on a quiet one)
        wait_for(lambda old=old: pids(path).get(victim) not in (None, old), timeout=15)
        n = lines(out)
        wait_for(lambda n=n: lines(out) > n + 100, timeout=15)
    # The source keeps sending runs: let whole ones pass after the last kill (how many
    # fit between two kills depends on the machine's load, not on what is tested).
    wait_for(lambda: whole_runs(out) >= 5, timeout=60, interval=0.5)
    time.sleep(1.5)  # let the last runs close and the stats files refresh
    reports = sink_report(path) if victim != "sink_0" else {}
    supervise.down(load(path), timeout=60)
    events, stops = by_run(read_jsonl(out))
    complete = [r for r, s in stops.items() if not s["data"].get("incomplete")]
    assert len(complete) >= 5, f"only {len(complete)} whole runs"
    for run in complete:
        # a run reported whole really is whole: every sequence number exactly once
        assert sorted(events[run]) == list(range(stops[run]["seq"])), f"run {run}"
    for run, report in reports.items():
        if run in stops and not report["complete"] and victim != "det_0":
            # the loss is exactly what the completeness report says
            assert report["missing"] == stops[run]["seq"] - len(set(events[run])), report


@pytest.mark.parametrize("how", ["supervisorctl", "down"])
def test_clean_stop_mid_run_ten_times_loses_nothing(graph, tmp_path, how):
    path = graph(frames=1_000_000, rate=2000)
    conf = supervise.paths(load(path)).conf
    ctl = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(conf)]
    out = tmp_path / "out.jsonl"
    for cycle in range(KILLS):
        n = lines(out)
        wait_for(lambda n=n: lines(out) > n + 300, timeout=30)
        if how == "supervisorctl":
            done = subprocess.run([*ctl, "stop", "main:*"], capture_output=True, timeout=120)
            assert done.returncode == 0, done
        else:
            arroyo("down", str(path))
        events, stops = by_run(read_jsonl(out))
        last = max(stops)
        assert stops[last]["data"].get("interrupted") is True, f"cycle {cycle}"
        assert "incomplete" not in stops[last]["data"], f"cycle {cycle}: {stops[last]}"
        assert sorted(events[last]) == list(range(stops[last]["seq"])), f"cycle {cycle}"
        if how == "supervisorctl":
            subprocess.run([*ctl, "start", "main:*"], capture_output=True, timeout=120, check=True)
        else:
            arroyo("up", str(path))
