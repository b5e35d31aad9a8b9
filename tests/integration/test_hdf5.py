"""NeXus files written by real stage processes, read back by processes that know only
h5py and hdf5plugin (issue 21: "a NeXus file of 3 runs read back by plain h5py +
hdf5plugin in a subprocess that does not import Arroyo"; "a reader following a file
under SWMR sees frames while the run is open")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stages.synthetic import POOL_SIZE, DetectorSimulator
from tests.conftest import arroyo_bin, need_detectors, need_hdf5, wait_for
from tests.integration.test_foreign_frames import free_port

need_hdf5()
need_detectors()

SHAPE = (40, 56)
# label, codec of the frames (none: plain arrays), dtype, frames
RUNS = [("a", "bslz4", "<u2", 12), ("b", "none", "<u4", 10), ("c", "lz4", "<u2", 8)]

TOPOLOGY = """
[topology]
name = nexus
run_dir = {tmp}/.arroyo

[chain:c]
stages = detector, work, nexus

[stage:detector]
role = listener
class = arroyo.io.zmq:ZMQListener
endpoint = tcp://127.0.0.1:{port}
codec = arroyo

[stage:work]
role = operator
class = stages.basic:Delay
input = detector
workers = 2
max_ms = 2

[stage:nexus]
role = publisher
class = arroyo.io.hdf5:NexusWriter
path = {tmp}/nx
input = work
"""

# A plain pyzmq process sends the three runs in Arroyo's wire format.
SENDER = """
import sys, numpy as np, zmq
from arroyo import wire
from arroyo.compression import compress
from arroyo.message import Encoded, Event, Start, Stop
sys.path.insert(0, sys.argv[2])
from test_hdf5_frames import RUNS, frames, mask
sock = zmq.Context.instance().socket(zmq.PUSH)
sock.bind(sys.argv[1])
for label, codec, dtype, n in RUNS:
    start = {"label": label, "count_time": 0.5, "pixel_mask": mask(), "gonio": {"omega": 1.5}}
    sock.send_multipart(wire.encode(Start(data=start)))
    for i, frame in enumerate(frames(label, dtype, n)):
        payload = frame if codec == "none" else Encoded(codec, dtype, frame.shape,
                                                         compress(codec, frame))
        meta = {"image_id": i, "energy": 8000.0 + i, "tag": "x"}
        sock.send_multipart(wire.encode(Event(meta, payload)))
    sock.send_multipart(wire.encode(Stop(data={"label": label, "note": "done"})))
sock.close(linger=20000)
"""

FRAMES_MODULE = """
import numpy as np
RUNS = {runs!r}
SHAPE = {shape!r}
def frames(label, dtype, n):
    rng = np.random.default_rng(ord(label))
    return [rng.poisson(3 + i, SHAPE).astype(dtype) for i in range(n)]
def mask():
    return (np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) % 97 == 0).astype("<u4")
