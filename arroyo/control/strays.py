"""Stage processes of a topology that no supervisord knows ("strays").

A stage outlives its supervisord only when something went wrong: a supervisord that
died before stages followed their parent (``arroyo.runtime.parent``), a stage still
draining after its supervisor was killed, one started by hand. Such a process holds
the stage's endpoints and takes a share of the traffic, so ``up`` refuses to start a
second set next to it, ``down`` stops it, and ``status`` shows it as ``UNMANAGED``.
They are found by their command line: ``arroyo-stage TOPOLOGY STAGE [--worker N]``
naming this topology file.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

from arroyo.control.render import process_name
from arroyo.topology import Topology

log = logging.getLogger("arroyo.control")

STATE = "UNMANAGED"
_VALUED = {"--worker", "--log-level"}  # arroyo-stage options that take a value


@dataclass(frozen=True)
class Stray:
    pid: int
    stage: str
    worker: int
    started: float  # epoch seconds

    @property
    def name(self) -> str:
        return process_name(self.stage, self.worker)


def _stage_argv(cmdline: list[str]) -> list[str] | None:
    """The arguments after ``arroyo-stage`` (run as a script or by its interpreter)."""
    for i, arg in enumerate(cmdline[:2]):
        if Path(arg).name == "arroyo-stage":
            return cmdline[i + 1 :]
    return None


def _parse(argv: list[str]) -> tuple[str, str, int] | None:
    """(topology argument, stage, worker) from arroyo-stage's arguments."""
    positional: list[str] = []
    worker = 0
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            value = value if eq else next(args, "")
            if name == "--worker":
                if not value.isdigit():
                    return None
                worker = int(value)
        elif not arg.startswith("-"):
            positional.append(arg)
    if len(positional) < 2:
        return None
    return positional[0], positional[1], worker


def _names_topology(proc: psutil.Process, argument: str, target: Path) -> bool:
    path = Path(argument)
    if not path.is_absolute():
        try:
            path = Path(proc.cwd()) / path
        except psutil.Error:
            return False
    with contextlib.suppress(OSError):
        return path.resolve() == target
    return False


def find_strays(
    topology: Topology, known: Collection[int] = (), supervisor: int | None = None
) -> list[Stray]:
    """Live stage processes of ``topology`` other than the pids ``known`` to its
    supervisord and the children of ``supervisor`` (one it is spawning right now)."""
    target = topology.path.resolve()
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
        info = proc.info
        if info["pid"] in known or info["pid"] == os.getpid():
            continue
        if info["status"] == psutil.STATUS_ZOMBIE or (supervisor and info["ppid"] == supervisor):
            continue
        argv = _stage_argv(info["cmdline"] or [])
        parsed = _parse(argv) if argv is not None else None
        if parsed is None or parsed[1] not in topology.stages:
            continue
        if _names_topology(proc, parsed[0], target):
            found.append(Stray(info["pid"], parsed[1], parsed[2], info["create_time"] or 0.0))
    return sorted(found, key=lambda s: (s.stage, s.worker, s.pid))


def describe(strays: list[Stray], most: int = 4) -> str:
    """``det_00 (pid 123), work_01 (pid 456)``, cut after ``most``."""
    text = ", ".join(f"{s.name} (pid {s.pid})" for s in strays[:most])
    return text + (f" and {len(strays) - most} more" if len(strays) > most else "")


def stop_strays(strays: list[Stray], timeout: float) -> None:
    """SIGTERM every stray at once (each drains, as under ``supervisorctl stop
    CHAIN:*``), wait up to ``timeout``, then SIGKILL what is left."""
    procs = []
    for stray in strays:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(stray.pid)
            if proc.create_time() == stray.started:  # not a reused pid
                proc.terminate()
                procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        log.warning("pid %d did not stop within %.0fs: killed", proc.pid, timeout)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
