"""Operators that build run boundaries of their own, in real stage processes.

The promise under test: whatever an operator returns, every event a stage receives is
delivered downstream, counted as a drop by reason, or reported missing, and the chain
never stalls (held messages always give their credit back).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stages, arroyo_bin, read_jsonl, runs_of, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

# Written next to the topology, which puts its folder on the stage's import path.
OPS = '''
from arroyo.message import Event, Start, Stop
from arroyo.stage import Operator


class Builder(Operator):
    """Builds boundaries of its own; which kind depends on the run (run % len(modes))."""

    def __init__(self, modes: tuple[str, ...] = ("start",), at: int = 5) -> None:
        self.modes = modes
        self.at = at

    def process(self, m):
        mode = self.modes[m.run % len(self.modes)]
        if isinstance(m, Event) and m.seq == self.at:
            if mode == "start":  # split the run: a new Start mid-run
                return [Start(data={"built": True}), m]
            if mode == "stop":  # end the run early
                return [m, Stop(data={"built": True})]
            if mode == "both":
                return [Stop(), Start(), m]
            if mode == "foreign":  # an event that claims another run
                return [m, Event(metadata={"foreign": True}, run=m.run + 1000)]
        if mode == "swallow" and not isinstance(m, Event):
            return None
        if mode == "summary" and isinstance(m, Stop):  # a summary run after the run
            return [m, Start(data={"summary": True}), Event(metadata={"summary": True}), Stop()]
        if mode == "rebuild" and not isinstance(m, Event):
            return type(m)(data={"rebuilt": True})
        if mode == "raise" and not isinstance(m, Event):
            raise RuntimeError("process() fails on a boundary")
        return m
'''

GRAPH = """
[topology]
name = built
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = 4, 4

[stage:work]
role = operator
class = runops:Builder
modes = {modes}
input = det
workers = {workers}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""

MIXED = ("plain", "start", "stop", "both", "swallow", "summary", "foreign", "rebuild", "raise")


def run_graph(topo, stages: Stages, tmp_path: Path, modes, runs: int, workers: int) -> Path:
    (tmp_path / "runops.py").write_text(OPS)
    path = topo(
        GRAPH.format(frames=100, runs=runs, modes=", ".join(modes), workers=workers, tmp="{tmp}")
    )
    stages.start(path, "sink")
    for w in range(workers):
        stages.start(path, "work", w)
    stages.start(path, "det")
    out = tmp_path / "out.jsonl"
    try:
        wait_for(lambda: len(runs_of(read_jsonl(out))) == runs, timeout=60)
    finally:
        codes = stages.stop_all()
    assert all(c == 0 for c in codes.values()), stages.dump()
    return out


def stats(tmp_path: Path, stage: str, worker: int = 0) -> dict[str, Any]:
    return json.loads((tmp_path / "run" / "stats" / f"{stage}.{worker}.json").read_text())


def check_every_event_accounted(tmp_path: Path, out: Path, runs: int, workers: int) -> None:
    """Every event the source emitted reached the sink once, in its own whole run, and
    the sink reports every run complete; the link table shows no difference."""
    records = read_jsonl(out)
    whole = runs_of(records)  # strict Start -> events -> Stop order
    assert [r for r, _, _ in whole] == list(range(1, runs + 1))
    frames: dict[int, Counter[int]] = {}
    for r in records:
        if r["kind"] == "Event" and "frame" in r["metadata"]:
            frames.setdefault(r["run"], Counter())[r["seq"]] += 1
    for run, _, stop in whole:
        assert frames.get(run) == Counter(range(stop["seq"])), f"run {run}"
        assert stop["seq"] == 100 and "incomplete" not in stop["data"], stop
    reports = stats(tmp_path, "sink")["runs"]
    assert [(r["run"], r["complete"], r["missing"]) for r in reports] == [
        (run, True, 0) for run in range(1, runs + 1)
    ]
    sent = sum(stats(tmp_path, "work", w)["sent"] for w in range(workers))
    assert sent == stats(tmp_path, "sink")["received"]


def refused(tmp_path: Path, workers: int) -> tuple[int, Counter[str]]:
    errors, drops = 0, Counter[str]()
    for w in range(workers):
        s = stats(tmp_path, "work", w)
        errors += s["errors"]
        drops.update(s["drops"])
    return errors, drops


def test_an_operator_built_start_mid_run_loses_nothing_and_never_stalls(topo, stages, tmp_path):
    """The reported case: [Start(...), message] for seq 5 of each of 30 runs."""
    out = run_graph(topo, stages, tmp_path, ("start",), runs=30, workers=1)
    check_every_event_accounted(tmp_path, out, runs=30, workers=1)
    errors, drops = refused(tmp_path, 1)
    assert (errors, drops) == (30, Counter(built_boundary=30))
    assert "refused a Start" in stages.log("work.0")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_event_is_delivered_counted_or_reported_over_mixed_runs(
    topo, stages, tmp_path, workers
):
    runs = 3 * len(MIXED)
    out = run_graph(topo, stages, tmp_path, MIXED, runs=runs, workers=workers)
    check_every_event_accounted(tmp_path, out, runs, workers)
    records = read_jsonl(out)
    summaries = [r for r in records if "summary" in r.get("metadata", {})]
    # Per run of each mode: start 1, stop 1, both 2; summary 2 on every worker that saw
    # the run (a worker may join after the first runs), and it sends one summary event;
    # raise fails on the Start and the Stop of every worker that saw the run.
    errors, drops = refused(tmp_path, workers)
    assert drops["built_boundary"] == 3 * (1 + 1 + 2) + 2 * len(summaries)
    assert 3 <= len(summaries) <= 3 * workers
    assert drops["foreign_run"] == 3
    assert drops["operator_error"] % 2 == 0 and 6 <= drops["operator_error"] <= 6 * workers
    assert set(drops) == {"built_boundary", "foreign_run", "operator_error"}
    assert errors == drops.total()
    by_run = {run: stop for run, _, stop in runs_of(records)}
    starts = {r["run"]: r for r in records if r["kind"] == "Start"}
    for run in range(1, runs + 1):
        mode = MIXED[run % len(MIXED)]
        # a summary event returned for the Stop stays in its run, before the Stop
        assert any(r["run"] == run for r in summaries) == (mode == "summary"), run
        if mode == "rebuild":
            assert starts[run]["data"] == {"rebuilt": True}
            assert by_run[run]["data"] == {"rebuilt": True}
        if mode in ("swallow", "raise"):
            assert starts[run]["data"]["frames"] == 100  # the source's own Start


def test_inline_mode_keeps_runs_the_same_way(topo, tmp_path):
    (tmp_path / "runops.py").write_text(OPS)
    modes = ("start", "stop", "both", "swallow")
    path = topo(GRAPH.format(frames=20, runs=8, modes=", ".join(modes), workers=1, tmp="{tmp}"))
    result = subprocess.run(
        [arroyo_bin("arroyo"), "run", str(path), "--inline"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    whole = runs_of(read_jsonl(tmp_path / "out.jsonl"))
    assert [(run, n) for run, n, _ in whole] == [(run, 20) for run in range(1, 9)]
    assert result.stderr.count("refused a Start") == 4  # start and both, twice each
