"""Completeness at every receiving end, with the real supervisord (issue 19, items 1-2).

A stage that receives whole runs reports each of them, whether one upstream process
sends them or many; a source killed mid-run has its open run closed, incomplete,
before its successor's first run passes; an event that ``process()`` failed on makes
its run incomplete at every stage after it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, pids

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

DIRECT = """
[topology]
name = direct
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = 4, 4
rate_hz = {rate}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = det
"""

# Written next to the topology, which puts its folder on the stage's import path.
BROKEN = '''
from arroyo.message import Event
from arroyo.stage import Operator


class Broken(Operator):
    """Raises on every event; Start and Stop pass."""

    def process(self, m):
        if isinstance(m, Event):
            raise ValueError("this frame cannot be reduced")
        return m
'''

FAILING = """
[topology]
name = failing
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 50
runs = 2
shape = 4, 4

[stage:op]
role = operator
class = brokenops:Broken
input = det
{scaling}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = op
"""


def sink_runs(path: Path) -> dict[int, dict]:
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    return {r["run"]: r for row in rows if row["stage"] == "sink" for r in row["runs"]}


def stops_at_sink(out: Path) -> int:
    return sum(r["kind"] == "Stop" for r in read_jsonl(out))


def test_a_single_upstream_process_gets_its_runs_reported(supervised, tmp_path):
    path = supervised(DIRECT.format(frames=100, runs=2, rate=0, tmp="{tmp}"))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: stops_at_sink(out) == 2, timeout=30)
    reports = wait_for(lambda: (r := sink_runs(path)) and len(r) == 2 and r, timeout=15)
    assert [(r["received"], r["of"], r["complete"]) for r in reports.values()] == [
        (100, 100, True),
        (100, 100, True),
    ]
    text = arroyo("status", str(path)).stdout
    assert "sink: run 1: 100/100 events (complete)" in text, text


def test_a_source_killed_mid_run_has_its_run_closed_before_the_next_passes(supervised, tmp_path):
    path = supervised(DIRECT.format(frames=2000, runs=2, rate=1000, tmp="{tmp}"))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 300, timeout=30)
    old = pids(path)["det_0"]
    os.kill(old, signal.SIGKILL)
    # the restarted source sends its two runs (ids 2 and 3) whole
    wait_for(lambda: stops_at_sink(out) == 3, timeout=60)
    records = read_jsonl(out)
    runs = runs_of(records)  # strict Start -> events -> Stop: runs never interleave
    assert [run for run, _, _ in runs] == [1, 2, 3]
    (_, got, stop1), *whole = runs
    assert stop1["data"].get("incomplete") is True, stop1
    assert 300 <= got < 2000
    assert [(n, "incomplete" in s["data"]) for _, n, s in whole] == [(2000, False), (2000, False)]
    reports = wait_for(lambda: (r := sink_runs(path)) and len(r) == 3 and r, timeout=15)
    assert reports[1]["complete"] is False and reports[1]["received"] == got, reports[1]
    assert reports[1]["missing_workers"] == ["source (died)"], reports[1]
    assert [reports[r]["complete"] for r in (2, 3)] == [True, True]
    text = arroyo("status", str(path)).stdout
    assert f"sink: run 1: {got}/? events (INCOMPLETE" in text, text


@pytest.mark.parametrize("scaling", ["workers = 1", "scalable = false"])
def test_events_that_process_fails_on_make_the_run_incomplete(supervised, tmp_path, scaling):
    (tmp_path / "brokenops.py").write_text(BROKEN)
    path = supervised(FAILING.format(scaling=scaling, tmp="{tmp}"))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: stops_at_sink(out) == 2, timeout=30)
    stops = [r for r in read_jsonl(out) if r["kind"] == "Stop"]
    assert [s["data"].get("incomplete") for s in stops] == [True, True], stops
    reports = wait_for(lambda: (r := sink_runs(path)) and len(r) == 2 and r, timeout=15)
    for report in reports.values():
        assert report["complete"] is False, report
        assert report["losses"] == {"failed in process() at op": 50}, report
    text = arroyo("status", str(path)).stdout
    line = "sink: run 1: 0/0 events (INCOMPLETE; source emitted 50; 50 missing; "
    assert line + "50 failed in process() at op)" in text, text
    # one traceback per distinct error and run, not one per event
    log = arroyo("logs", str(path), "op").stdout
    assert log.count("Traceback") == 2, log[-3000:]


FRAMES = 8000
SINGLE_OP = """
[topology]
name = single
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 8000
shape = 4, 4
rate_hz = 1000

[stage:op]
role = operator
class = stages.basic:Delay
max_ms = 0
input = det
scalable = false

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = op
"""


def test_a_single_operator_killed_mid_run_is_waited_for_and_the_loss_is_exact(supervised, tmp_path):
    path = supervised(SINGLE_OP)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 500, timeout=30)
    at_kill = len(read_jsonl(out))
    os.kill(pids(path)["op_0"], signal.SIGKILL)
    wait_for(lambda: stops_at_sink(out) == 1, timeout=60)
    [(_, got, stop)] = runs_of(read_jsonl(out))
    # the restarted operator took the run up: its part arrived in the same run
    assert got > at_kill + 1000, (got, at_kill)
    assert stop["seq"] == FRAMES, stop
    report = wait_for(lambda: sink_runs(path).get(1), timeout=15)
    # what was in flight to the killed process is missing, exactly (possibly nothing)
    assert report["missing"] == FRAMES - got, report
    assert report["complete"] is (got == FRAMES), report
    assert ("incomplete" in stop["data"]) is (got < FRAMES), stop
    assert report["missing_workers"][0].startswith("op/0/"), report