"""

# The reader: h5py and hdf5plugin only; prints what it read as JSON.
READER = """
import json, sys
import h5py, hdf5plugin
def plain(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    return v.decode() if isinstance(v, bytes) else v
out = []
for name in sys.argv[1:]:
    with h5py.File(name, "r") as f:
        classes = {}
        f.visititems(lambda k, o: classes.__setitem__(k, plain(o.attrs.get("NX_class", ""))))
        data = f["entry/data"]
        out.append({
            "root": {k: plain(v) for k, v in f.attrs.items()},
            "entry": {k: plain(v) for k, v in f["entry"].attrs.items()},
            "classes": classes,
            "signal": plain(data.attrs["signal"]),
            "frames": {"dtype": data["data"].dtype.str, "shape": list(data["data"].shape),
                       "values": data["data"][()].tolist(),
                       "filters": list(data["data"]._filters)},
            "scalars": {k: data[k][()].tolist() for k in data if k != "data"},
            "start": {k: plain(v[()]) for k, v in f["entry/start"].items() if hasattr(v, "dtype")},
            "omega": plain(f["entry/start/gonio/omega"][()]),
            "mask": f["entry/instrument/detector/pixel_mask"][()].tolist(),
            "count_time_units": plain(f["entry/instrument/detector/count_time"].attrs["units"]),
            "stop": {k: plain(v[()]) for k, v in f["entry/stop"].items()},
        })
assert "arroyo" not in sys.modules and not any(m.startswith("arroyo.") for m in sys.modules)
print(json.dumps(out))
"""


def read_back(files: list[Path]) -> list[dict[str, Any]]:
    """What a process that never imports Arroyo reads of ``files`` (-I: no cwd, no
    PYTHONPATH, no user site: only the installed h5py and hdf5plugin)."""
    out = subprocess.run(
        [sys.executable, "-I", "-c", READER, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def writer_stats(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / ".arroyo" / "stats" / "nexus.0.json"
    try:
        return json.loads(path.read_text()).get("extra", {})
    except (OSError, ValueError):
        return {}


@pytest.mark.timeout(120)
def test_three_runs_read_back_by_plain_h5py_equal_what_was_sent(tmp_path, supervised):
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "test_hdf5_frames.py").write_text(FRAMES_MODULE.format(runs=RUNS, shape=SHAPE))
    sys.path.insert(0, str(helpers))
    try:
        import test_hdf5_frames as sent  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(helpers))
    port = free_port()
    supervised(TOPOLOGY.replace("{port}", port))
    script = tmp_path / "send.py"
    script.write_text(SENDER)
    url = f"tcp://127.0.0.1:{port}"
    subprocess.run([sys.executable, str(script), url, str(helpers)], check=True, timeout=60)
    stats = wait_for(
        lambda: writer_stats(tmp_path).get("runs", 0) >= 3 and writer_stats(tmp_path), 60
    )
    # two runs of compressed frames went in as they came; the plain one was compressed here
    assert stats["direct_chunks"] == 12 + 8 and stats["compressed_here"] == 10, stats
    files = sorted((tmp_path / "nx").glob("*.h5"))
    assert [f.name for f in files] == ["run_00001.h5", "run_00002.h5", "run_00003.h5"]

    got = read_back(files)
    for (label, codec, dtype, n), f in zip(RUNS, got, strict=True):
        assert f["root"]["NX_class"] == "NXroot" and f["root"]["default"] == "entry"
        assert f["classes"]["entry"] == "NXentry" and f["classes"]["entry/data"] == "NXdata"
        assert f["classes"]["entry/instrument/detector"] == "NXdetector"
        assert f["classes"]["entry/start"] == f["classes"]["entry/stop"] == "NXcollection"
        assert f["signal"] == "data"
        assert f["frames"]["dtype"] == dtype and f["frames"]["shape"] == [n, *SHAPE]
        want = {"lz4": ["32004"]}.get(codec, ["32008"])  # bitshuffle-LZ4 unless lz4 came
        assert f["frames"]["filters"] == want
        # two workers may reorder a run's events: rows pair frames with their image_id
        rows = dict(zip(f["scalars"]["image_id"], f["frames"]["values"], strict=True))
        assert sorted(rows) == list(range(n))
        for i, frame in enumerate(sent.frames(label, dtype, n)):
            np.testing.assert_array_equal(np.array(rows[i], dtype=dtype), frame)
        energy = dict(zip(f["scalars"]["image_id"], f["scalars"]["energy"], strict=True))
        assert energy == {i: 8000.0 + i for i in range(n)}
        assert sorted(f["scalars"]) == ["energy", "image_id", "seq", "timestamp_ns"]
        assert sorted(f["scalars"]["seq"]) == list(range(n))
        assert f["start"]["label"] == label and f["start"]["count_time"] == 0.5
        assert f["omega"] == 1.5 and f["count_time_units"] == "s"
        np.testing.assert_array_equal(np.array(f["mask"], "<u4"), sent.mask())
        assert f["stop"] == {"label": label, "note": "done"}
        entry = f["entry"]
        assert entry["NX_class"] == "NXentry" and entry["complete"] is True
        assert entry["incomplete"] is False and entry["missing"] == 0
        assert entry["events_emitted"] == entry["events_written"] == n


# A slow source straight into the writer; the reader follows the file under SWMR.
SLOW = """
[topology]
name = swmr
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
shape = 64, 64
rate_hz = {rate}
seed = 5

[stage:nexus]
role = publisher
class = arroyo.io.hdf5:NexusWriter
path = {tmp}/nx
input = detector
"""

FOLLOWER = """
import json, os, sys, time
import h5py, hdf5plugin
name, frames = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 40
while True:  # the file is followable from its first frame on
    try:
        f = h5py.File(name, "r", swmr=True)
        break
    except (OSError, KeyError):
        assert time.monotonic() < deadline, "never opened"
        time.sleep(0.05)
dset, seq = f["entry/data/data"], f["entry/data/seq"]
seen, sums = [], {}
while time.monotonic() < deadline:
    dset.refresh(); seq.refresh()
    n = dset.shape[0]
    if n and (not seen or seen[-1] != n):
        seen.append(n)
        sums[n - 1] = int(dset[n - 1].sum(dtype="u8"))
    if n >= frames:
        break
    time.sleep(0.05)
f.close()
assert "arroyo" not in sys.modules
print(json.dumps({"seen": seen, "sums": sums}))
"""


def slow_chain(topo, stages, frames: int, rate: float) -> Path:
    path = topo(SLOW.replace("{frames}", str(frames)).replace("{rate}", str(rate)))
    stages.start(path, "nexus")
    time.sleep(0.3)  # (not needed for correctness: the link waits for its peer)
    stages.start(path, "detector")
    return path


@pytest.mark.timeout(90)
def test_a_reader_follows_the_file_while_the_run_is_open(tmp_path, topo, stages):
    frames = 30
    slow_chain(topo, stages, frames, rate=10)
    name = tmp_path / "nx" / "run_00001.h5"
    wait_for(name.exists, 20)
    out = subprocess.run(
        [sys.executable, "-I", "-c", FOLLOWER, str(name), str(frames)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    followed = json.loads(out.stdout)
    seen = followed["seen"]
    # it saw the file grow: frames while the run was still open (its Stop comes after
    # the last frame), and then all of them
    assert any(0 < n < frames for n in seen), seen
    assert len(seen) >= 3 and seen[-1] == frames, seen
    pool = DetectorSimulator(frames=frames, shape=(64, 64), seed=5).pool
    for row, total in followed["sums"].items():
        assert total == int(pool[int(row) % POOL_SIZE].sum(dtype="u8"))
    stages.stop_all(["detector.0", "nexus.0"])
    got = read_back_entry(name)
    assert got["complete"] and got["events_written"] == frames


def read_back_entry(name: Path) -> dict[str, Any]:
    code = (
        "import json, sys, h5py, hdf5plugin\n"
        "f = h5py.File(sys.argv[1], 'r')\n"
        "print(json.dumps({k: v.item() if hasattr(v, 'item') else v\n"
        "                  for k, v in f['entry'].attrs.items() if k != 'NX_class'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(name)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


KILLED = """
import json, sys
import h5py, hdf5plugin
try:
    h5py.File(sys.argv[1], "r")
    plain = "opened"
except OSError as e:
    plain = str(e)
with h5py.File(sys.argv[1], "r", swmr=True) as f:
    d = f["entry/data/data"]
    print(json.dumps({"plain": plain, "n": d.shape[0],
                      "sums": [int(x.sum(dtype="u8")) for x in d[()]],
                      "attrs": sorted(f["entry"].attrs)}))
"""


@pytest.mark.timeout(90)
def test_a_writer_killed_mid_run_leaves_a_file_readable_to_its_last_flush(tmp_path, topo, stages):
    slow_chain(topo, stages, 500, rate=50)
    name = tmp_path / "nx" / "run_00001.h5"
    wait_for(name.exists, 20)
    time.sleep(1.0)
    stages.signal("nexus.0", signal.SIGKILL)
    stages.wait("nexus.0")
    out = subprocess.run(
        [sys.executable, "-I", "-c", KILLED, str(name)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "h5clear" in got["plain"]  # a plain open is refused, with HDF5's hint
    assert got["n"] > 0 and "complete" not in got["attrs"]  # never finished
    pool = DetectorSimulator(frames=1, shape=(64, 64), seed=5).pool
    want = [int(pool[i % POOL_SIZE].sum(dtype="u8")) for i in range(got["n"])]
    assert got["sums"][:-1] == want[:-1]
    # (the last row may have been cut between its resize and its chunk: fill value)
    assert got["sums"][-1] in (want[-1], 0)


@pytest.mark.timeout(60)
def test_without_h5py_the_stage_exits_2_naming_the_extra(tmp_path, topo):
    fake = tmp_path / "no_h5py"
    fake.mkdir()
    (fake / "h5py.py").write_text("raise ImportError('no h5py here')\n")
    path = topo(SLOW.replace("{frames}", "1").replace("{rate}", "0"))
    out = subprocess.run(
        [arroyo_bin("arroyo-stage"), str(path), "nexus"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(fake)},
    )
    assert out.returncode == 2, out.stderr
    assert "NexusWriter: h5py is not installed: pip install 'arroyo[hdf5]'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(120)
def test_the_bench_row_measures_the_writer_beside_its_references(tmp_path):
    from arroyo_bench import report
    from arroyo_bench.hdf5_suite import FED, LOOP, NEXUS, nexus
    from arroyo_bench.plans import Plan
    from arroyo_bench.run import MIB, Runner

    plan = Plan("test", (MIB,), ("ipc",), 2, 100, 40 * MIB, ("nexus",))
    runner = Runner(tmp_path)
    try:
        rows = nexus(runner, plan)
    finally:
        runner.children.kill_all()
    assert [(r["case"], r["count"]) for r in rows] == [("compressed", 400), ("decoded", 100)]
    for row in rows:
        for side in (FED, LOOP, NEXUS):
            assert row[side]["msg_s"] > 0, (row["case"], side, row[side])
        assert row["ratio"] > 0
    assert not list(tmp_path.rglob("*.h5"))  # every side's file deleted once measured
    (target,) = [t for t in report.targets({"nexus": rows}) if t["target"] == "nexus writer"]
    assert target["value"] == min(r["ratio"] for r in rows)


DETECTOR = """
[topology]
name = nxdet
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = arroyo.io.zmq:ZMQListener
socket = pull
endpoint = {endpoint}
codec = dectris-stream2

[stage:nexus]
role = publisher
class = arroyo.io.hdf5:NexusWriter
path = {tmp}/nx
input = detector
"""

DETECTOR_READER = """
import json, sys
import h5py, hdf5plugin
out = []
for name in sys.argv[1:]:
    with h5py.File(name, "r") as f:
        d = f["entry/data"]
        out.append({"ids": d["image_id"][()].tolist(), "frames": d["data"][()].tolist(),
                    "chunk0": d["data"].id.read_direct_chunk((0, 0, 0))[1].hex(),
                    "mask": f["entry/instrument/detector/pixel_mask"][()].tolist(),
                    "unique": f["entry/start/series_unique_id"][()].decode(),
                    "complete": bool(f["entry"].attrs["complete"])})
assert "arroyo" not in sys.modules
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_detector_stream_goes_to_nexus_files_as_it_came(tmp_path, supervised):
    from arroyo.io.dectris import StreamV2
    from arroyo.io.simulate import Settings, Simulator
    from tests.integration.test_detectors import free_endpoint, simulate

    endpoint = free_endpoint()
    supervised(DETECTOR.replace("{endpoint}", endpoint))
    args = ["--shape", "48,64", "--images", "20", "--series", "2", "--seed", "7"]
    printed = simulate(endpoint, *args, "--header-detail", "all", "--compression", "bslz4")
    assert printed.count("20/20 images sent") == 2, printed
    wait_for(lambda: writer_stats(tmp_path).get("runs", 0) >= 2, 60)
    files = sorted((tmp_path / "nx").glob("*.h5"))
    out = subprocess.run(
        [sys.executable, "-I", "-c", DETECTOR_READER, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    sim = Simulator(Settings(shape=(48, 64), images=20, seed=7, header_detail="all"))
    decoder = StreamV2()
    sent = [m for kind, frames in sim.messages() for m in decoder.decode(frames)]
    start, first = sent[0], sent[1]
    assert len(got) == 2 and got[0]["unique"] != got[1]["unique"]
    for f in got:
        assert f["complete"] and f["ids"] == list(range(20))
        for image_id, frame in zip(f["ids"], f["frames"], strict=True):
            np.testing.assert_array_equal(np.array(frame, "<u2"), sim.frame(image_id)[0])
        np.testing.assert_array_equal(np.array(f["mask"]), start.data["pixel_mask"])
        # the file holds the detector's own compressed bytes for each frame
        assert bytes.fromhex(f["chunk0"]) == bytes(first.raw_payload.data)
