"""Compressed detector frames cross the chain as they came and are decoded in the
workers that read them (issue 20, item 3; docs/wire-format.md §9).

A plain pyzmq process pushes Arroyo wire-format messages whose payloads are
bitshuffle-LZ4 frames; two workers compute statistics of each frame (reading the
payload decodes it); the sink gets the statistics of the original frames, and the
listener's output link counted the compressed bytes, not the decoded ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import need_detectors, read_jsonl, runs_of, wait_for
from tests.integration.test_foreign_frames import free_port

pytestmark = pytest.mark.timeout(120)
need_detectors()

FRAMES, SHAPE = 40, (256, 256)

TOPOLOGY = """
[topology]
name = packed
run_dir = {tmp}/.arroyo

[chain:c]
stages = detector, stats, sink

[stage:detector]
role = listener
class = arroyo.io.zmq:ZMQListener
endpoint = tcp://127.0.0.1:{port}
codec = arroyo

[stage:stats]
role = operator
class = stages.reduce:FrameStats
input = detector
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = stats
"""

SENDER = """
import sys, numpy as np, zmq
from arroyo import wire
from arroyo.compression import compress
from arroyo.message import Encoded, Event, Start, Stop
rng = np.random.default_rng(7)
sock = zmq.Context.instance().socket(zmq.PUSH)
sock.bind(sys.argv[1])
sock.send_multipart(wire.encode(Start(data={{"series": 1}})))
for i in range({frames}):
    frame = rng.poisson(2 + i % 5, {shape}).astype("<u2")
    packed = compress("bslz4", frame)
    event = Event({{"image_id": i}}, Encoded("bslz4", frame.dtype, frame.shape, packed))
    sock.send_multipart(wire.encode(event))
sock.send_multipart(wire.encode(Stop()))
sock.close(linger=10000)
"""


def expected_frames() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.poisson(2 + i % 5, SHAPE).astype("<u2") for i in range(FRAMES)]


def link_bytes(tmp_path: Path, stage: str, direction: str) -> int:
    stats = json.loads((tmp_path / ".arroyo" / "stats" / f"{stage}.0.json").read_text())
    return sum(link["bytes"] for link in stats["links"] if link["direction"] == direction)


def test_compressed_frames_travel_compressed_and_decode_in_the_workers(supervised, tmp_path):
    port = free_port()
    supervised(TOPOLOGY.format(tmp="{tmp}", port=port))
    script = tmp_path / "send.py"
    script.write_text(SENDER.format(frames=FRAMES, shape=SHAPE))
    subprocess.run([sys.executable, str(script), f"tcp://127.0.0.1:{port}"], check=True, timeout=60)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: any(r["kind"] == "Stop" for r in read_jsonl(out)), 60)
    [(_run, count, stop)] = runs_of(read_jsonl(out))
    assert count == FRAMES and not stop["data"].get("incomplete")
    events = sorted((r for r in read_jsonl(out) if r["kind"] == "Event"),
                    key=lambda r: r["metadata"]["image_id"])  # fmt: skip
    for record, frame in zip(events, expected_frames(), strict=True):
        assert record["metadata"]["sum"] == float(frame.sum())
        assert record["metadata"]["max"] == float(frame.max())
    # what the listener sent on: the compressed frames (a few hundred bytes of headers
    # per message aside), well under the decoded 128 KiB each
    decoded = FRAMES * SHAPE[0] * SHAPE[1] * 2
    sent = wait_for(lambda: link_bytes(tmp_path, "detector", "out"), 20)
    assert sent < decoded / 2, (sent, decoded)
