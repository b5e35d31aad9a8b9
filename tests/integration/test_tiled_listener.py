"""The Tiled listener in a real stage process against a real Tiled server, fed by a
plain Tiled client in another process that does not import Arroyo (issue 22: "every
frame arrives once, in order, as numpy arrays; after a server restart it resumes
without duplicates")."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Stages, need_extra, read_jsonl, wait_for
from tests.tiled_server import TiledServer, running

need_extra("tiled", "tiled.client", "tiled.server", "pyarrow")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def tiled_server(tmp_path: Path) -> Iterator[TiledServer]:
    with running(tmp_path / "tiled") as server:
        yield server


TOPOLOGY = """
[topology]
name = follow
run_dir = {tmp}/.arroyo

[chain:c]
stages = follow, sink

[stage:follow]
role = listener
class = arroyo.io.tiled_listener:TiledListener
url = %(url)s
node = raw
quiet_seconds = 60
api_key = %(key)s

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = follow
"""

# The producer: a plain Tiled client, as a beamline's own writer would be. Each run
# is a container under `raw` with an array `data` grown by appends. Frame i of a
# run is `frame(seed, i)`; between runs it waits for a file named by the test, so
# the test can stop and restart the server with nothing in flight.
PRODUCER = r"""
import os, sys, time
from pathlib import Path
import numpy as np
from tiled.client import from_uri

url, key, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
plan = [tuple(int(x) for x in run.split(":")) for run in sys.argv[4:]]

def frame(seed, i, shape, dtype):
    return np.random.default_rng(seed * 100_000 + i).integers(0, 1000, shape).astype(dtype)

def retry(call):
    for _ in range(600):
        try:
            return call()
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("the server never came back")

raw = retry(lambda: from_uri(url, api_key=key)["raw"])
for index, (seed, frames, side, per_write, pause_at) in enumerate(plan):
    shape, dtype = (side, side), ("float32" if side >= 512 else "uint16")
    run = raw.create_container(f"run_{seed}", metadata={"seed": seed, "frames": frames})
    block = np.stack([frame(seed, i, shape, dtype) for i in range(per_write)])
    data = run.write_array(block, key="data")
    for first in range(per_write, frames, per_write):
        if first == pause_at:
            (folder / f"paused_{seed}").touch()
            while not (folder / f"go_{seed}").exists():
                time.sleep(0.05)
            raw = retry(lambda: from_uri(url, api_key=key)["raw"])
            run, data = raw[f"run_{seed}"], raw[f"run_{seed}"]["data"]
        n = min(per_write, frames - first)
        block = np.stack([frame(seed, first + i, shape, dtype) for i in range(n)])
        retry(lambda: data.patch(block, offset=(first,), extend=True))
    retry(lambda: run.update_metadata(metadata={"stop": {"frames": frames}}))
print("done", flush=True)
"""


def frame(seed: int, i: int, side: int) -> np.ndarray:
    dtype = "float32" if side >= 512 else "uint16"
    return np.random.default_rng(seed * 100_000 + i).integers(0, 1000, (side, side)).astype(dtype)


def produce(server: TiledServer, folder: Path, plan: list[str]) -> subprocess.Popen[str]:
    script = folder / "producer.py"
    script.write_text(PRODUCER)
    env = {"TILED_RETRY_ATTEMPTS": "1", "HOME": str(folder), "TMPDIR": str(folder)}
    return subprocess.Popen(
        [sys.executable, str(script), server.url, server.key, str(folder), *plan],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def runs_in(out: Path) -> dict[str, list[dict[str, Any]]]:
    """The sink's records, by Tiled run, once each run's Stop is in."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for record in read_jsonl(out) if out.exists() else []:
        key = (record.get("data") or {}).get("tiled_run") or record["metadata"]["tiled_run"]
        runs.setdefault(key, []).append(record)
    return runs


