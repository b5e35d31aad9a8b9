"""The recorder and replay with real stage processes (issue 21, items 1 and 2):
record 3 runs through 2 workers, replay them at max and at recorded pace, kill the
recorder mid-run, the disk budget, compressed frames recorded as they came."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.io import recfile
from arroyo.message import Encoded, Event, Message, Start, Stop
from tests.conftest import Stages, arroyo_bin, need_detectors, read_jsonl, runs_of, wait_for
from tests.faults.test_full_disk import small_disk  # noqa: F401 (a fixture)
from tests.integration.test_foreign_frames import free_port

pytestmark = pytest.mark.timeout(90)

RECORD = """
[topology]
name = rec
run_dir = {tmp}/r1

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = {shape}
rate_hz = {rate}

[stage:work]
role = operator
class = stages.basic:Delay
max_ms = 0.2
input = det
workers = 2

[stage:rec]
role = publisher
class = arroyo.io.recording:Recorder
input = work
path = {tmp}/recs
{options}
"""

PLAY = """
[topology]
name = play
run_dir = {tmp}/r2

[stage:fast]
role = listener
class = arroyo.io.recording:Replay
path = {tmp}/recs
pace = max

[stage:again]
role = publisher
class = arroyo.io.recording:Recorder
input = fast
path = {tmp}/again

[stage:timed]
role = listener
class = arroyo.io.recording:Replay
path = {tmp}/recs
runs = 2
pace = recorded

