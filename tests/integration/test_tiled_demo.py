"""``./scripts/demo --tiled`` (deploy/tiled.ini) end to end, checked as a user would:
what Tiled holds (read back with the plain Tiled client), the NeXus files (with h5py),
and what the Tiled listener delivered to the viewer. The demo runs as a subprocess on
a copy of the INI whose ports are free ones (its fixed 8010, 8766, 31002 may be taken
by a demo or a test beside it) and whose run_dir is under tmp_path; it is always
ended, with its Tiled server (in a session of its own) and its stage processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arroyo.control import supervise
from arroyo.control.tiled_server import stop_stray
from arroyo.topology import load
from tests.conftest import need_detectors, need_extra, need_hdf5, read_jsonl, runs_of
from tests.integration.test_inline_and_demo import simulator_settings
from tests.tiled_server import free_port, running

need_extra("tiled", "tiled.client", "tiled.server", "pyarrow")
need_extra("pyfai", "pyFAI")
need_detectors()
need_hdf5()

ROOT = Path(__file__).resolve().parents[2]
RUNS, FRAMES, NPT, SHAPE = 3, 100, 500, (256, 256)


def tiled_demo_copy(tmp_path: Path) -> Path:
    """deploy/tiled.ini with its run_dir and outputs in tmp_path, the viewer on any
    port, the simulated detector and the Tiled server on free ones."""
    text = (ROOT / "deploy" / "tiled.ini").read_text()
    text = text.replace("../.arroyo/tiled-demo", str(tmp_path / "td"))
    text = text.replace("port = 8766", "port = 0").replace(":31002", f":{free_port()}")
    text = text.replace(":8010", f":{free_port()}")
    path = tmp_path / "tiled.ini"
    path.write_text(text)
    return path


@pytest.mark.timeout(180)
def test_the_tiled_demo_puts_its_runs_in_tiled_and_reads_them_back(tmp_path):
    path = tiled_demo_copy(tmp_path)
    topology = load(path)
    cmd = [sys.executable, "-m", "arroyo.control.demo", "--tiled", "--once", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    finally:  # (a timeout leaves the stages and the server of its own session behind)
        supervise.down(topology)
        left = stop_stray(topology.run_dir / "tiled")
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert not left, "the demo left its Tiled server running"
    assert f"runs complete: {RUNS}/{RUNS}" in printed, printed
    assert f"Tiled holds {RUNS} runs at " in printed, printed
    for run in range(1, RUNS + 1):
        line = f"saxs/run_{run:05d}: {FRAMES} events (q {NPT}, I {NPT}), complete: True"
        assert line in printed, printed

    # the round trip, as the listener's chain logged it: every run, whole, in order
    records = read_jsonl(tmp_path / "td" / "out" / "events.jsonl")
    assert [(r, n) for r, n, _ in runs_of(records)] == [(r, FRAMES) for r in range(1, 4)]
    starts = [r["data"] for r in records if r["kind"] == "Start"]
    assert [s["tiled_run"] for s in starts] == [f"run_{r:05d}" for r in range(1, 4)]
    # the axis unit the pyFAI stage gave, kept by the writer, handed on by the listener
    units = [r["metadata"].get("units") for r in records if r["kind"] == "Event"]
    assert units == [{"q": "nm^-1"}] * (FRAMES * RUNS), units[:3]
    # the viewer got every run whole from the Tiled listener (its run reports)
    viewer = json.loads((tmp_path / "td" / "stats" / "viewer.0.json").read_text())
    seen = {(r["run"], r["received"], r["complete"]) for r in viewer["runs"]}
    assert seen == {(r, FRAMES, True) for r in range(1, 4)}

    check_tiled(topology.run_dir / "tiled")
    check_nexus(tmp_path / "td" / "out" / "nexus")


def check_tiled(folder: Path) -> None:
    """The demo's catalog, served again, read with the plain Tiled client."""
    from arroyo.io import simframes

    with running(folder) as server:
        runs = server.client()["saxs"]  # type: ignore[index]
        assert sorted(runs) == [f"run_{r:05d}" for r in range(1, 4)]
        for key in sorted(runs):
            run = runs[key]
            meta = run.metadata
            assert meta["complete"] is True and meta["events_written"] == FRAMES, dict(meta)
            assert meta["units"] == {"q": "nm^-1"}
            assert meta["start"]["number_of_images"] == FRAMES
            q, intensity = run["q"].read(), run["I"].read()
            assert q.shape == intensity.shape == (FRAMES, NPT)
            assert (np.diff(q, axis=1) > 0).all() and (q == q[0]).all()  # one q axis
            assert np.isfinite(intensity).all() and intensity.max() > 0
            # the Start's pixel mask was used: the gaps' NODATA would dominate I(q)
            assert intensity.max() < simframes.nodata(np.dtype("uint16")) / 2
            assert len(run["events"].read()) == FRAMES


def check_nexus(folder: Path) -> None:
    """One NeXus file per run holding the detector's frames as they were sent."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with h5py)

    from arroyo.control.demo import TILED_SIMULATE
    from arroyo.io.simulate import Simulator

    sent = Simulator(simulator_settings(TILED_SIMULATE))
    assert sorted(p.name for p in folder.glob("*.h5")) == [f"run_{r:05d}.h5" for r in (1, 2, 3)]
    for run in range(1, RUNS + 1):
        with h5py.File(folder / f"run_{run:05d}.h5", "r") as f:
            assert f["entry"].attrs["complete"]
            data, ids = f["entry/data/data"], f["entry/data/image_id"][:]
            assert data.shape == (FRAMES, *SHAPE) and len(ids) == FRAMES
            for k in (0, FRAMES - 1):
                np.testing.assert_array_equal(data[k], sent.frame(int(ids[k]))[0])


@pytest.mark.timeout(60)
def test_without_pyfai_the_tiled_demo_says_what_to_install(tmp_path):
    code = (
        "import runpy, sys\n"
        "sys.modules['pyFAI'] = None  # as if not installed\n"
        f"sys.argv = ['demo', '--tiled', '--once', {str(tiled_demo_copy(tmp_path))!r}]\n"
        "runpy.run_module('arroyo.control.demo', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == "the Tiled demo needs pyFAI: pip install 'arroyo[pyfai]'"
    assert not (tmp_path / "td").exists()  # nothing started
