"""The Tiled writer in real stage processes against a real Tiled server (issue 22:
"three runs of 200 events through the writer"; "the Tiled server is stopped mid-run
and started again: the writer's counts and the data in Tiled agree; nothing is
duplicated")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.message import Event, Start
from stages.reduce import RadialProfile
from stages.synthetic import POOL_SIZE, DetectorSimulator
from tests.conftest import need_extra, wait_for
from tests.integration.conftest import arroyo
from tests.tiled_server import TiledServer, running

need_extra("tiled", "tiled.client", "tiled.server", "pyarrow")


@pytest.fixture
def tiled_server(tmp_path: Path) -> Iterator[TiledServer]:
    with running(tmp_path / "tiled") as server:
        yield server


FRAMES, RUNS, SHAPE, BINS = 200, 3, (24, 32), 16

TOPOLOGY = """
[topology]
name = tiled
run_dir = {tmp}/.arroyo

[chain:c]
stages = detector, reduce, profiles, images

[stage:detector]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = {shape}
rate_hz = {rate}

[stage:reduce]
role = operator
class = stages.reduce:RadialProfile
input = detector
bins = {bins}

[stage:profiles]
role = publisher
class = arroyo.io.tiled:TiledWriter
input = reduce
url = {url}
node = profiles
batch_seconds = 0.3
give_up_seconds = 120

[stage:images]
role = publisher
class = arroyo.io.tiled:TiledWriter
input = detector (pub)
url = {url}
node = images
batch_seconds = 0.3
give_up_seconds = 120
"""


def _topology(server: TiledServer, runs: int, rate: float) -> str:
    shape = ", ".join(map(str, SHAPE))
    text = TOPOLOGY.format(
        frames=FRAMES, runs=runs, shape=shape, rate=rate, bins=BINS, url=server.url, tmp="{tmp}"
    )
    # The key reaches the stages by the environment, as in production (never the INI).
    extra = f"environment = TILED_API_KEY={server.key},TILED_RETRY_ATTEMPTS=1\n"
    return text.replace("give_up_seconds = 120\n", "give_up_seconds = 120\n" + extra)


def _expected() -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """The frames and profiles the stages send, made here by the same classes."""
    sim = DetectorSimulator(frames=FRAMES, shape=SHAPE)
    frames = [sim.pool[i % POOL_SIZE] for i in range(FRAMES)]
    op = RadialProfile(bins=BINS)
    op.process(Start(data=sim._start_data(0)))
    profiles = []
    for i in range(POOL_SIZE):
        out = op.process(Event({"frame": i}, frames[i]))
        assert isinstance(out, Event) and isinstance(out.payload, dict)
        profiles.append(out.payload)
    return frames, [profiles[i % POOL_SIZE] for i in range(FRAMES)]


def _finished(client: Any, node: str, runs: int) -> list[Any]:
    try:
        containers = [client[node][k] for k in client[node]]
    except Exception:  # (the server may be restarting)
        return []
    done = [c for c in containers if "complete" in c.metadata]
    return done if len(done) >= runs else []


def _rows(client: Any, node: str) -> int:
    try:
        return len(client[node]["run_00001"]["events"].read())
    except Exception:  # not made yet; Tiled 0.2.20 answers 500 to a table with no rows
        return 0


def _make_nodes(server: TiledServer) -> Any:
    client = server.client()
    for name in ("profiles", "images"):
        client.create_container(key=name)  # type: ignore[attr-defined]
    return client


def test_three_runs_of_200_events(tiled_server: TiledServer, supervised: Any) -> None:
    client = _make_nodes(tiled_server)
    path = supervised(_topology(tiled_server, RUNS, rate=0))
    frames, profiles = _expected()
    for node in ("images", "profiles"):
        runs = wait_for(lambda node=node: _finished(client, node, RUNS), timeout=45)
        assert sorted(k for k in client[node]) == [f"run_{n:05d}" for n in (1, 2, 3)]
        for index, run in enumerate(sorted(runs, key=lambda c: c.metadata["arroyo_run"])):
            meta = run.metadata
            assert meta["start"]["frames"] == FRAMES and meta["start"]["index"] == index
            assert meta["stop"] == {"frames": FRAMES}
            assert meta["complete"] is True and meta["incomplete"] is False
            assert meta["events_emitted"] == meta["events_written"] == FRAMES
            assert meta["missing"] == 0
            table = run["events"].read()
            assert list(table["seq"]) == list(range(FRAMES))
            assert list(table["frame"]) == list(range(FRAMES))
            if node == "images":
                assert np.array_equal(run["data"].read(), np.stack(frames))
                assert run["data"].dtype == frames[0].dtype
            else:
                for name in ("r", "I"):
                    sent = np.stack([p[name] for p in profiles])
                    assert np.array_equal(run[name].read(), sent), name
    _no_key_in(path.parent / ".arroyo", tiled_server.key)


def test_server_restarted_mid_run(tiled_server: TiledServer, supervised: Any) -> None:
    client = _make_nodes(tiled_server)
    path = supervised(_topology(tiled_server, 1, rate=20))  # a 10 s run
    wait_for(lambda: _rows(client, "images") > 0, timeout=30)
    tiled_server.stop()
    tiled_server.start()  # the same catalog, the same port
    client = tiled_server.client()
    frames, profiles = _expected()
    for node in ("images", "profiles"):
        (run,) = wait_for(lambda node=node: _finished(client, node, 1), timeout=45)
        meta = run.metadata
        written = meta["events_written"]
        table = run["events"].read()
        seqs = list(table["seq"])
        assert len(seqs) == len(set(seqs)) == written, "a row was written twice or lost"
        # nothing given up on here: the server was back well within give_up_seconds
        assert written == FRAMES and meta["complete"] is True, meta
        assert seqs == list(range(FRAMES))
        if node == "images":
            assert np.array_equal(run["data"].read(), np.stack(frames))
        else:
            assert np.array_equal(run["I"].read(), np.stack([p["I"] for p in profiles]))
    logs = arroyo("logs", str(path), "images").stdout + arroyo("logs", str(path), "profiles").stdout
    assert "retrying with backoff" in logs and "connected again" in logs, logs
    _no_key_in(path.parent / ".arroyo", tiled_server.key)


def _no_key_in(run_dir: Path, key: str) -> None:
    """The API key is in no log (the configuration files hold it: the user put it there)."""
    logs = [f for f in run_dir.rglob("*") if f.is_file() and f.suffix not in (".ini", ".conf")]
    assert any(f.suffix == ".log" for f in logs), logs
    for file in logs:
        assert key not in file.read_text(errors="replace"), file


def test_unknown_count_grows_by_batch_and_drops_misfits(tiled_server: TiledServer) -> None:
    """A Start without a count: the arrays grow batch by batch; an event unlike the
    run's first is dropped by reason and makes the run incomplete in Tiled."""
    from arroyo.io.tiled import TiledWriter
    from arroyo.message import Stop

    writer = TiledWriter(tiled_server.url, api_key=tiled_server.key, batch_seconds=0.05)
    writer.setup()
    sent = []
    try:
        writer.publish(Start(data={"sample": "x"}, run=7))
        for i in range(30):
            frame = np.full((3, 5), i, "<f4")
            if i == 11:
                frame = np.zeros((2, 5), "<f4")  # another shape
            else:
                sent.append(frame)
            writer.publish(Event({"i": i}, frame, run=7, seq=i))
            if i % 10 == 9:  # (three batches at least: each waits out batch_seconds)
                wait_for(lambda i=i: writer.counts["events"] >= i, timeout=20)
        writer.publish(Stop(data={}, run=7, seq=30))
    finally:
        writer.close()
    assert writer.drops() == {"layout": 1}
    run = tiled_server.client()["run_00007"]  # type: ignore[index]
    assert np.array_equal(run["data"].read(), np.stack(sent))
    assert list(run["events"].read()["seq"]) == [i for i in range(30) if i != 11]
    meta = run.metadata
    assert meta["incomplete"] is True and meta["writer_dropped"] == {"layout": 1}
    assert meta["events_written"] == 29 and meta["start"] == {"sample": "x"}


def test_dead_server_is_counted_not_hung(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing answers at the URL: each write is given up after give_up_seconds and
    counted by reason; close() returns; the key is in no log line."""
    from arroyo.io.tiled import TiledWriter
    from arroyo.message import Stop
    from tests.tiled_server import free_port

    key = "sEcReTkEy123"
    url = f"http://127.0.0.1:{free_port()}"
    writer = TiledWriter(url, api_key=key, give_up_seconds=0.3)
    writer.setup()
    writer.publish(Start(data={}, run=1))
    for i in range(5):
        writer.publish(Event({}, np.zeros(4), run=1, seq=i))
    writer.publish(Stop(data={}, run=1, seq=5))
    writer.close()
    assert writer.drops() == {"no_container": 5}
    assert "no container in Tiled" in caplog.text and "lost (5 events)" in caplog.text
    assert key not in repr(writer) and key not in caplog.text
