"""What a drain timeout leaves behind is counted: a sink whose publish() never returns.

Stopped sources first (as ``arroyo down`` does), each stage gives up at its
``drain_timeout``; the promise: every event the source generated is either published
or counted as a drop by reason in some stage's stats.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stages, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

AFTER = 500  # events the sink publishes before its publish() blocks for ever

OPS = '''
import threading

from arroyo.message import Event
from arroyo.stage import Publisher


class Stuck(Publisher):
    """Publishes ``after`` events, then blocks in publish() for ever (a hung sink)."""

    def __init__(self, marker: str, after: int = 500) -> None:
        self.marker = marker
        self.after = after
        self.n = 0

    def publish(self, message):
        if isinstance(message, Event):
            if self.n == self.after:
                open(self.marker, "w").close()
                threading.Event().wait()  # never set: neither stop() nor SIGTERM helps
            self.n += 1
'''

GRAPH = """
[topology]
name = hung
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 100000000
shape = 4, 4
rate_hz = 20000
drain_timeout = 2

[stage:work]
role = operator
class = arroyo.stage:PassThrough
input = det
workers = {workers}
drain_timeout = 2

[stage:sink]
role = publisher
class = hungops:Stuck
marker = {tmp}/stuck
after = {after}
input = work
drain_timeout = 2
"""


def stats(tmp_path: Path, key: str) -> dict[str, Any]:
    path = tmp_path / "run" / "stats" / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else {"sent": 0}


def backpressured(tmp_path: Path) -> Any:
    """True once the source's count of sent events has stopped growing between two
    writes of its stats file (once a second)."""
    seen: list[tuple[float, int]] = []

    def check() -> bool:
        det = stats(tmp_path, "det.0")
        now = (det.get("time", 0.0), det["sent"])
        if seen and now[0] != seen[-1][0] and now[1] == seen[-1][1] > AFTER:
            return True
        seen.append(now)
        return False

    return check


def generated(tmp_path: Path) -> int:
    """Events the source generated: sent on its link or dropped there."""
    det = stats(tmp_path, "det.0")
    (link,) = det["links"]
    return link["events"] + sum(link["dropped"].values())


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hung_sink_at_stop_leaves_nothing_uncounted(topo, stages: Stages, tmp_path, workers):
    (tmp_path / "hungops.py").write_text(OPS)
    path = topo(GRAPH.format(workers=workers, after=AFTER, tmp="{tmp}"))
    keys = ["det.0", *(f"work.{w}" for w in range(workers)), "sink.0"]
    stages.start(path, "sink")
    for w in range(workers):
        stages.start(path, "work", w)
    stages.start(path, "det")
    wait_for(lambda: (tmp_path / "stuck").exists(), timeout=30)
    wait_for(backpressured(tmp_path), timeout=30)  # every window up to the source is full
    for key in keys:  # sources first, each one waited for
        stages.signal(key)
        try:
            stages.wait(key, timeout=15)
        except subprocess.TimeoutExpired:
            stages.signal(key, signal.SIGKILL)  # what supervisord does at stopwaitsecs
            stages.wait(key, timeout=10)
    exits = {key: stages.procs[key].returncode for key in keys}
    drops = {key: stats(tmp_path, key)["dropped"] for key in keys}
    lost = generated(tmp_path) - AFTER
    counted = sum(drops.values())
    # Every generated event is published or counted. What a count may add on top are
    # boundaries: per worker the source's interrupted Stop, its own partial Stop and
    # the Start it joined with.
    assert lost <= counted <= lost + 3 * workers, (lost, drops)
    assert exits == dict.fromkeys(keys, 0), exits
    assert "drain timeout" in stages.log("sink.0")
    sink = stats(tmp_path, "sink.0")
    assert sink["drops"] == {} and set(sink["links"][0]["dropped"]) == {"drain_timeout"}


CUT = """
[topology]
name = cut
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 100000000
shape = 4, 4
rate_hz = 20000

[stage:work]
role = operator
class = stages.basic:Delay
min_ms = 5
max_ms = 5
input = det
workers = 2
drain_timeout = 1

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


def test_a_backlog_cut_at_drain_timeout_is_reported_as_such(topo, stages: Stages, tmp_path):
    """Slow workers stopped with a backlog: what they leave is counted, and the run
    is reported incomplete because of their drain timeout, not of a source's death."""
    path = topo(CUT)
    stages.start(path, "sink")
    for w in range(2):
        stages.start(path, "work", w)
    stages.start(path, "det")

    def backlog() -> bool:  # the workers' windows are full
        sent = stats(tmp_path, "det.0")["sent"]
        return sent - stats(tmp_path, "sink.0").get("received", 0) > 1500

    wait_for(backlog, timeout=30)
    stages.signal("det.0")
    assert stages.wait("det.0", timeout=15) == 0
    for w in range(2):
        stages.signal(f"work.{w}")
    assert [stages.wait(f"work.{w}", timeout=15) for w in range(2)] == [0, 0]

    def report() -> dict[str, Any] | None:
        runs = stats(tmp_path, "sink.0").get("runs")
        return runs[0] if runs else None

    run = wait_for(report, timeout=15)
    stages.signal("sink.0")
    assert stages.wait("sink.0", timeout=15) == 0
    assert run["complete"] is False, run
    ids = {w: stats(tmp_path, f"work.{w}")["id"] for w in range(2)}
    cut = {
        w: link["dropped"].get("drain_timeout", 0)
        for w in range(2)
        for link in stats(tmp_path, f"work.{w}")["links"]
        if link["direction"] == "in"
    }
    assert all(cut.values()), cut
    assert sorted(run["missing_workers"]) == [f"{ids[w]} (left at drain timeout)" for w in range(2)]
    lost = generated(tmp_path) - stats(tmp_path, "sink.0")["received"]
    # what the workers left unread holds every lost event (and the source's Stop)
    assert lost <= sum(cut.values()) <= lost + 2, (cut, lost)
    assert "died" not in stages.log("sink.0")
