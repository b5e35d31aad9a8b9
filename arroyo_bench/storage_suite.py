"""The storage suite (issue 21): the recorder and replay, each beside its reference in
the same run, interleaved.

    recorder       raw PUSH -> plain PULL that ``f.write``\\ s every frame to a file
                   vs  source stage -> ``Recorder`` stage writing into the same folder
    replay at max  raw pyzmq PUSH -> PULL, one hop (the ceiling for one hop)
                   vs  ``Replay`` stage (pace = max) of a recorded folder -> sink stage

Both time from the first message received to the last one written (the file closed,
for the writers) or received; frames of 1 MiB. Run the reference writer as
``python -m arroyo_bench.storage_suite --endpoint E --count N --out F --file P``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from arroyo.io import recfile
from arroyo.io.recording import Recorder
from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime import malloc
from arroyo_bench.measure import Measure, interleaved
from arroyo_bench.plain import make_payload
from arroyo_bench.plans import Plan
from arroyo_bench.run import MIB, Runner, stage_command

MAX_FRAMES = 1_000  # per run: the files of one run stay under a GiB


def _result(count: int, nbytes: int, first: float, last: float) -> dict[str, Any]:
    return {"count": count, "bytes": nbytes, "seconds": last - first, "complete": True}


class TimedRecorder(Recorder):
    """A ``Recorder`` that writes its timing to ``out`` when its run's Stop has been
    written (the file flushed and closed): first event received to then."""

    def __init__(self, path: Path, out: Path) -> None:
        super().__init__(path)
        self.out = out
        self.n = self.nbytes = 0
        self.first = 0.0

    def publish(self, message: Message) -> None:
        if isinstance(message, Event):
            if not self.n:
                self.first = time.perf_counter()
            self.n += 1
            self.nbytes += message.nbytes
        super().publish(message)
        if isinstance(message, Stop):
            result = _result(self.n, self.nbytes, self.first, time.perf_counter())
            self.out.write_text(json.dumps(result))


def plain_writer(endpoint: str, count: int, out: Path, file: Path) -> None:
    """The reference: PULL ``count`` frames, ``f.write`` each, close; write the timing."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    # A short queue, as Arroyo's credit window keeps one: with the default 1,000 the
    # receiver's heap grows by a GiB of 1 MiB frames, faulted in fresh, and the
    # reference ran at a third to a half of its speed (measured here; the faster
    # reference is the honest one to compare with).
    sock.rcvhwm = 8
    sock.bind(endpoint)
    print("ready", flush=True)
    nbytes, first = 0, 0.0
    with file.open("wb") as f:
        for i in range(count):
            frame = sock.recv(copy=False)
            if not i:
                first = time.perf_counter()
            f.write(frame.buffer)
            nbytes += len(frame)
    out.write_text(json.dumps(_result(count, nbytes, first, time.perf_counter())))
    while True:  # keep the socket until told to go, like the other raw peers
        time.sleep(3600)


def _clean(runner: Runner, measure: Measure) -> Measure:
    """``measure`` after a sync, then delete what it wrote (gigabytes over the repeats)."""

    def run() -> dict[str, Any]:
        # no side inherits another's dirty pages (the kernel throttles writers to the
        # disk's speed once too many are waiting to be written back)
        os.sync()
        try:
            return measure()
        finally:
            for case in runner.root.glob("c*"):
                for written in [*case.glob("recs/*.arec"), *case.glob("plain.bin")]:
                    written.unlink(missing_ok=True)

    return run


def _plain_side(runner: Runner, n: int) -> Measure:
    def start(case: Path, out: Path) -> None:
        endpoint = f"ipc://{case}/w.sk"
        cmd = [sys.executable, "-m", "arroyo_bench.storage_suite", "--endpoint", endpoint,
               "--count", str(n), "--out", str(out), "--file", str(case / "plain.bin")]  # fmt: skip
        # the malloc thresholds a stage process gets, or every 1 MiB receive buffer is
        # mapped and faulted in afresh (arroyo.runtime.malloc)
        runner.children.start(cmd, case / "writer.log", dict(malloc.ENVIRONMENT))
        runner.children.wait_log(case / "writer.log", "ready")
        runner._raw(case, "raw-send", "send", False, "--endpoint", endpoint, "--size", str(MIB),
                    "--count", str(n))  # fmt: skip

    return lambda: runner._measure(start, runner.timeout)


