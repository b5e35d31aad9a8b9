"""Detector streams end to end, with real processes: ``arroyo simulate`` (a simulated
DCU, its own process) -> the ZMQ listener stage with each detector codec -> a
decoding operator at two workers -> a writer that keeps every frame. Frames are
compared exactly with the ones the simulator sent (rebuilt from its seed)."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.io.simulate import Settings, Simulator
from tests.conftest import arroyo_bin, need_detectors, wait_for
from tests.integration.conftest import arroyo

need_detectors()

LOST_REASON = "images the detector stream lost"

TOPOLOGY = """
[topology]
name = det
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = arroyo.io.zmq:ZMQListener
socket = pull
bind = false
endpoint = {endpoint}
codec = {codec}

[stage:decode]
role = operator
class = stages.basic:Decode
input = detector
workers = 2

[stage:sink]
role = publisher
class = stages.writers:RunFolderWriter
path = {tmp}/runs
format = npz
input = decode
"""


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_chain(supervised: Callable[[str], Path], codec: str) -> tuple[Path, str]:
    endpoint = free_endpoint()
    path = supervised(
        textwrap.dedent(TOPOLOGY).replace("{endpoint}", endpoint).replace("{codec}", codec)
    )
    return path, endpoint


def simulate(endpoint: str, *args: str) -> str:
    """Run ``arroyo simulate`` to its end (it waits for the listener to connect)."""
    result = subprocess.run(
        [arroyo_bin("arroyo"), "simulate", "--endpoint", endpoint, "--linger", "20", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_folders(tmp_path: Path, n: int) -> list[Path]:
    """The writer's first ``n`` run folders, once each has its stop.json."""

    def done() -> list[Path] | None:
        folders = sorted((tmp_path / "runs").glob("run_*"))
        if len(folders) >= n and all((f / "stop.json").exists() for f in folders[:n]):
            return folders[:n]
        return None

    return wait_for(done, timeout=60, interval=0.2)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def frames_of(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    """image_id -> {array name suffix: array} of one run folder."""
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(folder / "frames.npz", allow_pickle=False) as npz:
        for e in events:
            prefix = f"frame_{e['seq']:06d}"
            arrays = {k[len(prefix) :].lstrip("_"): npz[k] for k in npz if k.startswith(prefix)}
            out[e["metadata"]["image_id"]] = arrays
    return out


def status_runs(path: Path, stage: str) -> list[dict[str, Any]]:
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    return [r for row in rows if row["stage"] == stage for r in row["runs"]]


CASES = [
    ("dectris-stream2", "uint16", "bslz4", 1),
    ("dectris-stream2", "uint32", "lz4", 2),
    ("dectris-stream2", "uint8", "none", 1),
    ("dectris-stream1", "uint32", "bslz4", 1),
    ("dectris-stream1", "uint16", "lz4", 1),
    ("htype", "uint8", "bslz4", 1),
    ("htype", "uint16", "none", 1),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("fmt", "dtype", "compression", "channels"), CASES)
def test_every_series_arrives_whole_and_exact_across_two_workers(
    tmp_path, supervised, fmt, dtype, compression, channels
):
    path, endpoint = start_chain(supervised, fmt)
    args = [
        "--format",
        fmt,
        "--dtype",
        dtype,
        "--compression",
        compression,
        "--channels",
        str(channels),
        "--shape",
        "48,64",
        "--images",
        "30",
        "--series",
        "2",
        "--seed",
        "7",
        "--header-detail",
        "all",
    ]
    printed = simulate(endpoint, *args)
    assert printed.count("30/30 images sent") == 2, printed
    sent = Simulator(
        Settings(
            format=fmt,
            dtype=dtype,
            compression=compression,
            channels=channels,
            shape=(48, 64),
            seed=7,
        )
    )
    names = sent.settings.channel_names
    folders = run_folders(tmp_path, 2)
    unique_ids = set()
    for folder in folders:
        stop = read_json(folder / "stop.json")
        assert stop["complete"] is True and stop["written"] == stop["events"] == 30, stop
        start = read_json(folder / "start.json")["data"]
        unique_ids.add(start.get("series_unique_id"))
        frames = frames_of(folder)
        assert sorted(frames) == list(range(30))  # every image once, in one run
        for image_id, arrays in frames.items():
            want = sent.frame(image_id)
            if channels == 1:
                (got,) = arrays.values()
                assert got.dtype == np.dtype(dtype) and got.shape == (48, 64)
                np.testing.assert_array_equal(got, want[0])
            else:
                assert sorted(arrays) == sorted(names)
                for name, array in zip(names, want, strict=True):
                    np.testing.assert_array_equal(arrays[name], array)
    if fmt == "dectris-stream2":
        assert len(unique_ids) == 2  # two series, two runs
    reports = wait_for(lambda: len(status_runs(path, "sink")) >= 2 and status_runs(path, "sink"))
    assert all(r["complete"] and r["received"] == 30 for r in reports[:2]), reports


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["dectris-stream2", "dectris-stream1", "htype"])
def test_images_dropped_by_the_sender_make_the_run_incomplete_by_exactly_that_many(
    tmp_path, supervised, fmt
):
    path, endpoint = start_chain(supervised, fmt)
    printed = simulate(
        endpoint,
        "--format",
        fmt,
        "--compression",
        "bslz4",
        "--shape",
        "32,32",
        "--images",
        "40",
        "--drop",
        "0,7,20-22,39",
    )
    assert "34/40 images sent, 6 dropped (0,7,20-22,39)" in printed, printed
    (folder,) = run_folders(tmp_path, 1)
    stop = read_json(folder / "stop.json")
    assert stop["complete"] is False and stop["written"] == 34, stop
    assert sorted(frames_of(folder)) == sorted(set(range(40)) - {0, 7, 20, 21, 22, 39})

    def sink_report() -> dict[str, Any] | None:
        runs = status_runs(path, "sink")
        return runs[0] if runs else None

    report = wait_for(sink_report)
    assert not report["complete"] and report["received"] == 34, report
    # the loss is the detector stream's, with its exact count, not a stage's
    assert report.get("losses") == {LOST_REASON: 6}, report


