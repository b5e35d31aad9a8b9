"""Detector frames from plain pyzmq processes reach an operator as numpy arrays.

The topologies and the senders are the ones docs/foreign-frames.md shows, taken from
that file (only the port is changed), so the page keeps working as written.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Stages, read_jsonl, wait_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "foreign-frames.md"

pytestmark = pytest.mark.timeout(90)

# A wrong-size frame between two good ones, from yet another plain pyzmq process.
BAD_THEN_GOOD = """
import sys, numpy as np, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.bind(sys.argv[1])
sock.send(np.zeros((256, 255), np.uint16))  # one column short: 130,560 bytes
sock.send_multipart([b"x", b"y"])           # two frames: not one raw frame
sock.send(np.ones((256, 256), np.uint16))   # the stage goes on
sock.close()
ctx.term()
"""


def doc_blocks() -> dict[str, str]:
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", DOC.read_text(), flags=re.M | re.S):
        m = re.fullmatch(r"(?:#|;)\s*([\w.-]+\.(?:py|ini))", block.splitlines()[0].strip())
        if m:
            files[m.group(1)] = block
    return files


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def setup_doc_example(tmp_path: Path, ini: str, sender: str) -> tuple[Path, Path, Path, str]:
    """Write the doc's topology and sender with a free port; the sink writes in tmp_path."""
    blocks = doc_blocks()
    port = free_port()
    doc_port = re.search(r"127\.0\.0\.1:(\d+)", blocks[ini]).group(1)  # type: ignore[union-attr]
    out = tmp_path / "frames.jsonl"
    topology = tmp_path / ini
    topology.write_text(
        blocks[ini].replace(f":{doc_port}", f":{port}").replace("frames.jsonl", str(out))
    )
    script = tmp_path / sender
    script.write_text(blocks[sender].replace(f":{doc_port}", f":{port}"))
    return topology, script, out, f"tcp://127.0.0.1:{port}"


def start(stages: Stages, topology: Path) -> None:
    for stage in ("sink", "stats", "detector"):
        stages.start(topology, stage)


def listener_drops(tmp_path: Path, name: str) -> dict[str, int]:
    stats = tmp_path / ".arroyo" / name / "stats" / "detector.0.json"
    return json.loads(stats.read_text()).get("drops", {}) if stats.exists() else {}


def events(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out) if r["kind"] == "Event"]


def test_raw_frames_become_arrays_of_the_ini_dtype_and_shape(tmp_path, stages):
    topology, script, out, endpoint = setup_doc_example(tmp_path, "array.ini", "send_array.py")
    start(stages, topology)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    got = wait_for(lambda: len(events(out)) >= 100 and events(out), 30)
    assert len(got) == 100
    for record in got:
        assert record["payload"]["dtype"] == "<u2" and record["payload"]["shape"] == [256, 256]
        # FrameStats computed these: the operator saw an array, not bytes.
        assert 0 <= record["metadata"]["min"] <= record["metadata"]["max"] < 4096
    (tmp_path / "bad.py").write_text(BAD_THEN_GOOD)
    subprocess.run([sys.executable, str(tmp_path / "bad.py"), endpoint], check=True, timeout=60)
    wait_for(lambda: len(events(out)) == 101, 30)
    assert events(out)[-1]["metadata"]["max"] == 1.0
    drops = wait_for(lambda: listener_drops(tmp_path, "array").get("frame_count") and
                     listener_drops(tmp_path, "array"), 10)  # fmt: skip
    assert drops == {"frame_size": 1, "frame_count": 1}
    assert all(code == 0 for code in stages.stop_all(["detector.0", "stats.0", "sink.0"]).values())


def test_header_frames_carry_arrays_metadata_and_runs(tmp_path, stages):
    topology, script, out, _ = setup_doc_example(tmp_path, "header.ini", "send_header.py")
    start(stages, topology)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    wait_for(lambda: any(r["kind"] == "Stop" for r in read_jsonl(out)), 30)
    records = read_jsonl(out)
    assert [r["kind"] for r in records if r["kind"] != "Event"] == ["Start", "Stop"]
    start_record, stop_record = records[0], records[-1]
    assert start_record["data"]["sample"] == "silicon"
    assert stop_record["data"]["frames"] == 100
    got = events(out)
    assert [r["metadata"]["frame"] for r in got] == list(range(100))
    for i, record in enumerate(got):
        assert record["run"] == start_record["run"] > 0
        assert record["payload"]["dtype"] == "<f4" and record["payload"]["shape"] == [128, 128]
        assert record["metadata"]["mean"] == float(i)
    assert all(code == 0 for code in stages.stop_all(["detector.0", "stats.0", "sink.0"]).values())