def finished(out: Path, n: int, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """The sink's records by run, once ``n`` runs have arrived with their Stop."""

    def done() -> dict[str, list[dict[str, Any]]] | None:
        runs = runs_in(out)
        ended = len(runs) == n and all(r[-1]["kind"] == "Stop" for r in runs.values())
        return runs if ended else None

    return wait_for(done, timeout=timeout)


def follow(server: TiledServer, topo: Any, stages: Stages, tmp_path: Path, extra: str = "") -> Path:
    """The node ``raw`` made, the listener (options ``extra`` added) and its sink
    started and ready; returns the sink's file."""
    client: Any = server.client()
    if "raw" not in client:
        client.create_container(key="raw")
    text = TOPOLOGY % {"url": server.url, "key": server.key}
    path = topo(text.replace("node = raw\n", f"node = raw\n{extra}"))
    stages.start(path, "sink")
    stages.start(path, "follow")
    wait_for(lambda: (tmp_path / ".arroyo" / "stats" / "follow.0.json").exists(), timeout=30)
    return tmp_path / "out.jsonl"


def check(records: list[dict[str, Any]], seed: int, frames: int, side: int) -> None:
    kinds = [r["kind"] for r in records]
    assert kinds == ["Start"] + ["Event"] * frames + ["Stop"], kinds[:5]
    assert records[0]["data"]["seed"] == seed
    events = records[1:-1]
    assert [e["metadata"]["frame"] for e in events] == list(range(frames))
    dtype = np.dtype("float32" if side >= 512 else "uint16").str
    for i, e in enumerate(events):
        want = frame(seed, i, side)
        got = e["payload"]
        assert got["shape"] == [side, side] and got["dtype"] == dtype, got
        assert got["sum"] == pytest.approx(float(want.sum())), i
    stop = records[-1]["data"]
    assert stop["ended"] == "stop" and stop["frames"] == frames, stop


def wait_done(proc: subprocess.Popen[str], timeout: float) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "done" in out, out


def test_follows_runs_written_by_a_plain_client(
    tiled_server: TiledServer, topo: Any, stages: Stages, tmp_path: Path
) -> None:
    """A run of 1 MiB frames (one per write) and a run of small frames (five per
    write): every frame once, in order, equal; each run closed by its stop."""
    out = follow(tiled_server, topo, stages, tmp_path)
    producer = produce(tiled_server, tmp_path, ["1:40:512:1:0", "2:300:16:5:0"])
    try:
        wait_done(producer, timeout=120)
        runs = finished(out, 2, timeout=60)
        check(runs["run_1"], seed=1, frames=40, side=512)
        check(runs["run_2"], seed=2, frames=300, side=16)
    finally:
        producer.kill()
        producer.wait(10)
    assert stages.stop_all()["follow.0"] == 0


def test_resumes_after_the_server_restarts(
    tiled_server: TiledServer, topo: Any, stages: Stages, tmp_path: Path
) -> None:
    """The server is stopped mid-run and started again (a streaming cache that
    forgets, sequence numbers from 1 again): the run goes on, each frame once."""
    out = follow(tiled_server, topo, stages, tmp_path)
    producer = produce(tiled_server, tmp_path, ["3:200:32:4:100", "4:60:32:3:0"])
    try:
        wait_for(lambda: (tmp_path / "paused_3").exists(), timeout=60)
        tiled_server.stop()
        tiled_server.start()
        (tmp_path / "go_3").touch()
        wait_done(producer, timeout=120)
        runs = finished(out, 2, timeout=90)
        check(runs["run_3"], seed=3, frames=200, side=32)
        check(runs["run_4"], seed=4, frames=60, side=32)
    finally:
        producer.kill()
        producer.wait(10)
    assert stages.stop_all()["follow.0"] == 0


@pytest.mark.parametrize("start", ["all", "1"])
def test_a_late_listener_emits_the_runs_already_written(
    tiled_server: TiledServer, topo: Any, stages: Stages, tmp_path: Path, start: str
) -> None:
    """``start = all`` (every run the node holds) and ``start = 1`` (the node's stream
    replayed from its first update, as the server keeps it): runs written before the
    listener started come out whole, oldest first, and live runs follow."""
    client: Any = tiled_server.client()
    client.create_container(key="raw")
    wait_done(produce(tiled_server, tmp_path, ["5:30:16:3:0", "6:20:16:4:0"]), timeout=120)
    out = follow(tiled_server, topo, stages, tmp_path, extra=f"start = {start}\n")
    wait_for(lambda: len(runs_in(out)) == 2, timeout=60)
    producer = produce(tiled_server, tmp_path, ["7:25:16:5:0"])
    try:
        wait_done(producer, timeout=120)
        runs = finished(out, 3, timeout=60)
        assert list(runs) == ["run_5", "run_6", "run_7"]
        check(runs["run_5"], seed=5, frames=30, side=16)
        check(runs["run_6"], seed=6, frames=20, side=16)
        check(runs["run_7"], seed=7, frames=25, side=16)
    finally:
        producer.kill()
        producer.wait(10)
    assert stages.stop_all()["follow.0"] == 0