@pytest.mark.timeout(120)
def test_series_with_the_same_series_id_and_new_unique_ids_stay_two_runs(tmp_path, supervised):
    _path, endpoint = start_chain(supervised, "dectris-stream2")
    simulate(
        endpoint,
        "--images",
        "20",
        "--series",
        "2",
        "--repeat-series-id",
        "--shape",
        "32,32",
        "--series-id",
        "5",
    )
    folders = run_folders(tmp_path, 2)
    starts = [read_json(f / "start.json")["data"] for f in folders]
    assert [s["series_id"] for s in starts] == [5, 5]
    assert starts[0]["series_unique_id"] != starts[1]["series_unique_id"]
    for folder in folders:
        stop = read_json(folder / "stop.json")
        assert stop["complete"] is True and stop["written"] == 20, stop
        assert sorted(frames_of(folder)) == list(range(20))


# 1,000 malformed Stream V2 messages from a plain pyzmq process, 200 of each kind;
# the listener has never seen a start, so even well-formed images are refused.
MALFORMED = r"""
import sys, zmq, cbor2, numpy as np
from arroyo.io.simulate import Settings, Simulator
sim = Simulator(Settings(shape=(32, 32), images=2))
good = [f[0] for k, f in sim.messages() if k == "image"][0]
bad_tag = cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 1,
    "series_unique_id": "X", "image_id": 0, "data": {"threshold_1": cbor2.CBORTag(40,
    [[32, 32], cbor2.CBORTag(69, b"\x00" * 7)])}}))
kinds = [
    b"\xff\x00 not cbor at all",          # not CBOR
    good[: len(good) // 2],               # truncated
    good,                                 # an image of a series never started
    bad_tag,                              # a typed array of the wrong size
    [good, good],                         # two frames: Stream V2 sends one
]
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.bind(sys.argv[1])
for i in range(1000):
    m = kinds[i % 5]
    sock.send_multipart(m) if isinstance(m, list) else sock.send(m)
sock.close(linger=20000)
ctx.term()
"""


