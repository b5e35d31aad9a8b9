"""``arroyo set`` on real stage processes under supervisord (live parameters)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.runtime.live import live_path
from arroyo.topology import load
from tests.conftest import read_jsonl, wait_for
from tests.integration.conftest import arroyo, pids, stage_procs, supervisord_procs

TOPO = """
[topology]
name = live
run_dir = run

[chain:main]
stages = det, hits, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 2400
shape = 8, 8
rate_hz = 300

[stage:hits]
role = operator
class = stages.reduce:ThresholdFilter
threshold = 0                 ; every frame is a hit (the dark offset is 100)
input = det
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = hits
"""


@pytest.fixture
def running(topo) -> Iterator[Path]:
    path = topo(TOPO)
    topology = load(path)
    conf = supervise.paths(topology).conf
    try:
        assert supervise.up(topology) == []
        yield path
    finally:
        try:
            supervise.down(topology, timeout=60)
        finally:
            for p in supervisord_procs(conf) + stage_procs(path):
                p.kill()


def _log(path: Path, stage: str, worker: int) -> str:
    logs = supervise.paths(load(path)).logs
    return (logs / f"{supervise.process_name(stage, worker)}.log").read_text(errors="replace")


def _stats(path: Path, stage: str, worker: int) -> dict:
    try:
        return json.loads((path.parent / "run" / "stats" / f"{stage}.{worker}.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.timeout(150)
def test_set_changes_the_hits_after_the_logged_seq_survives_a_kill_and_down_forgets(
    running: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 300, timeout=30)
    store = live_path(load(running).run_dir, "hits")

    bad = arroyo("set", str(running), "hits", "threshold=lots", check=False)
    assert bad.returncode == 2, bad
    assert bad.stderr.strip().splitlines() == [
        f"{running}: [stage:hits] threshold = lots: expected a number (float)"
    ]
    not_live = arroyo("set", str(running), "hits", "threshold=1", "array=x", check=False)
    assert not_live.returncode == 2 and "array: not a live option" in not_live.stderr
    assert not store.exists(), "a refused set changed nothing"

    done = arroyo("set", str(running), "hits", "threshold=65535")  # no pixel is above it
    applied = {
        int(w): int(seq)
        for w, seq in re.findall(r"hits\[(\d)\]: applied from run \d+ seq (\d+)", done.stdout)
    }
    # a worker holding no event at that moment applies it before its next one
    idle = {int(w) for w in re.findall(r"hits\[(\d)\]: applied while idle", done.stdout)}
    assert sorted([*applied, *idle]) == [0, 1] and applied, done.stdout
    for w, seq in applied.items():
        log = _log(running, "hits", w)
        assert f"threshold=65535 (version 1) applied from run 1 seq {seq}" in log

    records = wait_for(lambda: (r := read_jsonl(out)) and r[-1]["kind"] == "Stop" and r, timeout=60)
    seqs = [r["seq"] for r in records if r["kind"] == "Event"]
    if not idle:  # (an idle worker's last hit may come after the other's seq)
        assert seqs and max(seqs) < max(applied.values()), "a hit after the change took effect"
    before = min(applied.values())
    assert sorted(s for s in seqs if s < before) == list(range(before)), "hits lost before"
    assert records[-1]["data"]["hits"] == len(seqs)

    status = arroyo("status", str(running)).stdout
    assert "hits[0]: live threshold=65535 (version 1" in status

    # a killed worker comes back with the value kept in run_dir
    old = pids(running)["hits_1"]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := pids(running).get("hits_1")) not in (None, old) and p, 30)
    wait_for(lambda: _stats(running, "hits", 1).get("pid") == new, timeout=20)
    live = _stats(running, "hits", 1)["live"]
    assert live["version"] == 1 and live["values"] == {"threshold": "65535"}
    log = _log(running, "hits", 1)
    assert "live values kept in run_dir: threshold=65535" in log

    arroyo("down", str(running))
    assert not store.exists(), "down forgets the live values"
