"""The detector suite's measurements (``arroyo_bench.detectors`` has the processes):
ingest, decode in a stage, and 2 decoding workers against 1, each side beside its
reference in the same run, interleaved."""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import median
from typing import Any

from arroyo.runtime import malloc, threads
from arroyo_bench.detectors import DTYPE, SHAPE
from arroyo_bench.measure import Measure, interleaved
from arroyo_bench.plans import Plan
from arroyo_bench.run import Runner, free_port, stage_command

FRAME_BYTES = SHAPE[0] * SHAPE[1] * 2  # decoded uint16
HWM = 4  # a small credit window: frames go to whichever worker is free


def _simulate(runner: Runner, case: Path, endpoint: str, frames: int) -> None:
    """``arroyo simulate`` playing one series; the shell keeps the process group alive
    after it has sent everything (the bench reads an exited child as a crash)."""
    arroyo = str(Path(sys.executable).parent / "arroyo")
    args = ["--endpoint", endpoint, "--shape", f"{SHAPE[0]},{SHAPE[1]}", "--dtype", DTYPE,
            "--compression", "bslz4", "--images", str(frames), "--rate", "max", "--seed", "0",
            "--linger", "60"]  # fmt: skip
    script = '"$0" simulate "$@" || exit 1; exec sleep 3600'
    runner.children.start(["sh", "-c", script, arroyo, *args], case / "sim.log", first=True)


def _plain(runner: Runner, role: str, frames: int) -> Measure:
    """``recv`` (the simulator straight into a PULL), ``relay`` (through a plain pyzmq
    relay to it, over ipc) or ``direct`` (decoding the simulator's frames)."""

    def start(case: Path, out: Path) -> None:
        # what a stage worker gets: the malloc thresholds, one OpenMP thread
        env = {**malloc.ENVIRONMENT, **threads.ENVIRONMENT}
        ep = f"tcp://127.0.0.1:{free_port()}"
        hop = f"ipc://{case}/relay.sk"
        count = frames if role == "direct" else frames + 2  # recv: start, images, end
        cmd = [sys.executable, "-m", "arroyo_bench.detectors", "recv" if role == "relay" else role,
               "--count", str(count), "--out", str(out),
               "--endpoint", hop if role == "relay" else ep]  # fmt: skip
        runner.children.start(cmd, case / f"{role}.log", env)
        if role == "direct":
            return
        runner.children.wait_log(case / f"{role}.log", "ready")
        if role == "relay":
            cmd = [sys.executable, "-m", "arroyo_bench.detectors", "relay", "--count", "0",
                   "--out", "-", "--endpoint", ep, "--forward", hop]  # fmt: skip
            runner.children.start(cmd, case / "relay.log", env)
            runner.children.wait_log(case / "relay.log", "ready")
        _simulate(runner, case, ep, frames)

    def measure() -> dict[str, Any]:
        result = runner._measure(start, runner.timeout)
        if role == "direct":  # n frames in ``seconds``: counted like n + 1 messages
            result.update(count=frames + 1, bytes=0, complete=True)
        return result

    return measure


def _topology(case: Path, out: Path, endpoint: str, frames: int, op: str, workers: int) -> str:
    text = f"""
[topology]
name = detectors
run_dir = {case}/run

[stage:det]
role = listener
class = arroyo.io.zmq:ZMQListener
endpoint = {endpoint}
codec = dectris-stream2

[stage:sink]
role = publisher
class = arroyo_bench.detectors:FrameCount
count = {frames}
out = {out}
input = {"op" if op else "det"}
"""
    if op:
        text += f"""
[stage:op]
role = operator
class = arroyo_bench.detectors:{op}
input = det
workers = {workers}
hwm = {HWM}
"""
    return text


def _arroyo(runner: Runner, frames: int, op: str = "", workers: int = 1) -> Measure:
    def start(case: Path, out: Path) -> None:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        path = case / "t.ini"
        path.write_text(_topology(case, out, endpoint, frames, op, workers))
        stages = [("sink", 0), ("det", 0)] + [("op", w) for w in range(workers if op else 0)]
        for name, worker in stages:
            cmd = [*stage_command(), str(path), name, "--worker", str(worker)]
            runner.children.start(cmd, case / f"{name}{worker}.log")
        for name, worker in stages:
            runner.children.wait_log(case / f"{name}{worker}.log", "started as")
        _simulate(runner, case, endpoint, frames)

    return lambda: runner._measure(start, runner.timeout)


def detectors(runner: Runner, plan: Plan) -> dict[str, Any]:
    n = plan.detector_frames
    base: dict[str, Any] = {"transport": "tcp", "size": FRAME_BYTES, "count": n}
    ingest: dict[str, Any] = {"suite": "detector ingest", **base}
    decode: dict[str, Any] = {"suite": "detector decode", **base}
    scale: dict[str, Any] = {"suite": "detector scaling", **base}
    sides = {
        "detector ingest": {"plain PULL": _plain(runner, "recv", n),
                            "pyzmq relay + PULL": _plain(runner, "relay", n),
                            "Stream V2 listener": _arroyo(runner, n)},
        "detector decode": {"bitshuffle direct": _plain(runner, "direct", n),
                            "1 worker": _arroyo(runner, n, "DecodeOnly")},
        "detector scaling": {"1 worker": _arroyo(runner, n, "DecodeReduce", 1),
                             "2 workers": _arroyo(runner, n, "DecodeReduce", 2)},
    }  # fmt: skip
    repeats = max(1, plan.repeats - 1)
    out: dict[str, Any] = {}
    for row in (ingest, decode, scale):
        names = list(sides[row["suite"]])
        row["sides"] = names
        (out[row["suite"]],) = interleaved(
            [row], names, repeats, lambda r, side: sides[r["suite"]][side]
        )
    # the same two hops in plain pyzmq: what a listener with a stage behind it could be
    relay, ours = (
        ingest["pyzmq relay + PULL"].get("msg_s"),
        ingest["Stream V2 listener"].get("msg_s"),
    )
    ingest["ratio_to_relay"] = ours / relay if ours and relay else None
    # the compressed size of a frame, as the listener's sink counted it
    runs = [r for r in ingest["Stream V2 listener"]["runs"] if r.get("count")]
    out["compressed_frame_bytes"] = median(r["bytes"] / r["count"] for r in runs) if runs else 0
    return out
