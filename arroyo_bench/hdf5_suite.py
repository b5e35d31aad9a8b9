"""The NeXus suite (issue 21): NexusWriter writing 1 MiB frames beside a plain h5py
loop doing the same writes to the same disk, in the same run.

Two cases, 512 x 1024 uint16 frames (1 MiB decoded) with Poisson counts:

* ``compressed``: the frames arrive bitshuffle-LZ4 compressed (``Encoded`` bslz4, as
  a detector sends them; about 0.26 MB each, so 4 times as many frames per run).
  Reference: ``write_direct_chunk`` of the same bytes.
* ``decoded``: the frames arrive as arrays and are compressed with the bitshuffle-LZ4
  filter. Reference: ``dset[i] = frame`` into a dataset with the same filter.

Three sides per case, interleaved:

* ``pyzmq PULL + h5py loop`` (the reference the ratio is taken against): a plain
  pyzmq PUSH process sends the frames' bytes over ipc to a plain PULL process that
  writes them with h5py: fed the way the writer is;
* ``h5py loop in memory``: the same loop over frames already in memory, shown beside
  (what a writer could do with no transport at all);
* ``NexusWriter``: two stage processes, a source stage sending the run from a pool of
  frames over an ipc link into a ``NexusWriter`` stage (default settings), which also
  writes its ``seq`` and ``timestamp_ns`` columns and the Stop's attributes.

Every side makes the same kind of file: SWMR on, a ``(n, 512, 1024)`` dataset chunked
by frame, and per frame a resize, the write and a flush (the writer's default
``flush_every = 1``, what makes each frame visible to a follower). Each side times
from its first frame to its file closed (n frames in ``seconds``, counted as n + 1
messages); its files are deleted after each measurement. Run as part of
``scripts/bench`` (``--only nexus``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from arroyo.io.hdf5 import NexusWriter  # (h5py itself is imported in setup)
from arroyo.message import Encoded, Event, Message, Start, Stop
from arroyo.runtime import malloc, threads
from arroyo.stage import Listener
from arroyo_bench.measure import Measure, interleaved
from arroyo_bench.plans import Plan
from arroyo_bench.run import MIB, Runner, stage_command

SHAPE = (512, 1024)  # 1 MiB of uint16
POOL = 8
CASES = ("compressed", "decoded")
# The reference is the fed loop (first side); the loop over frames already in memory
# is shown beside it: the most a writer could do with no transport at all.
FED, LOOP, NEXUS = "pyzmq PULL + h5py loop", "h5py loop in memory", "NexusWriter"
SIDES = [FED, LOOP, NEXUS]
HWM = 16  # the reference's ZMQ queues (the writer stage keeps its default window)
NEXUS_FRAMES = 1_000  # frames per run at most: each case writes about 1 GB per side


def pool(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.poisson(2.0 + i, SHAPE).astype("<u2") for i in range(POOL)]


def packed_pool(seed: int = 0) -> list[tuple[np.ndarray, bytes]]:
    from arroyo.compression import compress

    return [(f, compress("bslz4", f)) for f in pool(seed)]


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# -- the Arroyo side ------------------------------------------------------------------


class PoolSource(Listener):
    """One run of ``count`` events from a pool of frames, compressed or not, as fast
    as the link takes them; then idle until stopped."""

    def __init__(self, count: int, case: str = "compressed") -> None:
        self.count, self.case = count, case

    def start(self) -> None:
        frames = packed_pool()
        payloads: list[Any] = [
            Encoded("bslz4", f.dtype, f.shape, p) if self.case == "compressed" else f
            for f, p in frames
        ]
        self.deliver(Start(data={"case": self.case}))
        for i in range(self.count):
            if self.stopping:
                return
            self.deliver(Event(metadata={"frame": i}, payload=payloads[i % POOL]))
        self.deliver(Stop())
        self.stop_requested.wait()


class TimedNexus(NexusWriter):
    """NexusWriter that times itself: its first event to its file closed at Stop."""

    def __init__(self, path: Path, out: Path) -> None:
        super().__init__(path)
        self.out = out
        self.began = self.cpu = 0.0
        self.writing = [0.0, 0.0]  # wall, CPU of this thread
        self.n = 0

    def publish(self, message: Message) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if isinstance(message, Event) and self.n == 0:
            self.began, self.cpu = now, time.process_time()
        super().publish(message)
        self.writing[0] += time.perf_counter() - now
        self.writing[1] += time.thread_time() - cpu
        if isinstance(message, Event):
            self.n += 1
        elif isinstance(message, Stop):
            _result(self.out, self.n, self.began, self.cpu, self.writing)


def _result(out: Path, n: int, began: float, cpu: float, writing: list[float]) -> None:
    """The side's figures; ``writing_s``: the time spent in the writing calls (the
    rest of ``seconds`` went to receiving, and to waiting for frames), and
    ``writing_cpu_s`` the CPU time of the writing thread in them."""
    seconds = time.perf_counter() - began
    _write(out, {"count": n + 1, "bytes": n * MIB, "seconds": seconds, "complete": True,
                 "cpu_s": time.process_time() - cpu, "writing_s": writing[0],
                 "writing_cpu_s": writing[1]})  # fmt: skip


def _topology(case_dir: Path, out: Path, count: int, case: str) -> str:
    return f"""
[topology]
name = nexus
run_dir = {case_dir}/run

[stage:src]
role = listener
class = arroyo_bench.hdf5_suite:PoolSource
count = {count}
case = {case}

