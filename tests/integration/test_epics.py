"""EPICS PV Access ends in real stage processes (issue 23, part 3): pvapy's own
simulated area detector (``pvapy-ad-sim-server``) and plain pvapy programs
(tests/pva_tools.py) on the far sides, each its own process. Every test runs PV
Access on private ports (``EPICS_PVA_SERVER_PORT`` / ``EPICS_PVA_BROADCAST_PORT``
in the environment every process inherits), so tests in parallel never see each
other's PVs, and names its PVs after itself."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Stages, arroyo_bin, need_extra, read_jsonl, runs_of, wait_for

need_extra("epics", "pvaccess")
pytestmark = pytest.mark.timeout(90)

TOOLS = Path(__file__).resolve().parents[1] / "pva_tools.py"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pva_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Private PV Access ports for this test, and a PV name prefix of its own."""
    monkeypatch.setenv("EPICS_PVA_SERVER_PORT", str(free_tcp_port()))
    monkeypatch.setenv("EPICS_PVA_BROADCAST_PORT", str(free_udp_port()))
    return f"arroyo{uuid.uuid4().hex[:8]}:"


class Procs:
    """The far sides' processes: always ended, their output shown on failure."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = (self.tmp_path / f"{name}.out").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        path = self.tmp_path / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def end(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def procs(tmp_path: Path, stages: Stages, request: pytest.FixtureRequest) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.end()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for name in p.procs:
            print(f"----- {name} -----\n{p.output(name)[-3000:]}")


def sim_server(procs: Procs, name: str, pv: str, source: Path, frames: int, *extra: str) -> None:
    """``pvapy-ad-sim-server`` publishing ``frames`` frames of ``source`` once, then
    exiting (a frame queue smaller than the frames makes it stop after them)."""
    procs.start(
        name,
        arroyo_bin("pvapy-ad-sim-server"),
        *("-cn", pv, "-if", str(source), "-nf", str(frames), "-cs", "4"),
        *("-fps", "100", "-rt", "60", "-std", "2", "-shd", "0", "-dc", "-rp", "0"),
        *extra,
    )


LISTEN = """
[topology]
name = pva
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = arroyo.io.epics:PvaListener
pv = %(pv)s
idle_seconds = %(idle)s
max_gap = 50
%(extra)s

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = detector
"""


def start_listening(
    topo: Callable[..., Path], stages: Stages, pv: str, idle: float = 1.5, extra: str = ""
) -> Path:
    """The listener stage and a sink; a run closes after ``idle`` seconds without
    an array (a server restart must take less). ``extra``: more listener options."""
    path = topo(LISTEN % {"pv": pv, "idle": idle, "extra": extra})
    stages.start(path, "sink")
    stages.start(path, "detector")
    return path


def records(tmp_path: Path, runs: int) -> list[tuple[int, int, dict[str, Any]]]:
    out = tmp_path / "out.jsonl"
    return wait_for(lambda: len(runs_of(read_jsonl(out))) >= runs and runs_of(read_jsonl(out)),
                    timeout=40, interval=0.2)  # fmt: skip


def stage_stats(tmp_path: Path, stage: str) -> dict[str, Any]:
    path = tmp_path / ".arroyo" / "stats" / f"{stage}.0.json"
    return json.loads(path.read_text()) if path.exists() else {}


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(tmp_path / "out.jsonl") if r["kind"] == "Event"]


def frames_file(tmp_path: Path, n: int, kind: str) -> tuple[Path, np.ndarray]:
    """``n`` frames the simulated detector streams (it sends every frame of a file)."""
    rng = np.random.default_rng(23)
    frames = rng.integers(0, 4000, (n, 48, 64)).astype(np.uint16)
    if kind == "npy":
        path = tmp_path / f"frames{n}.npy"
        np.save(path, frames)
        return path, frames
    import h5py
    import hdf5plugin

    path = tmp_path / "frames.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "data", data=frames, chunks=(1, 48, 64), **hdf5plugin.Bitshuffle(cname="lz4")
        )
    return path, frames


@pytest.mark.parametrize("kind", ["npy", "bslz4"])
def test_every_simulated_frame_arrives_once_in_order(tmp_path, topo, stages, procs, pva_env, kind):
    """pvapy-ad-sim-server's frames (raw, or bitshuffle-LZ4 chunks straight from an
    HDF5 file, which travel compressed and are decoded in the sink) arrive once
    each, in order, with their uniqueIds and dimensions, as one complete run."""
    if kind == "bslz4":
        need_extra("hdf5", "h5py", "hdf5plugin")
        need_extra("detectors", "bitshuffle", "lz4")  # (the sink decodes)
    pv = pva_env + "image"
    n = 40
    source, frames = frames_file(tmp_path, n, kind)
    start_listening(topo, stages, pv)
    extra = ("-hds", "/data", "-hcm") if kind == "bslz4" else ()
    sim_server(procs, "sim", pv, source, n, *extra)
    [(_, count, stop)] = records(tmp_path, 1)
    got = events(tmp_path)
    assert count == n
    assert [e["metadata"]["uniqueId"] for e in got] == list(range(1, n + 1))
    for e, expected in zip(got, frames, strict=True):
        assert e["metadata"]["dims"] == [64, 48]
        assert e["metadata"]["codec"] == ("bslz4" if kind == "bslz4" else "")
        assert e["payload"] == {"shape": [48, 64], "dtype": "<u2", "sum": float(expected.sum())}
    assert stop["data"]["skipped_uniqueIds"] == 0
    assert stop["data"]["closed_by"] == "idle"
    assert stages.stop_all(["detector.0", "sink.0"]) == {"detector.0": 0, "sink.0": 0}


def test_restarted_server_gap_and_undecodable_frame_are_counted(
    tmp_path, topo, stages, procs, pva_env
):
    """A plain pvapy server publishes uniqueIds 1-20 and is killed; restarted, it goes
    on at 31 (ids 21-30 lost while it was down) with one NTNDArray of an unknown
    codec at 35. The listener reconnects and keeps one run: 29 frames, 10 uniqueIds
    counted missing, 1 counted as not decoding (in its drops and the run's Stop)."""
    pv = pva_env + "image"
    start_listening(topo, stages, pv, idle=8)
    py = sys.executable
    procs.start("server1", py, str(TOOLS), "serve", pv, "1-20", "--delay", "2")
    wait_for(lambda: len(events(tmp_path)) >= 20, timeout=30, interval=0.1)
    procs.procs["server1"].send_signal(signal.SIGKILL)
    procs.procs["server1"].wait(10)
    go = tmp_path / "go"
    procs.start("server2", py, str(TOOLS), "serve", pv, "31-40", "--bad", "35", "--go", str(go))
    # (publish once the listener is back: frames sent before that are not its to lose)
    wait_for(lambda: stage_stats(tmp_path, "detector").get("extra", {}).get("connects") == 2)
    go.touch()
    [(_, count, stop)] = records(tmp_path, 1)
    got = [e["metadata"]["uniqueId"] for e in events(tmp_path)]
    assert got == [*range(1, 21), *range(31, 35), *range(36, 41)]
    assert count == 29
    assert stop["data"]["skipped_uniqueIds"] == 10
    assert stop["data"]["undecoded_arrays"] == 1
    # what arroyo status reads: the listener's drops by reason and its link counts
    stats = wait_for(lambda: (s := stage_stats(tmp_path, "detector")).get("drops") and s)
    assert stats["drops"] == {"unknown_codec": 1}
    assert (stats["extra"]["connects"], stats["extra"]["disconnects"]) == (2, 1)
    # and every stage downstream reports the run incomplete, attributed to the PV
    line = "29/29 events (INCOMPLETE; 11 missing; 10 uniqueIds the PV skipped; 1 NTNDArrays"
    wait_for(lambda: line in stages.log("sink.0"), timeout=10)


def test_acquire_state_pv_makes_the_runs(tmp_path, topo, stages, procs, pva_env):
    """With ``acquire_pv``, runs follow the detector's acquire state: two acquisitions
    whose uniqueIds simply go on (1-10, 11-20) are two runs, each closed when the
    state reads done, with nothing counted missing."""
    pv, acquire = pva_env + "image", pva_env + "acquire"
    start_listening(topo, stages, pv, idle=0, extra=f"acquire_pv = {acquire}\nacquire_grace = 0.3")
    py = sys.executable
    args = ("serve", pv, "1-10/11-20", "--acquire", acquire, "--delay", "2")
    procs.start("server", py, str(TOOLS), *args)
    (_, first, stop1), (_, second, stop2) = records(tmp_path, 2)
    assert (first, second) == (10, 10)
    assert [s["data"]["closed_by"] for s in (stop1, stop2)] == ["acquire done"] * 2
    assert (stop1["data"]["first_uniqueId"], stop2["data"]["first_uniqueId"]) == (1, 11)
    assert stop1["data"]["skipped_uniqueIds"] == stop2["data"]["skipped_uniqueIds"] == 0


def test_sim_server_restart_opens_a_new_run(tmp_path, topo, stages, procs, pva_env):
    """The simulated detector killed mid-stream and started again numbers its frames
    from 1 again: the listener reconnects, closes the first run and opens another."""
    pv = pva_env + "image"
    source, _ = frames_file(tmp_path, 200, "npy")
    start_listening(topo, stages, pv, idle=5)
    procs.start(
        "sim1",
        arroyo_bin("pvapy-ad-sim-server"),
        *("-cn", pv, "-if", str(source), "-nf", "200", "-cs", "4", "-fps", "40"),
        *("-rt", "60", "-std", "2", "-shd", "0", "-dc", "-rp", "0"),
    )
    wait_for(lambda: len(events(tmp_path)) >= 15, timeout=30, interval=0.1)
    procs.procs["sim1"].send_signal(signal.SIGKILL)
    procs.procs["sim1"].wait(10)
    sim_server(procs, "sim2", pv, frames_file(tmp_path, 20, "npy")[0], 20)
    (_, first, stop1), (_, second, stop2) = records(tmp_path, 2)
    assert stop1["data"]["closed_by"] == "uniqueId went back"
    assert stop1["data"]["skipped_uniqueIds"] == 0
    assert stop1["data"]["last_uniqueId"] == first >= 15
    assert second == 20
    assert stop2["data"]["first_uniqueId"] == 1


BIN_AND_SERVE = """
[topology]
name = pvaout
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = arroyo.io.epics:PvaListener
pv = %(prefix)sraw
idle_seconds = 1.5

[stage:bin]
role = operator
class = stages.reduce:Bin
factor = 2
input = detector
workers = 2

[stage:serve]
role = publisher
class = arroyo.io.epics:PvaPublisher
image_pv = %(prefix)sbinned
input = bin
"""

SERVE = (
    BIN_AND_SERVE
    + """
[stage:profile]
role = operator
class = stages.reduce:RadialProfile
bins = 16
input = detector

[stage:serve_profile]
role = publisher
class = arroyo.io.epics:PvaPublisher
array_pv = %(prefix)sprofile
array_key = I
input = profile
"""
)


def test_publisher_serves_what_the_operators_made(tmp_path, topo, stages, procs, pva_env):
    """sim server -> listener -> Bin at 2 workers -> PvaPublisher (NTNDArray), and
    -> RadialProfile -> PvaPublisher (NTScalarArray): a plain pvapy client monitoring
    both PVs reads back every binned image (uniqueId counting up) and every profile,
    equal to what the same operators make of the frames in this process."""
    from arroyo.message import Event
    from stages.reduce import Bin, RadialProfile

    n = 20
    source, frames = frames_file(tmp_path, n, "npy")
    path = topo(SERVE % {"prefix": pva_env})
    for stage, workers in (("serve", 1), ("serve_profile", 1), ("bin", 2), ("profile", 1)):
        for w in range(workers):
            stages.start(path, stage, w)
    stages.start(path, "detector")
    out = tmp_path / "seen.npz"
    image_pv, profile_pv = pva_env + "binned", pva_env + "profile"
    watcher = procs.start(
        "client", sys.executable, str(TOOLS), "watch", str(out), f"{image_pv},{profile_pv}",
        str(2 * n), "--seconds", "50",
    )  # fmt: skip
    wait_for(lambda: "watching" in procs.output("client"), timeout=20)
    sim_server(procs, "sim", pva_env + "raw", source, n)
    assert watcher.wait(70) == 0, procs.output("client")
    with np.load(out) as seen:
        images = [seen[f"{image_pv}/{i}"] for i in range(n)]
        ids = [int(seen[f"{image_pv}/{i}/uniqueId"]) for i in range(n)]
        profiles = [seen[f"{profile_pv}/{i}"] for i in range(n)]
    binned = [Bin(factor=2).bin(f) for f in frames]
    assert ids == list(range(1, n + 1))
    # two workers may reorder frames: compare as collections, each exactly
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, images)) == sorted(map(key, binned))
    assert all(i.dtype == binned[0].dtype and i.shape == binned[0].shape for i in images)
    radial = RadialProfile(bins=16)
    expected = [radial.on_frame(Event(payload=f), f).payload["I"] for f in frames]  # type: ignore[union-attr]
    assert sorted(map(key, profiles)) == sorted(map(key, expected))