def _stages(runner: Runner, case: Path, text: str, receiver: str, sender: str) -> None:
    path = case / "t.ini"
    path.write_text(text)
    log = case / f"{receiver}.log"
    runner.children.start([*stage_command(), str(path), receiver], log)
    runner.children.wait_log(log, "started as")
    runner.children.start([*stage_command(), str(path), sender], case / f"{sender}.log", first=True)


def _recorder_side(runner: Runner, n: int) -> Measure:
    def start(case: Path, out: Path) -> None:
        text = f"""
[topology]
name = rec
run_dir = {case}/run

[stage:src]
role = listener
class = arroyo_bench.procs:BenchSource
count = {n}
size = {MIB}

[stage:rec]
role = publisher
class = arroyo_bench.storage_suite:TimedRecorder
input = src
path = {case}/recs
out = {out}
"""
        _stages(runner, case, text, "rec", "src")

    return lambda: runner._measure(start, runner.timeout)


def _replay_side(runner: Runner, n: int, folder: Path) -> Measure:
    def start(case: Path, out: Path) -> None:
        text = f"""
[topology]
name = play
run_dir = {case}/run

[stage:src]
role = listener
class = arroyo.io.recording:Replay
path = {folder}
pace = max

[stage:sink]
role = publisher
class = arroyo_bench.procs:BenchSink
input = src
count = {n}
out = {out}
"""
        _stages(runner, case, text, "sink", "src")

    return lambda: runner._measure(start, runner.timeout)


def _recording(folder: Path, n: int) -> None:
    """One recorded run of ``n`` 1 MiB events, as a Recorder writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = recfile.RunWriter(folder / "run_00001.arec", run=1)
    payload = make_payload(MIB)
    writer.write(Start(data={"bench": True}, run=1))
    for i in range(n):
        writer.write(Event({"frame": i}, payload, run=1, seq=i))
    writer.write(Stop(data={"frames": n}, run=1, seq=n))
    writer.close()


def storage(runner: Runner, plan: Plan) -> dict[str, Any]:
    n = min(plan.count(MIB), MAX_FRAMES)
    base: dict[str, Any] = {"transport": "ipc", "size": MIB, "count": n}
    folder = runner.root / "recorded"
    _recording(folder, n)
    sides: dict[str, dict[str, Measure]] = {
        "recorder": {"plain f.write": _plain_side(runner, n),
                     "Recorder": _recorder_side(runner, n)},
        "replay at max": {"raw pyzmq": lambda: runner.raw("ipc", MIB, n),
                          "Arroyo one hop": lambda: runner.arroyo("ipc", MIB, n),
                          "Replay": _replay_side(runner, n, folder)},
    }  # fmt: skip
    # at least 3 repeats: what the page cache and the disk are doing meanwhile (other
    # processes' writes too) moves single runs by 2-3x
    repeats = max(3, plan.repeats)
    out: dict[str, Any] = {"repeats": repeats}
    for name, row_sides in sides.items():
        row = {"suite": name, **base, "sides": list(row_sides)}
        (out[name],) = interleaved(
            [row],
            list(row_sides),
            repeats,
            lambda r, side, s=row_sides: _clean(runner, s[side]),
        )
    replay = out["replay at max"]
    ours, hop = replay["Replay"].get("msg_s"), replay["Arroyo one hop"].get("msg_s")
    replay["ratio_to_one_hop"] = ours / hop if ours and hop else None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m arroyo_bench.storage_suite")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--file", type=Path, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    plain_writer(args.endpoint, args.count, args.out, args.file)


if __name__ == "__main__":
    main()
