"""A worker that stops answering (SIGSTOP) is let go within a bounded time; one that is
merely busy in a long process() call is not (issue 13, item 5)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import read_jsonl, wait_for
from tests.integration.conftest import arroyo, pids

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

GRAPH = """
[topology]
name = frozen
run_dir = run
peer_timeout = {timeout}

[chain:main]
stages = det, work, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 200
runs = 100000
shape = 8, 8
rate_hz = 400

[stage:work]
role = operator
input = det
workers = 2
{work}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {{tmp}}/out.jsonl
input = work
"""
DELAY = "class = stages.basic:Delay\nmax_ms = 0.5"
SPIN = "class = stages.basic:Spin\nseconds = {seconds}\nat = 50"


@pytest.fixture
def chain(topo) -> Iterator[Any]:
    made: list[tuple[Path, list[int]]] = []

    def make(work: str, timeout: float) -> tuple[Path, list[int]]:
        path = topo(GRAPH.format(work=work, timeout=timeout))
        frozen: list[int] = []  # pids this test stopped: always let go again
        made.append((path, frozen))
        arroyo("up", str(path))
        return path, frozen

    yield make
    for path, frozen in made:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        supervise.down(load(path), timeout=60)


def status(path: Path) -> list[dict[str, Any]]:
    return json.loads(arroyo("status", str(path), "--json").stdout)


def row(rows: list[dict[str, Any]], stage: str, worker: int = 0) -> dict[str, Any]:
    return next(r for r in rows if r["stage"] == stage and r["worker"] == worker)


def by_run(out: Path) -> tuple[Counter[int], dict[int, dict[str, Any]]]:
    events: Counter[int] = Counter()
    stops: dict[int, dict[str, Any]] = {}
    for r in read_jsonl(out):
        if r["kind"] == "Event":
            events[r["run"]] += 1
        elif r["kind"] == "Stop":
            stops[r["run"]] = r
    return events, stops


def events_out(out: Path) -> int:
    return sum(1 for r in read_jsonl(out) if r["kind"] == "Event")


def test_a_frozen_worker_is_let_go_and_the_other_carries_the_stream(chain, tmp_path):
    path, frozen = chain(DELAY, timeout=1.5)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: events_out(out) > 600, timeout=30)
    victim = pids(path)["work_1"]
    os.kill(victim, signal.SIGSTOP)
    frozen.append(victim)
    stopped_at = time.monotonic()
    n = events_out(out)

    # still flowing: the other worker takes every event once the frozen one is let go
    wait_for(lambda: events_out(out) > n + 1000, timeout=30)

    def stalled() -> list[dict[str, Any]] | None:
        rows = status(path)
        return rows if row(rows, "work", 1)["state"] == "STALLED" else None

    rows = wait_for(stalled, timeout=15)
    assert "let go by" in row(rows, "work", 1)["stalled"], row(rows, "work", 1)
    assert row(rows, "work", 0)["state"] == "RUNNING"
    text = arroyo("status", str(path)).stdout
    assert "work/1 STALLED" in text, text

    # the runs it held open were closed incomplete, naming it; the loss is exact
    events, stops = by_run(out)
    sink = {r["run"]: r for r in row(rows, "sink")["runs"]}
    broken = [r for r, s in stops.items() if s["data"].get("incomplete")]
    assert broken, "no run was closed without the frozen worker"
    ident = f"work/1/{victim}@"
    for run in broken:
        if run in sink:
            report = sink[run]
            assert any(w.startswith(ident) for w in report["missing_workers"]), report
            assert report["missing"] == stops[run]["seq"] - events[run], report
    # later runs are whole again, carried by work/0 alone
    after = [r for r in sorted(stops) if r > max(broken)]
    assert len(after) >= 3, stops.keys()
    for run in after:
        assert not stops[run]["data"].get("incomplete") and events[run] == 200, stops[run]
    detected = time.monotonic() - stopped_at
    print(f"frozen worker shown STALLED {detected:.1f}s after SIGSTOP (peer_timeout 1.5 s)")

    # thawed, it joins again: no longer STALLED, and it takes events once more
    os.kill(victim, signal.SIGCONT)
    frozen.remove(victim)
    before = row(status(path), "work", 1)["received"]

    def rejoined() -> bool:
        r = row(status(path), "work", 1)
        return r["state"] == "RUNNING" and r["received"] > before + 100

    wait_for(rejoined, timeout=30)
    # what it still held when it froze arrived after its runs had closed: counted
    late = sum(
        link["dropped"].get("late", 0)
        for link in row(status(path), "sink")["links"]
        if link["direction"] == "in"
    )
    missing = sum(sink[r]["missing"] for r in broken if r in sink)
    assert 0 < late <= missing + 200, (late, missing)


def test_a_worker_busy_in_a_long_process_call_is_not_let_go(chain, tmp_path):
    timeout = 1.0
    path, _ = chain(SPIN.format(seconds=4 * timeout), timeout=timeout)
    out = tmp_path / "out.jsonl"

    def spun() -> list[dict[str, Any]]:
        return [r for r in read_jsonl(out) if r["kind"] == "Event" and "spun_s" in r["metadata"]]

    # both workers spin once, 4 s each (four peer timeouts) with the GIL taken; status
    # is read all along: neither is ever STALLED
    deadline = time.monotonic() + 90
    while len(spun()) < 2:
        rows = status(path)
        assert not [r for r in rows if r["state"] == "STALLED"], rows
        assert time.monotonic() < deadline, "the workers did not both spin"
        time.sleep(0.2)
    wait_for(lambda: len(by_run(out)[1]) >= 3 + max(r["run"] for r in spun()), timeout=30)
    events, stops = by_run(out)
    last = max(stops)
    for run in range(1, last + 1):
        assert not stops[run]["data"].get("incomplete"), stops[run]
        assert events[run] == 200, (run, events[run])
    links = row(status(path), "sink")["links"]
    assert not any(link["dropped"] for link in links), links
    for log in (tmp_path / "run" / "logs").glob("*.log"):
        text = log.read_text()
        assert "no Stop from" not in text and "sent nothing more" not in text, log


def test_down_with_a_frozen_worker_lets_it_drain_instead_of_killing_it(chain, tmp_path):
    path, frozen = chain(DELAY, timeout=1.5)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: events_out(out) > 400, timeout=30)
    victim = pids(path)["work_1"]
    os.kill(victim, signal.SIGSTOP)
    frozen.append(victim)
    wait_for(lambda: row(status(path), "work", 1)["state"] == "STALLED", timeout=15)
    t0 = time.monotonic()
    arroyo("down", str(path))
    print(f"down with a frozen worker: {time.monotonic() - t0:.1f}s")
    log = (tmp_path / "run" / "logs" / "supervisord.log").read_text()
    ends = [line for line in log.splitlines() if "stopped: work_01" in line]
    assert ends and "SIGKILL" not in ends[-1], ends  # it got its SIGTERM and drained
    assert "stopped cleanly" in (tmp_path / "run" / "logs" / "work_01.log").read_text()