ACQUISITIONS = (
    BIN_AND_SERVE
    + """
[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = bin
"""
)


@pytest.mark.timeout(240)
def test_three_acquisitions_of_1000_frames_are_accounted_for_and_served(
    tmp_path, topo, stages, procs, pva_env
):
    """Three acquisitions of 1,000 frames from pvapy-ad-sim-server (each a new run of
    the simulator: its uniqueIds start at 1 again) through the listener, Bin at two
    workers and PvaPublisher, a plain pvapy client monitoring the served PV: every
    frame is received or counted missing by uniqueId, and the served images are
    exactly the binned frames the operator made, one per event."""
    from stages.reduce import Bin

    n, acquisitions = 1000, 3
    source, frames = frames_file(tmp_path, n, "npy")
    path = topo(ACQUISITIONS % {"prefix": pva_env})
    for stage, workers in (("serve", 1), ("sink", 1), ("bin", 2)):
        for w in range(workers):
            stages.start(path, stage, w)
    stages.start(path, "detector")
    seen, stop_watching = tmp_path / "seen.npz", tmp_path / "stop-watching"
    image_pv = pva_env + "binned"
    watcher = procs.start(
        "client", sys.executable, str(TOOLS), "watch", str(seen), image_pv,
        str(acquisitions * n), "--seconds", "180", "--stop", str(stop_watching),
    )  # fmt: skip
    wait_for(lambda: "watching" in procs.output("client"), timeout=20)
    for a in range(acquisitions):
        sim = f"sim{a}"
        procs.start(
            sim, arroyo_bin("pvapy-ad-sim-server"),
            *("-cn", pva_env + "raw", "-if", str(source), "-nf", str(n), "-cs", str(n - 1)),
            *("-fps", "400", "-rt", "60", "-std", "2", "-shd", "0", "-dc", "-rp", "0"),
        )  # fmt: skip
        wait_for(lambda a=a: len(runs_of(read_jsonl(tmp_path / "out.jsonl"))) > a, timeout=60)
        procs.procs[sim].kill()
        procs.procs[sim].wait(10)
    runs = runs_of(read_jsonl(tmp_path / "out.jsonl"))
    assert len(runs) == acquisitions
    received = [e["metadata"]["uniqueId"] for e in events(tmp_path)]
    for _, count, stop in runs:
        data = stop["data"]
        # every uniqueId of the acquisition: received, or counted missing
        assert (data["first_uniqueId"], data["last_uniqueId"]) == (1, n), data
        assert count + data["skipped_uniqueIds"] == n, (count, data)
    print(
        "frames counted missing per acquisition:",
        [s["data"]["skipped_uniqueIds"] for *_, s in runs],
    )

    served = lambda: stage_stats(tmp_path, "serve").get("extra", {}).get("images_served")  # noqa: E731
    wait_for(lambda: served() == len(received), timeout=30)
    stop_watching.touch()
    assert watcher.wait(30) == 0, procs.output("client")
    with np.load(seen) as got:
        ids = [int(got[f"{image_pv}/{i}/uniqueId"]) for i in range(len(received))]
        images = [got[f"{image_pv}/{i}"] for i in range(len(received))]
        assert f"{image_pv}/{len(received)}" not in got  # nothing more was served
    assert ids == list(range(1, len(received) + 1))  # the client missed none
    binned = Bin(factor=2)
    expected = [binned.bin(frames[uid - 1]) for uid in received]
    # two workers may reorder frames: compare as collections, each exactly
    key = lambda a: a.tobytes()  # noqa: E731
    assert sorted(map(key, images)) == sorted(map(key, expected))
