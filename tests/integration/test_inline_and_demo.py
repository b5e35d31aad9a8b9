"""`arroyo run --inline` and the demo topology under supervisord."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from arroyo.control import supervise
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
    text = text.replace("../.arroyo/demo", str(tmp_path / "demo")).replace("8765", "0")
    path = tmp_path / "demo.ini"
    path.write_text(text)
    topology = load(path)
    try:
        from arroyo.control.demo import main

        assert main(path, timeout=60) == 0
    finally:
        supervise.down(topology)
    out = tmp_path / "demo" / "out"
    records = read_jsonl(out / "events.jsonl")
    assert [(r, n) for r, n, _ in runs_of(records)] == [(1, 200), (2, 200), (3, 200)]

    # the reference: the same frames through the same two operators, in this process
    import numpy as np

    from arroyo.message import Event
    from stages.reduce import DarkFlatCorrection, RadialProfile
    from stages.synthetic import DetectorSimulator

    opts = topology.stages["detector"].options
    pool = DetectorSimulator(frames=1, shape=opts["shape"], dark=opts["dark"]).pool
    correct, profile = DarkFlatCorrection(dark_value=100), RadialProfile(bins=128)
    expected = {}
    for i, frame in enumerate(pool):
        (corrected,) = [m for m in [correct.process(Event(payload=frame))] if m]
        (reduced,) = [m for m in [profile.process(corrected)] if m]
        expected[i] = reduced.payload
    for r in records:
        if r["kind"] == "Event":
            want = expected[r["metadata"]["pool"]]
            assert r["payload"]["I"]["sum"] == pytest.approx(float(np.nansum(want["I"])))
            assert r["payload"]["I"]["shape"] == [128]
    for run in (1, 2, 3):
        folder = out / "runs" / f"run_{run:05d}"
        stop = json.loads((folder / "stop.json").read_text())
        assert stop["complete"] is True and stop["events"] == 200
        with np.load(folder / "frames.npz") as npz:
            profiles = [k for k in npz if k.endswith("_I")]
            assert len(profiles) == 200
            seq0 = npz["frame_000000_I"]
        first = next(
            r for r in records if r["kind"] == "Event" and r["run"] == run and r["seq"] == 0
        )
        np.testing.assert_allclose(seq0, expected[first["metadata"]["pool"]]["I"])
    # the live viewer got whole runs (its run reports: where the profile workers merge)
    viewer = json.loads((tmp_path / "demo" / "stats" / "viewer.0.json").read_text())
    seen = {(r["run"], r["received"], r["complete"]) for r in viewer["runs"]}
    assert seen == {(1, 200, True), (2, 200, True), (3, 200, True)}
