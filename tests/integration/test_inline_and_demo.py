"""`arroyo run --inline` and the demo topology under supervisord."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from arroyo.control import supervise
from arroyo.io import simframes
from arroyo.io.simulate import Simulator, settings_from
from arroyo.topology import load
from tests.conftest import arroyo_bin, read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, stage_procs, supervisord_procs

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


def demo_copy(tmp_path: Path) -> Path:
    """deploy/demo.ini with its run_dir and outputs in tmp_path, the viewer on any port,
    the simulated detector on a free one."""
    text = (ROOT / "deploy" / "demo.ini").read_text()
    text = text.replace("../.arroyo/demo", str(tmp_path / "demo")).replace("8765", "0")
    text = text.replace(":31001", f":{free_port()}")
    path = tmp_path / "demo.ini"
    path.write_text(text)
    return path


@pytest.mark.timeout(120)
def test_demo_topology_under_supervisor_writes_correct_values(tmp_path, capsys):
    path = demo_copy(tmp_path)
    topology = load(path)
    try:
        from arroyo.control.demo import main

        assert main(path, timeout=60) == 0
    finally:
        supervise.down(topology)
    assert_final_status_table(capsys.readouterr().out)
    out = tmp_path / "demo" / "out"
    records = read_jsonl(out / "events.jsonl")
    assert [(r, n) for r, n, _ in runs_of(records)] == [(1, 200), (2, 200), (3, 200)]

    # the reference: the same frames through the same two operators, in this process
    import numpy as np

    from arroyo.control.demo import SIMULATE
    from arroyo.message import Event
    from stages.reduce import DarkFlatCorrection, RadialProfile

    simulated = Simulator(simulator_settings(SIMULATE))
    correct = DarkFlatCorrection(**topology.stages["correct"].options)
    profile = RadialProfile(**topology.stages["profile"].options)
    expected = {}
    for i in range(simframes.POOL):
        (corrected,) = [m for m in [correct.process(Event(payload=simulated.frame(i)[0]))] if m]
        (reduced,) = [m for m in [profile.process(corrected)] if m]
        expected[i] = reduced.payload
    for r in records:
        if r["kind"] == "Event":
            want = expected[r["metadata"]["image_id"] % simframes.POOL]
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
        np.testing.assert_allclose(seq0, expected[first["metadata"]["image_id"] % 4]["I"])
    # the NeXus writer kept every raw frame, as the detector compressed it
    h5py = pytest.importorskip("h5py", reason="the extra arroyo[hdf5]")
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with h5py)

    for run in (1, 2, 3):
        with h5py.File(out / "nexus" / f"run_{run:05d}.h5", "r") as f:
            assert f["entry"].attrs["complete"]
            data, ids = f["entry/data/data"], f["entry/data/image_id"][:]
            assert data.shape == (200, 256, 256) and len(ids) == 200
            for k in (0, 199):
                np.testing.assert_array_equal(data[k], simulated.frame(ids[k] % 4)[0])
    # the live viewer got whole runs (its run reports: where the profile workers merge)
    viewer = json.loads((tmp_path / "demo" / "stats" / "viewer.0.json").read_text())
    seen = {(r["run"], r["received"], r["complete"]) for r in viewer["runs"]}
    assert seen == {(1, 200, True), (2, 200, True), (3, 200, True)}


def simulator_settings(args: list[str]) -> Any:
    """The simulator's settings from its command line (``arroyo simulate ARGS``)."""
    from arroyo.control.cli import simulate

    ctx = simulate.make_context("simulate", list(args))
    return settings_from(ctx.params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_final_status_table(printed: str) -> None:
    """The status table (docs/web.md) is printed once more when the runs are in, so the
    last one before the summary shows them all, however fast they went by."""
    tables = printed.split("runs complete:")[0].split("CHAIN ")
    assert len(tables) > 1, f"no status table before the summary:\n{printed}"
    assert "sink: run 3: 200/200 events (complete)" in tables[-1], printed


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A background job of a
    non-interactive shell starts with SIGINT ignored, and Python then never turns it
    into KeyboardInterrupt, so the Ctrl-C this test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stops(sink: Path) -> list[int]:
    return [r["run"] for r in read_jsonl(sink) if r["kind"] == "Stop"]


@pytest.mark.timeout(240)
def test_demo_serving_ctrl_c_summarises_keeps_the_last_runs_and_starts_from_its_ini(tmp_path):
    path = demo_copy(tmp_path)
    topology = load(path)
    out = tmp_path / "demo" / "out"
    arroyo("scale", str(path), "correct", "3")  # kept from an earlier session
    keep, again = 4, "0.2"
    cmd = [sys.executable, "-m", "arroyo.control.demo", str(path)]
    cmd += ["--again", again, "--keep", str(keep), "--port", "0"]
    printed = tmp_path / "demo.out"
    with printed.open("w") as log:
        demo = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_default_sigint
        )
    most = 0  # run folders on disk at any one look, while the demo serves

    def four_rounds_in() -> bool:  # the first three runs, then three more rounds of three
        nonlocal most
        if (out / "runs").is_dir():
            most = max(most, sum(1 for p in (out / "runs").iterdir() if p.name[:4] == "run_"))
        return max(_stops(out / "events.jsonl"), default=0) >= 12

    try:
        wait_for(four_rounds_in, timeout=150, interval=0.2)
        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=90)  # generous: the stop itself takes a few seconds
        text = printed.read_text()
        assert code == 0, text
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        supervise.down(topology)
    assert not supervisord_procs(supervise.paths(topology).conf), "supervisord left running"
    assert not stage_procs(path), "stage processes left running"

    assert_final_status_table(text)
    serving = text.split("until Ctrl-C", 1)[1]
    assert "runs complete:" in serving, text  # the runs' summary, after Ctrl-C
    # at most the last `keep` runs on disk, in the sink's log and the writer's folders
    runs = sorted({r["run"] for r in read_jsonl(out / "events.jsonl")})
    assert len(runs) <= keep and runs[-1] >= 12, runs
    folders = sorted(int(p.name[4:9]) for p in (out / "runs").iterdir())
    assert len(folders) <= keep and folders[-1] >= 12, folders
    assert most <= keep + 3, f"{most} run folders at once (keep {keep}, 3 runs a round)"
    # started from its INI: two `correct` workers, not the three `scale` had kept
    assert "correct: back to the INI's 2 workers (was 3)" in text, text
    assert sorted(p.name for p in (tmp_path / "demo" / "stats").glob("correct.*.json")) == [
        "correct.0.json",
        "correct.1.json",
    ]