[stage:log]
role = publisher
class = stages.sinks:JsonLinesLog
input = timed
path = {tmp}/timed.jsonl
"""


def started(stages: Stages, path: Path, names: list[tuple[str, int]]) -> None:
    """Start the stages in order and wait until each says it runs."""
    for name, worker in names:
        stages.start(path, name, worker)
    for name, worker in names:
        wait_for(lambda k=f"{name}.{worker}": "started as" in stages.log(k), 30)


def record(topo: Any, stages: Stages, frames: int, runs: int, rate: float, shape: str = "16, 16",
           options: str = "") -> Path:  # fmt: skip
    """Run the recording chain until the recorder has closed ``runs`` runs."""
    text = RECORD.format(frames=frames, runs=runs, rate=rate, shape=shape, options=options,
                         tmp="{tmp}")  # fmt: skip
    path = topo(text, "rec.ini")
    started(stages, path, [("rec", 0), ("work", 0), ("work", 1), ("det", 0)])
    wait_for(lambda: stat(path.parent / "r1", "rec").get("runs_written") == runs and
             closed(path.parent / "recs") >= min(runs, 3), 60)  # fmt: skip
    return path


def stat(run_dir: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "stats" / f"{stage}.0.json").read_text())["extra"]
    except (OSError, ValueError, KeyError):
        return {}


def closed(folder: Path) -> int:
    if not folder.exists():
        return 0
    return sum(1 for s in recfile.summaries(folder) if s.get("stop"))


def events_of(path: Path) -> list[Message]:
    run = recfile.open_run(path)
    return [run.message(e) for e in run.event_entries()]


def same_event(a: Message, b: Message) -> bool:
    assert isinstance(a, Event) and isinstance(b, Event)
    if a.metadata != b.metadata or a.timestamp_ns != b.timestamp_ns:
        return False
    pa, pb = a.raw_payload, b.raw_payload
    if type(pa) is Encoded:  # compared as the compressed bytes they are
        return type(pb) is Encoded and bytes(pa.data) == bytes(pb.data)
    return bool(np.array_equal(pa, pb)) and pa.dtype == pb.dtype


def test_three_runs_through_two_workers_replay_equal_at_max_and_recorded_pace(
    topo, stages, tmp_path
):
    # 3 runs of 50 frames at 10 Hz: each run spans 5 s
    rec = record(topo, stages, frames=50, runs=3, rate=10)
    files = recfile.run_files(tmp_path / "recs")
    assert [recfile.open_run(p).run for p in files] == [1, 2, 3]
    for p in files:
        run = recfile.open_run(p)
        assert run.complete and run.events == 50
        assert sorted(e.image for e in run.event_entries()) == list(range(50))
    stages.stop_all()

    play = topo(PLAY.format(tmp="{tmp}"), "play.ini")
    timed = tmp_path / "timed.jsonl"
    started(stages, play, [("again", 0), ("log", 0)])
    stages.start(play, "fast")
    stages.start(play, "timed")
    first = wait_for(lambda: read_jsonl(timed) and time.monotonic(), 30)
    last = wait_for(lambda: any(r["kind"] == "Stop" for r in read_jsonl(timed))
                    and time.monotonic(), 30, interval=0.01)  # fmt: skip
    # at recorded pace: the run took as long as it did when recorded (within 10 %)
    run2 = recfile.open_run(files[1])
    recorded = (run2.entries[-1].timestamp_ns - run2.entries[0].timestamp_ns) / 1e9
    assert recorded > 4.5
    assert abs((last - first) - recorded) <= 0.1 * recorded, (last - first, recorded)
    [(run, count, stop)] = runs_of(read_jsonl(timed))
    assert count == 50 and stop["data"] == {"frames": 50}
    # in the recorded order, with the recorded metadata and payloads
    logged = [r for r in read_jsonl(timed) if r["kind"] == "Event"]
    recorded_events = events_of(files[1])
    assert [r["metadata"] for r in logged] == [e.metadata for e in recorded_events]  # type: ignore[attr-defined]
    sums = [float(e.payload.sum()) for e in recorded_events]  # type: ignore[attr-defined]
    assert [r["payload"]["sum"] for r in logged] == sums
    start = read_jsonl(timed)[0]
    assert start["data"]["replay"] == {"run": 2, "file": "run_00002.arec"}

    # at max pace: every run again, in order, every event equal in payload and metadata
    wait_for(lambda: closed(tmp_path / "again") == 3, 30)
    again = recfile.run_files(tmp_path / "again")
    for original, replayed in zip(files, again, strict=True):
        sent, got = events_of(original), events_of(replayed)
        assert len(got) == 50 and all(map(same_event, sent, got))
        start = recfile.open_run(replayed).message(recfile.open_run(replayed).entries[0])
        assert isinstance(start, Start) and start.data["replay"]["file"] == original.name
    assert [recfile.open_run(p).run for p in again] == [1, 2, 3]  # new ids, from 1
    codes = stages.stop_all()
    assert all(c == 0 for c in codes.values()), stages.dump()
    assert rec.exists()


def test_a_killed_recorder_leaves_a_file_readable_to_its_last_message(topo, stages, tmp_path):
    text = RECORD.format(frames=100_000, runs=1, rate=500, shape="128, 128", options="",
                         tmp="{tmp}")  # fmt: skip
    path = topo(text, "rec.ini")
    started(stages, path, [("rec", 0), ("work", 0), ("work", 1), ("det", 0)])
    folder = tmp_path / "recs"
    wait_for(lambda: folder.exists() and any(p.stat().st_size > 3_000_000
                                             for p in folder.iterdir()), 30)  # fmt: skip
    stages.signal("rec.0", signal.SIGKILL)
    stages.wait("rec.0")
    [file] = recfile.run_files(folder)
    run = recfile.open_run(file)
    assert not run.complete and run.events > 10
    assert run.size - run.damaged_bytes == sum(e.size for e in run.entries) + 32
    messages = list(run.messages())  # every whole message decodes
    assert isinstance(messages[0], Start) and all(isinstance(m, Event) for m in messages[1:])
    assert all(m.payload.shape == (128, 128) for m in messages[1:])  # type: ignore[union-attr]

    listing = subprocess.run([arroyo_bin("arroyo"), "runs", str(folder)], capture_output=True,
                             text=True, timeout=30, check=True)  # fmt: skip
    assert "no Stop" in listing.stdout and "run_00001.arec" in listing.stdout
    listing = subprocess.run([arroyo_bin("arroyo"), "runs", "--json", str(folder)],
                             capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    rows = json.loads(listing.stdout)
    assert rows[0]["complete"] is False and rows[0]["events"] == run.events
    for key in ("det.0", "work.0", "work.1"):
        stages.signal(key, signal.SIGKILL)

    # replayed, the run ends with a Stop marked interrupted, as the runtime closes one
    play = topo(PLAY.replace("runs = 2", "").format(tmp="{tmp}"), "play.ini")
    started(stages, play, [("log", 0), ("timed", 0)])
    out = tmp_path / "timed.jsonl"
    [(_, count, stop)] = wait_for(lambda: runs_of(read_jsonl(out)), 30)
    assert count == run.events and stop["data"] == {"interrupted": True}


def test_the_disk_budget_deletes_the_oldest_runs_first_and_counts_them(topo, stages, tmp_path):
    one_run = 5 * (32 * 32 * 2 + 200)  # about: 5 frames of 2 KiB and their headers
    options = f"max_runs = 3\nmax_bytes = {3 * one_run}"
    path = record(topo, stages, frames=5, runs=6, rate=0, shape="32, 32", options=options)
    kept = recfile.summaries(tmp_path / "recs")
    kept_runs = [s["run"] for s in kept]
    figures = wait_for(lambda: stat(tmp_path / "r1", "rec").get("runs_deleted") and
                       stat(tmp_path / "r1", "rec"), 20)  # fmt: skip
    assert kept_runs == list(range(7 - len(kept), 7)) and 1 <= len(kept) <= 3, kept_runs
    assert figures["runs_deleted"] == 6 - len(kept)
    assert figures["bytes_written"] - figures["bytes_deleted"] == sum(s["bytes"] for s in kept)
    assert sum(s["bytes"] for s in kept) <= 3 * one_run
    log = stages.log("rec.0")
    assert log.index("deleted run_00001.arec") < log.index("deleted run_00002.arec")
    assert path.exists()


SENDER = """
import sys, numpy as np, zmq
from arroyo import wire
from arroyo.compression import compress
from arroyo.message import Encoded, Event, Start, Stop
rng = np.random.default_rng(3)
sock = zmq.Context.instance().socket(zmq.PUSH)
sock.bind(sys.argv[1])
sock.send_multipart(wire.encode(Start(data={"series": 1})))
for i in range(20):
    frame = rng.poisson(3, (128, 128)).astype("<u2")
    event = Event({"image_id": i}, Encoded("bslz4", "<u2", frame.shape, compress("bslz4", frame)))
    sock.send_multipart(wire.encode(event))
