"""`arroyo run --inline` and the demo topology under supervisord."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from arroyo import supervise
from arroyo.topology import load
from tests.conftest import arroyo_bin, read_jsonl, runs_of

ROOT = Path(__file__).resolve().parents[2]


def test_inline_runs_the_whole_graph_in_one_process(topo, tmp_path):
    path = topo(
        """
        [topology]
        name = inline

        [stage:det]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 30
        runs = 2
        shape = 4, 4

        [stage:scale]
        role = operator
        class = stages.basic:Scale
        factor = 3
        input = det

        [stage:sink]
        role = publisher
        class = stages.sinks:JsonLinesLog
        path = {tmp}/inline.jsonl
        input = scale
        """
    )
    result = subprocess.run(
        [arroyo_bin("arroyo"), "run", str(path), "--inline"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "inline.jsonl")
    assert [(r, n) for r, n, _ in runs_of(records)] == [(1, 30), (2, 30)]
    from stages.synthetic import DetectorSimulator

    pool = DetectorSimulator(frames=1, shape=(4, 4)).pool
    for r in records:
        if r["kind"] == "Event":
            assert r["payload"]["sum"] == pytest.approx(
                3 * float(pool[r["metadata"]["pool"]].sum())
            )


@pytest.mark.timeout(120)
def test_demo_topology_under_supervisor_writes_correct_values(tmp_path):
    text = (ROOT / "deploy" / "demo.ini").read_text()
    text = text.replace("../.arroyo/demo", str(tmp_path / "demo"))
    path = tmp_path / "demo.ini"
    path.write_text(text)
    topology = load(path)
    try:
        from arroyo.demo import main

        assert main(path, timeout=60) == 0
    finally:
        supervise.down(topology)
    records = read_jsonl(tmp_path / "demo" / "out" / "events.jsonl")
    runs = runs_of(records)
    assert [(r, n) for r, n, _ in runs] == [(1, 200), (2, 200), (3, 200)]
    from stages.synthetic import DetectorSimulator

    det = topology.stages["detector"].options
    pool = DetectorSimulator(frames=1, shape=det["shape"]).pool
    for r in records:
        if r["kind"] == "Event":
            expected = 0.5 * float(pool[r["metadata"]["pool"]].astype("float64").sum())
            assert r["payload"]["sum"] == pytest.approx(expected, rel=1e-5)
            assert r["payload"]["shape"] == [256, 256]
    viewer = read_jsonl(tmp_path / "demo" / "out" / "viewer.jsonl")
    assert [(r, n) for r, n, _ in runs_of(viewer)] == [(1, 200), (2, 200), (3, 200)]