@pytest.mark.timeout(150)
def test_malformed_messages_are_counted_by_reason_and_a_good_series_follows(tmp_path, supervised):
    _path, endpoint = start_chain(supervised, "dectris-stream2")
    sender = tmp_path / "malformed.py"
    sender.write_text(MALFORMED)
    subprocess.run([sys.executable, str(sender), endpoint], check=True, timeout=90)
    stats = tmp_path / ".arroyo" / "stats" / "detector.0.json"

    def drops() -> dict[str, int] | None:
        found = read_json(stats).get("drops", {}) if stats.exists() else {}
        return found if sum(found.values()) >= 1000 else None

    counted = wait_for(drops, timeout=30, interval=0.2)
    assert sum(counted.values()) == 1000, counted
    assert len(counted) >= 4, f"not counted by reason: {counted}"
    assert counted.get("no_series") == 200, counted  # well-formed but no series open
    assert counted.get("frame_count") == 200, counted
    # the stage lives: a good series after them arrives whole
    simulate(endpoint, "--images", "25", "--shape", "32,32")
    (folder,) = run_folders(tmp_path, 1)
    stop = read_json(folder / "stop.json")
    assert stop["complete"] is True and stop["written"] == 25, stop
    assert sum(read_json(stats)["drops"].values()) == 1000


# Python with the detector extra made unimportable (as if never installed).
WITHOUT_EXTRA = """
import sys
for name in ("bitshuffle", "lz4", "lz4.block", "lz4.frame", "cbor2"):
    sys.modules[name] = None
import arroyo, arroyo.io.zmq, arroyo.message, arroyo.compression
from arroyo.control.cli import main, stage_main

stage_main(sys.argv[2:]) if sys.argv[1] == "stage" else main(sys.argv[1:])
"""


@pytest.mark.timeout(60)
def test_the_core_works_without_the_extra_and_a_detector_codec_names_it(topo, tmp_path):
    script = tmp_path / "without.py"
    script.write_text(WITHOUT_EXTRA)

    def without(*args: str) -> subprocess.CompletedProcess[str]:
        """``arroyo ARGS`` in a Python where the detectors extra cannot be imported."""
        command = [sys.executable, str(script), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    def topology(codec: str) -> str:
        text = textwrap.dedent(TOPOLOGY).replace("{endpoint}", free_endpoint())
        return str(topo(text.replace("{codec}", codec), f"{codec}.ini"))

    ok = without("check", topology("arroyo"))
    assert ok.returncode == 0, ok.stderr
    detector = topology("dectris-stream2")
    # the check passes (nothing to decode yet); the listener's process says what to install
    checked = without("check", detector)
    assert checked.returncode == 0, checked.stderr
    bad = without("stage", detector, "detector")
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert bad.stderr.count("\n") == 1 and "pip install 'arroyo[detectors]'" in bad.stderr
    sim = without("simulate", "--images", "1")
    assert sim.returncode == 2 and "arroyo[detectors]" in sim.stderr, sim.stderr


DOC = Path(__file__).resolve().parents[2] / "docs" / "detectors.md"


@pytest.mark.timeout(120)
def test_the_docs_simulator_command_and_listener_section_work_as_written(tmp_path, supervised):
    """docs/detectors.md, "Trying it without a detector": its listener section and its
    command, on a free port instead of the DCU's (the only change)."""
    text = DOC.read_text()
    section = text[text.index("## Trying it without a detector") :]
    command = re.search(r"^```\n(arroyo simulate .*?)^```", section, flags=re.M | re.S)
    ini = re.search(r"^```ini\n(.*?)^```", section, flags=re.M | re.S)
    assert command and ini, "the section lost its command or its INI block"
    args = shlex.split(command.group(1).replace("\\\n", " "))
    endpoint = free_endpoint()
    listener = ini.group(1).replace("tcp://127.0.0.1:31001", endpoint)
    path = supervised(
        "[topology]\nname = doc\nrun_dir = {tmp}/.arroyo\n\n" + listener + SINK_AFTER_DETECTOR
    )
    out = simulate(endpoint, *args[2:])
    assert out.count("200/200 images sent") == 2, out
    folders = run_folders(tmp_path, 2)
    for folder in folders:
        stop = read_json(folder / "stop.json")
        assert stop["events"] == 200 and not stop.get("incomplete"), stop
    reports = wait_for(lambda: len(r := status_runs(path, "sink")) == 2 and r, timeout=30)
    assert all(r["complete"] for r in reports), reports


SINK_AFTER_DETECTOR = """
[stage:sink]
role = publisher
class = stages.writers:RunFolderWriter
path = {tmp}/runs
format = npz
input = detector
"""