sock.send_multipart(wire.encode(Stop()))
sock.close(linger=10000)
"""


def test_compressed_frames_are_recorded_compressed_and_replay_equal(topo, stages, tmp_path):
    need_detectors()
    from arroyo.compression import compress

    port = free_port()
    text = RECORD.format(frames=0, runs=0, rate=0, shape="1", options="", tmp="{tmp}")
    text = text.replace("class = stages.synthetic:DetectorSimulator",
                        f"class = arroyo.io.zmq:ZMQListener\nendpoint = tcp://127.0.0.1:{port}"
                        "\ncodec = arroyo")  # fmt: skip
    for key in ("frames = 0", "runs = 0", "shape = 1", "rate_hz = 0"):
        text = text.replace(key + "\n", "", 1)
    path = topo(text, "rec.ini")
    started(stages, path, [("rec", 0), ("work", 0), ("work", 1), ("det", 0)])
    script = tmp_path / "send.py"
    script.write_text(SENDER)
    subprocess.run([sys.executable, str(script), f"tcp://127.0.0.1:{port}"], check=True, timeout=60)
    wait_for(lambda: closed(tmp_path / "recs") == 1, 30)
    [file] = recfile.run_files(tmp_path / "recs")
    rng = np.random.default_rng(3)
    frames = [rng.poisson(3, (128, 128)).astype("<u2") for _ in range(20)]
    data = file.read_bytes()
    by_image = {e.metadata["image_id"]: e for e in events_of(file)}  # type: ignore[attr-defined]
    for i, frame in enumerate(frames):
        packed = compress("bslz4", frame)
        assert packed in data  # the bytes in the file are the compressed bytes
        event = by_image[i]
        assert type(event.raw_payload) is Encoded and bytes(event.raw_payload.data) == packed
        assert np.array_equal(event.payload, frame)
    stages.stop_all()

    play = topo(PLAY.format(tmp="{tmp}"), "play.ini")
    started(stages, play, [("again", 0), ("fast", 0)])
    wait_for(lambda: closed(tmp_path / "again") == 1, 30)
    [again] = recfile.run_files(tmp_path / "again")
    assert all(map(same_event, events_of(file), events_of(again)))
    assert all(type(e.raw_payload) is Encoded for e in events_of(again))  # type: ignore[attr-defined]


def test_bad_replay_options_and_paths_are_one_line_exit_2(topo, stages, tmp_path):
    folder = tmp_path / "recs"
    folder.mkdir()
    writer = recfile.RunWriter(folder / "run_00001.arec", run=1)
    writer.write(Start(run=1))
    writer.write(Stop(run=1))
    writer.close()
    play = topo(PLAY.replace("runs = 2", "runs = 1-2,9"), "play.ini")
    stages.start(play, "timed")
    assert stages.wait("timed.0") == 2
    assert "runs: no recorded run 2" in stages.log("timed.0")
    assert "Traceback" not in stages.log("timed.0")
    for option in ("pace = often", "runs = 3-1"):
        play = topo(PLAY.replace("runs = 2", option), f"p{len(option)}.ini")
        proc = subprocess.run([arroyo_bin("arroyo-stage"), str(play), "timed"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 2 and option.split()[0] + ":" in proc.stderr, proc.stderr
    missing = subprocess.run([arroyo_bin("arroyo"), "runs", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_arroyo_replay_plays_a_folder_to_a_zmq_socket(tmp_path):
    import zmq

    from arroyo import wire

    folder = tmp_path / "recs"
    folder.mkdir()
    writer = recfile.RunWriter(folder / "run_00004.arec", run=4)
    for message in [Start(data={"a": 1}, run=4), Event({"image_id": 0}, b"xyz", run=4),
                    Stop(data={"frames": 1}, run=4, seq=1)]:  # fmt: skip
        writer.write(message)
    writer.close()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [arroyo_bin("arroyo"), "replay", str(folder), "--to", endpoint, "--run-ids", "recorded"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(endpoint)
    try:
        assert sock.poll(30_000), "nothing replayed"
        got = [wire.decode(sock.recv_multipart()) for _ in range(3)]
    finally:
        sock.close(0)
        ctx.term()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    start, event, stop = got
    assert isinstance(start, Start) and start.run == 4 and start.data["a"] == 1
    assert start.data["replay"] == {"run": 4, "file": "run_00004.arec"}
    assert (
        isinstance(event, Event) and event.payload == b"xyz" and event.metadata == {"image_id": 0}
    )
    assert isinstance(stop, Stop) and stop.data == {"frames": 1} and stop.seq == 1


def test_a_full_disk_cuts_the_run_file_and_the_recorder_lives(
    topo,
    stages,
    tmp_path,
    small_disk,  # noqa: F811 (the fixture imported above)
):
    disk = small_disk(tmp_path / "recs")  # 2 MB: run 1 fits, run 2 does not
    text = RECORD.format(frames=12, runs=2, rate=0, shape="256, 256", options="", tmp="{tmp}")
    path = topo(text, "rec.ini")
    started(stages, path, [("rec", 0), ("work", 0), ("work", 1), ("det", 0)])
    dropped = wait_for(lambda: stat_drops(tmp_path / "r1", "rec").get("run file failed"), 30)
    assert dropped >= 1
    runs = [recfile.open_run(p) for p in recfile.run_files(disk)]
    assert runs[0].complete and runs[0].events == 12
    cut = runs[-1]
    assert not cut.complete and cut.events < 12  # read back to its last whole message
    assert all(isinstance(m, Start | Event) for m in cut.messages())
    assert stages.procs["rec.0"].poll() is None  # the stage lives
    assert "a write failed" in stages.log("rec.0")


def stat_drops(run_dir: Path, stage: str) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "stats" / f"{stage}.0.json").read_text())["drops"]
    except (OSError, ValueError, KeyError):
        return {}


def test_loop_plays_the_selection_again_until_stopped(topo, stages, tmp_path):
    folder = tmp_path / "recs"
    folder.mkdir()
    for run in (5, 6):
        writer = recfile.RunWriter(folder / f"run_{run:05d}.arec", run=run)
        writer.write(Start(data={"n": run}, run=run))
        for i in range(3):
            writer.write(Event({"image_id": i}, np.full(4, i), run=run, seq=i))
        writer.write(Stop(run=run, seq=3))
        writer.close()
    play = PLAY.replace("runs = 2", "runs = 6\nloop = true").replace(
        "pace = recorded", "pace = max"
    )
    path = topo(play, "play.ini")
    started(stages, path, [("log", 0), ("timed", 0)])
    out = tmp_path / "timed.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= 4, 30)
    codes = stages.stop_all(["timed.0", "log.0"])
    assert codes == {"timed.0": 0, "log.0": 0}, stages.dump()
    runs = runs_of(read_jsonl(out))
    whole = [n for _, n, stop in runs if not stop["data"].get("interrupted")]
    assert len(whole) >= 4 and set(whole) == {3}  # (the last may be cut by the stop)
    starts = [r for r in read_jsonl(out) if r["kind"] == "Start"]
    assert {s["data"]["replay"]["file"] for s in starts} == {"run_00006.arec"}
    assert [s["run"] for s in starts] == list(range(1, len(starts) + 1))  # new ids, in order


def test_what_a_run_lost_before_the_recorder_is_recorded_and_replayed(topo, stages, tmp_path):
    """A run that reached the recorder incomplete (a detector stream's lost images, by
    reason, on its Stop) lists as incomplete, and replayed it is incomplete downstream
    for the same reason, not a shorter run passed off as whole."""
    from arroyo.io.recording import Recorder
    from arroyo.message import LOST

    why = "images the detector stream lost"
    recorder = Recorder(tmp_path / "recs")
    recorder.setup()
    recorder.publish(Start(run=4, routing={"o": "det"}))
    for seq in range(5):
        recorder.publish(Event({"frame": seq}, np.full((4, 4), seq), run=4, seq=seq))
    recorder.publish(Stop(run=4, seq=8, routing={"o": "det", LOST: {why: 3}}))
    recorder.close()
    [summary] = recfile.summaries(tmp_path / "recs")
    assert (summary["stop"], summary["complete"], summary["events"]) == (True, False, 5)

    play = topo(PLAY.replace("runs = 2", "").format(tmp="{tmp}"), "play.ini")
    started(stages, play, [("log", 0), ("timed", 0)])
    [(_, count, stop)] = wait_for(lambda: runs_of(read_jsonl(tmp_path / "timed.jsonl")), 30)
    assert count == 5 and stop["data"]["incomplete"] is True
    report = wait_for(lambda: stat_runs(tmp_path / "r2", "log"), 15)
    assert report[0]["complete"] is False and why in json.dumps(report[0]), report


def stat_runs(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    try:
        return json.loads((run_dir / "stats" / f"{stage}.0.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []
