"""Counters that add up across restarts, scaling and several outputs (issue 19, item 4).

Each process writes its own counts; a worker's earlier processes and removed workers
leave theirs behind until ``down``, so the link table's sums stay right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo

pytestmark = pytest.mark.timeout(180)

TAPPED = """
[topology]
name = tapped
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = 1
shape = 4, 4
rate_hz = {rate}

[stage:work]
role = operator
class = stages.basic:Delay
max_ms = 0
input = det
workers = {workers}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work

[stage:tap]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/tap.jsonl
input = det (pub)
"""


@pytest.fixture
def tapped(supervised):
    def up(frames: int, rate: int, workers: int) -> Path:
        return supervised(TAPPED.format(frames=frames, rate=rate, workers=workers, tmp="{tmp}"))

    return up


def rows_of(path: Path) -> list[dict]:
    return json.loads(arroyo("status", str(path), "--json").stdout)


def links(path: Path) -> dict[str, tuple[int, int]]:
    """Per link: (sent, received), from the text table a user reads."""
    text = arroyo("status", str(path)).stdout
    table = text.split("LINK", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    rows = (line.split() for line in table)
    return {cols[0]: (int(cols[1]), int(cols[2])) for cols in rows if "->" in cols[0]}


def settled(path: Path, frames: int) -> dict[str, tuple[int, int]] | None:
    """The link table once every process wrote its counts of the whole stream."""
    table = links(path)
    return table if all(v == (frames, frames) for v in table.values()) else None


def test_out_counts_each_event_once_with_the_links_beside_it(tapped, tmp_path):
    path = tapped(frames=500, rate=0, workers=1)
    wait_for(lambda: len(runs_of(read_jsonl(tmp_path / "out.jsonl"))) == 1, timeout=30)
    det = wait_for(
        lambda: (r := next(r for r in rows_of(path) if r["stage"] == "det"))["sent"] >= 500 and r,
        timeout=15,
    )
    assert det["sent"] == 500, det  # one event out is one, whatever number of links
    per_link = {link["link"]: link["events"] for link in det["links"]}
    assert per_link == {"det->work": 500, "det->tap": 500}, per_link


def test_removed_workers_keep_their_counts_in_the_link_sums(tapped, tmp_path):
    frames = 3000
    path = tapped(frames=frames, rate=1000, workers=3)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 500, timeout=30)
    arroyo("scale", str(path), "work", "1")
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=60)
    (_, n, stop) = runs_of(read_jsonl(out))[0]
    assert n == frames and "incomplete" not in stop["data"]
    table = wait_for(lambda: settled(path, frames), timeout=15)
    assert table == {"det->work": (frames, frames), "work->sink": (frames, frames),
                     "det->tap": (frames, frames)}  # fmt: skip


def test_a_restarted_source_adds_to_its_predecessors_counts(tapped, tmp_path):
    path = tapped(frames=300, rate=0, workers=1)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=30)
    # what the demo does between two rounds of runs: stop and start the detector
    server = supervise.rpc(load(path))
    server.supervisor.stopProcess("tapped:det_00", True)
    server.supervisor.startProcess("tapped:det_00", True)
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=30)
    table = wait_for(lambda: settled(path, 600), timeout=15)
    assert table["det->work"] == (600, 600), table
    det = next(r for r in rows_of(path) if r["stage"] == "det")
    assert (det["sent"], det["past"]["sent"], det["past"]["processes"]) == (300, 300, 1), det