[stage:nexus]
role = publisher
class = arroyo_bench.hdf5_suite:TimedNexus
path = {case_dir}/files
out = {out}
input = src
"""


def _arroyo(runner: Runner, count: int, case: str) -> Measure:
    def start(case_dir: Path, out: Path) -> None:
        path = case_dir / "t.ini"
        path.write_text(_topology(case_dir, out, count, case))
        for name in ("nexus", "src"):
            cmd = [*stage_command(), str(path), name]
            runner.children.start(cmd, case_dir / f"{name}.log")
            runner.children.wait_log(case_dir / f"{name}.log", "started as")

    return _cleaned(runner, start)


def _cleaned(runner: Runner, start: Callable[[Path, Path], None]) -> Measure:
    """Measure ``start``, then delete the files it wrote: a run writes up to a GB."""
    made: list[Path] = []

    def start_here(case_dir: Path, out: Path) -> None:
        made.append(case_dir)
        start(case_dir, out)

    def measure() -> dict[str, Any]:
        try:
            return runner._measure(start_here, runner.timeout)
        finally:
            for case_dir in made:
                for file in case_dir.rglob("*.h5"):
                    file.unlink()

    return measure


# -- the reference --------------------------------------------------------------------


def _frames_in(args: argparse.Namespace) -> Iterator[tuple[np.ndarray, Any]]:
    """The frames the reference writes: from the pool (``loop``) or received from the
    plain sender over ipc (``recv``: each message one frame's bytes, compressed or not)."""
    frames = packed_pool()
    if args.role == "loop":
        for i in range(args.count):
            yield frames[i % POOL]
        return
    import zmq

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
    sock.rcvhwm = HWM
    sock.bind(args.endpoint)
    print("ready", flush=True)
    for _ in range(args.count):
        buf = sock.recv(copy=False).buffer
        if args.case == "compressed":
            yield np.empty(0), buf
        else:
            yield np.frombuffer(buf, "<u2").reshape(SHAPE), buf


def write_loop(args: argparse.Namespace) -> None:
    """The same file written by a plain h5py loop: resize, write, flush per frame."""
    import h5py
    import hdf5plugin

    f = h5py.File(args.file, "w", libver="latest")
    dset = f.create_dataset(
        "data", shape=(0, *SHAPE), maxshape=(None, *SHAPE), chunks=(1, *SHAPE),
        dtype="<u2", **hdf5plugin.Bitshuffle(cname="lz4"),
    )  # fmt: skip
    f.swmr_mode = True
    began = cpu = 0.0
    writing = [0.0, 0.0]
    for i, (frame, packed) in enumerate(_frames_in(args)):
        now, thread = time.perf_counter(), time.thread_time()
        if i == 0:
            began, cpu = now, time.process_time()
        dset.resize(i + 1, axis=0)
        if args.case == "compressed":
            dset.id.write_direct_chunk((i, 0, 0), packed)
        else:
            dset[i] = frame
        dset.flush()
        writing[0] += time.perf_counter() - now
        writing[1] += time.thread_time() - thread
    now, thread = time.perf_counter(), time.thread_time()
    f.close()
    writing[0] += time.perf_counter() - now
    writing[1] += time.thread_time() - thread
    _result(Path(args.out), args.count, began, cpu, writing)
    _stay()


def send(args: argparse.Namespace) -> None:
    """A plain pyzmq PUSH sending the pool's frames (compressed bytes or raw arrays)."""
    import zmq

    frames = packed_pool()
    payloads: list[Any] = [p if args.case == "compressed" else f for f, p in frames]
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    sock.sndhwm = HWM
    sock.connect(args.endpoint)
    for i in range(args.count):
        sock.send(memoryview(payloads[i % POOL]), copy=False)
    _stay()


def _stay() -> None:
    while True:  # every child of the bench stays until ended
        time.sleep(3600)


def _plain(runner: Runner, count: int, case: str, fed: bool) -> Measure:
    def start(case_dir: Path, out: Path) -> None:
        env = {**malloc.ENVIRONMENT, **threads.ENVIRONMENT}  # what a stage worker gets
        file, endpoint = str(case_dir / "plain.h5"), f"ipc://{case_dir}/p.sk"
        common = ["--case", case, "--count", str(count), "--out", str(out),
                  "--file", file, "--endpoint", endpoint]  # fmt: skip
        module = [sys.executable, "-m", "arroyo_bench.hdf5_suite"]
        log = case_dir / "plain.log"
        runner.children.start([*module, "recv" if fed else "loop", *common], log, env)
        if fed:
            runner.children.wait_log(log, "ready")
            runner.children.start([*module, "send", *common], case_dir / "send.log", env)

    return _cleaned(runner, start)


def nexus(runner: Runner, plan: Plan) -> list[dict[str, Any]]:
    n = min(NEXUS_FRAMES, plan.count(MIB))  # (quick: 300 frames, full: 1,000)
    # compressed frames are about a quarter of a MiB: 4 times as many, for runs as long
    rows = [{"suite": "nexus", "transport": "ipc", "size": MIB, "case": c,
             "count": 4 * n if c == "compressed" else n} for c in CASES]  # fmt: skip

    def run(row: dict[str, Any], side: str) -> Measure:
        if side == NEXUS:
            return _arroyo(runner, row["count"], row["case"])
        return _plain(runner, row["count"], row["case"], fed=side == FED)

    return interleaved(rows, SIDES, max(1, plan.repeats - 1), run)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m arroyo_bench.hdf5_suite")
    p.add_argument("role", choices=["loop", "recv", "send"])
    p.add_argument("--case", choices=CASES, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--endpoint", default="")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.role == "send":
        send(args)
    else:
        write_loop(args)


if __name__ == "__main__":
    main()
