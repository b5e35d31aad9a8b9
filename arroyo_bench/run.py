"""Processes for the benchmark: start them, wait for their results, always end them.

``Runner`` runs one measurement at a time in a fresh directory: it starts the receiving
side first and waits until it is ready (a raw peer prints "ready", a stage logs
"started as"), then the sender, then waits for the receiver's result file. Every
child runs in its own session, so ``Children.kill_all`` can end it with its whole
process group whatever happens to the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from arroyo.runtime import malloc

KIB, MIB = 1024, 1024 * 1024
SIZE_100B = 100


class BenchError(Exception):
    """One measurement failed (a process died or timed out); the run goes on."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def size_label(size: int) -> str:
    if size >= MIB:
        return f"{size // MIB} MiB"
    return f"{size // KIB} KiB" if size >= KIB else f"{size} B"


class Children:
    """Child processes, each in its own session; ``kill_all`` ends every one of them."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, first: bool = False
    ) -> None:
        """Start ``argv`` with its output in ``log``; ``first``: end it before the others."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.procs.insert(0 if first else len(self.procs), (proc, log))

    def check(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                msg = f"{log.stem} exited with {proc.returncode}:\n{tail}"
                raise BenchError(msg)

    def wait_log(self, log: Path, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in (log.read_text(errors="replace") if log.exists() else ""):
            self.check()
            if time.monotonic() > deadline:
                msg = f"{log.stem} not ready after {timeout:.0f}s"
                raise BenchError(msg)
            time.sleep(0.02)

    def kill_all(self, grace: float = 3.0) -> None:
        """SIGTERM every process group (senders first, as started), SIGKILL leftovers."""
        for proc, _ in self.procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc, _ in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def stage_command() -> list[str]:
    exe = Path(sys.executable).parent / "arroyo-stage"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from arroyo.control.cli import stage_main; stage_main()"]


class Runner:
    """Runs one measurement at a time in a fresh case directory under ``root``."""

    def __init__(self, root: Path, timeout: float = 120.0) -> None:
        self.root = root
        self.timeout = timeout
        self.children = Children()
        self._n = 0

    def _case_dir(self) -> Path:
        self._n += 1
        path = self.root / f"c{self._n}"
        path.mkdir()
        return path

    def _endpoint(self, case: Path, transport: str, name: str) -> str:
        if transport == "tcp":
            return f"tcp://127.0.0.1:{free_port()}"
        return f"ipc://{case}/{name}.sk"

    def _await_result(self, out: Path, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not out.exists():
            self.children.check()
            if time.monotonic() > deadline:
                msg = f"no result after {timeout:.0f}s"
                raise BenchError(msg)
            time.sleep(0.02)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def _measure(
        self, start: Callable[[Path, Path], None], timeout: float, sender: bool = False
    ) -> dict[str, Any]:
        """Run ``start(case, out)``, wait for the receiver's result in ``out`` (and, with
        ``sender``, for the sender's CPU time in ``source.json`` next to it)."""
        case = self._case_dir()
        out = case / "result.json"
        try:
            start(case, out)
            result = self._await_result(out, timeout)
            if sender:
                result["source"] = self._await_result(case / "source.json", 10.0)
            return result
        finally:
            self.children.kill_all()

    # -- raw pyzmq --------------------------------------------------------------------

    def _raw(self, case: Path, role: str, log: str, ready: bool, *args: str) -> None:
        cmd = [sys.executable, "-m", "arroyo_bench.procs", role, *args]
        self.children.start(cmd, case / f"{log}.log")
        if ready:
            self.children.wait_log(case / f"{log}.log", "ready")

    def raw(
        self,
        transport: str,
        size: int,
        count: int,
        hops: int = 1,
        rate: float = 0.0,
        receiver: str = "raw-recv",
    ) -> dict[str, Any]:
        def start(case: Path, out: Path) -> None:
            common = ["--size", str(size), "--count", str(count)]
            lat = ["--latency", "--rate", str(rate)] if rate else []
            first = last = self._endpoint(case, transport, "h0")
            self._raw(case, receiver, "recv", True, "--endpoint", last, "--out", str(out),
                      *common, *lat)  # fmt: skip
            for hop in range(1, hops):
                first = self._endpoint(case, transport, f"h{hop}")
                self._raw(case, "raw-relay", f"relay{hop}", True, "--endpoint", first,
                          "--forward", last, "--size", str(size))  # fmt: skip
                last = first
            self._raw(case, "raw-send", "send", False, "--endpoint", first, *common, *lat)

        return self._measure(start, self.timeout)

    def plain(self, size: int, count: int, rounds: int, processes: int) -> dict[str, Any]:
        """``count`` events of the stage's numpy work split over ``processes`` plain
        processes (``arroyo_bench.plain``: no zmq, no arroyo) that start together;
        timed from the first one's start to the last one's end."""
        case = self._case_dir()
        outs = [case / f"plain{i}.json" for i in range(processes)]
        at = time.time() + 1.0  # every process has imported numpy by then
        try:
            for i, out in enumerate(outs):
                share = count // processes + (1 if i < count % processes else 0)
                cmd = [sys.executable, "-m", "arroyo_bench.plain", "--size", str(size),
                       "--count", str(share), "--rounds", str(rounds), "--at", str(at),
                       "--out", str(out)]  # fmt: skip
                self.children.start(cmd, case / f"plain{i}.log", dict(malloc.ENVIRONMENT))
            parts = [self._await_result(out, self.timeout) for out in outs]
        finally:
            self.children.kill_all()
        seconds = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
        # (n - 1) / seconds in ``throughput``: count the start as the first "message"
        return {"count": count + 1, "bytes": 0, "seconds": seconds, "complete": True}

    # -- Arroyo stage processes ---------------------------------------------------------

    def arroyo(
        self,
        transport: str,
        size: int,
        count: int,
        operator: str = "",
        workers: int = 1,
        rate: float = 0.0,
        env: dict[str, str] | None = None,
        curve: bool = False,
    ) -> dict[str, Any]:
        def start(case: Path, out: Path) -> None:
            path = case / "t.ini"
            text = self._topology(case, out, transport, size, count, operator, workers, rate)
            if curve:  # every tcp link encrypted, with a key pair made for this case
                text = text.replace("[topology]\n", "[topology]\nsecurity = curve\n", 1)
            path.write_text(text)
            if curve:
                from arroyo.control.keys import make_keys
                from arroyo.topology import load

                make_keys(load(path))
            stages = [("sink", 0)] + [("op", w) for w in range(workers if operator else 0)]
            for name, worker in stages:
                log = case / f"{name}{worker}.log"
                self.children.start([*stage_command(), str(path), name, "--worker", str(worker)],
                                    log, env)  # fmt: skip
            for name, worker in stages:
                self.children.wait_log(case / f"{name}{worker}.log", "started as")
            # started last, ended first: its EOS is what lets the others leave at once
            src = [*stage_command(), str(path), "src"]
            self.children.start(src, case / "src0.log", env, first=True)

        return self._measure(start, self.timeout, sender=True)

    def _topology(
        self,
        case: Path,
        out: Path,
        transport: str,
        size: int,
        count: int,
        operator: str,
        workers: int,
        rate: float,
    ) -> str:
        def link(source: str) -> str:
            if transport != "tcp":
                return source
            return f"{source} (push {self._endpoint(case, transport, source)})"

        text = f"""
[topology]
name = bench
run_dir = {case}/run

[stage:src]
role = listener
class = arroyo_bench.procs:BenchSource
count = {count}
size = {size}
rate = {rate}
settle = {0.2 if workers == 1 else 0.6}
out = {case}/source.json

[stage:sink]
role = publisher
class = arroyo_bench.procs:BenchSink
count = {count}
out = {out}
latency = {"yes" if rate else "no"}
input = {link("op" if operator else "src")}
"""
        if operator:
            cls, _, opts = operator.partition(" ")
            text += f"""
[stage:op]
role = operator
class = {cls}
workers = {workers}
input = {link("src")}
"""
            text += "".join(f"{opt}\n" for opt in opts.split())
        return text


def throughput(result: dict[str, Any], size: int) -> dict[str, Any]:
    """msg/s and MB/s (10^6 payload bytes per second) of one receiver's result."""
    n, seconds = result["count"], result["seconds"]
    msg_s = (n - 1) / seconds if n > 1 and seconds > 0 else 0.0
    out = {**result, "msg_s": msg_s, "mb_s": msg_s * size / 1e6}
    if "source" in result and n:
        # CPU of both ends (all their threads) per message: what the link costs,
        # whatever else the machine was doing meanwhile
        out["cpu_us"] = (result["cpu_s"] + result["source"]["cpu_s"]) / n * 1e6
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if key in r and r.get("complete", True)]
    return statistics.median(values) if values else None
