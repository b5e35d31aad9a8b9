"""The PVA suite (issue 23): frames/s of Arroyo's ``PvaListener`` beside pvapy's own
``pvapy-hpc-consumer`` on the same simulated detector stream, in turns.

Each run starts the receiver first, then a fresh ``pvapy-ad-sim-server`` (512 x 512
uint16 frames, ``FPS`` offered for ``SECONDS``, on private PV Access ports), and
waits for the server to finish:

* ``pvapy-hpc-consumer`` (the reference; its default processor, no queue): its final
  statistics give frames received (``nReceived``) and the time from the first to the
  last (``receivingTime``);
* ``PvaListener`` stage -> ``BenchSink`` stage, which counts the frames and times the
  first to the last; it writes its result when the stage is stopped after the stream.

Reported: frames/s received, and the fraction of the frames the server published that
arrived (a PVA monitor drops updates a slow client cannot take: both sides are free to).
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from arroyo_bench.measure import Measure, interleaved, log
from arroyo_bench.plans import Plan
from arroyo_bench.run import BenchError, Runner, free_port, stage_command

NX = NY = 512
FRAME_BYTES = NX * NY * 2
FPS = {"quick": 800, "full": 800}
SECONDS = {"quick": 4, "full": 10}
START_DELAY = 3.0  # the server waits this long before publishing: the receiver connects
PV = "arroyobench:image"
REFERENCE, OURS = "pvapy-hpc-consumer", "PvaListener"


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        msg = f"{name} not found (pvapy: the epics extra)"
        raise BenchError(msg)
    return found


def _published(text: str) -> int:
    match = re.search(r"Published frames:\s+(\d+)", text)
    if match is None:
        msg = f"the simulator's log has no 'Published frames':\n{text[-800:]}"
        raise BenchError(msg)
    return int(match.group(1))


def _hpc_stats(text: str) -> tuple[int, float]:
    """nProcessed and receivingTime of the consumer's last statistics."""
    received = re.findall(r"'nProcessed': (\d+)", text)
    seconds = re.findall(r"'receivingTime': ([\d.]+)s", text)
    if not received or not seconds:
        msg = f"pvapy-hpc-consumer printed no statistics:\n{text[-800:]}"
        raise BenchError(msg)
    return int(received[-1]), float(seconds[-1])


def _wait_exit(runner: Runner, log_path: Path, timeout: float) -> None:
    """Wait for the child writing ``log_path`` to exit (as it does when its time is up)."""
    (proc,) = [p for p, log in runner.children.procs if log == log_path]
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            msg = f"{log_path.stem} still running after {timeout:.0f}s"
            raise BenchError(msg)
        time.sleep(0.1)


def _side(runner: Runner, side: str, fps: int, seconds: int) -> Measure:
    def measure() -> dict[str, Any]:
        case = runner._case_dir()
        env = {"EPICS_PVA_SERVER_PORT": str(free_port()),
               "EPICS_PVA_BROADCAST_PORT": str(_udp_port())}  # fmt: skip
        out = case / "result.json"
        runtime = START_DELAY + seconds
        try:
            if side == REFERENCE:
                cmd = [_tool("pvapy-hpc-consumer"), "-ic", PV, "-dc",
                       "-rt", str(runtime + 4)]  # fmt: skip
                runner.children.start(cmd, case / "consumer.log", env)
            else:
                _stages(runner, case, out, env)
            sim = [_tool("pvapy-ad-sim-server"), "-cn", PV, "-nx", str(NX), "-ny", str(NY),
                   "-dt", "uint16", "-fps", str(fps), "-nf", "100", "-cs", "100",
                   "-rt", str(seconds), "-std", str(START_DELAY), "-shd", "1", "-rp", "0",
                   "-dc"]  # fmt: skip
            runner.children.start(sim, case / "sim.log", env)
            _wait_exit(runner, case / "sim.log", runtime + 60)
            published = _published((case / "sim.log").read_text(errors="replace"))
            if side == REFERENCE:
                _wait_exit(runner, case / "consumer.log", 30)  # (its final statistics)
                text = (case / "consumer.log").read_text(errors="replace")
                n, took = _hpc_stats(text)
            else:
                time.sleep(1.0)  # the last frames through the stage link
                runner.children.kill_all()  # the sink writes what it had at close
                result = runner._await_result(out, 10)
                n, took = result["count"], result["seconds"]
        finally:
            runner.children.kill_all()
        fraction = n / published if published else None
        return {"count": n, "bytes": n * FRAME_BYTES, "seconds": took, "complete": True,
                "published": published, "fraction": fraction}  # fmt: skip

    return measure


def _stages(runner: Runner, case: Path, out: Path, env: dict[str, str]) -> None:
    path = case / "t.ini"
    path.write_text(f"""
[topology]
name = pva
run_dir = {case}/run

[stage:src]
role = listener
class = arroyo.io.epics:PvaListener
pv = {PV}

[stage:sink]
role = publisher
class = arroyo_bench.procs:BenchSink
input = src
count = 100000000
out = {out}
""")
    for name in ("sink", "src"):
        log_path = case / f"{name}.log"
        runner.children.start([*stage_command(), str(path), name], log_path, env)
        runner.children.wait_log(log_path, "started as")


def pva(runner: Runner, plan: Plan) -> dict[str, Any]:
    mode = "full" if plan.mode == "full" else "quick"
    fps, seconds = FPS[mode], SECONDS[mode]
    row: dict[str, Any] = {"suite": "pva", "transport": "pva", "size": FRAME_BYTES,
                           "count": fps * seconds, "fps": fps, "seconds": seconds,
                           "sides": [REFERENCE, OURS]}  # fmt: skip
    try:
        _tool("pvapy-ad-sim-server")
        _tool("pvapy-hpc-consumer")
    except BenchError as e:
        log(f"  pva: n/a ({e})")
        return {"row": None, "note": str(e)}
    (row,) = interleaved([row], [REFERENCE, OURS], max(1, plan.repeats),
                         lambda r, side: _side(runner, side, fps, seconds))  # fmt: skip
    for side in (REFERENCE, OURS):
        fractions = [r["fraction"] for r in row[side]["runs"] if r.get("fraction") is not None]
        row[side]["fraction"] = sorted(fractions)[len(fractions) // 2] if fractions else None
    return {"row": row, "note": ""}
