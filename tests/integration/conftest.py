"""Fixtures for tests that run a topology under the real supervisord."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import arroyo_bin

TOPO = """
[topology]
name = sup
run_dir = run

[chain:main]
stages = det, work, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = 8, 8
rate_hz = {rate}

[stage:work]
role = operator
class = {work}
input = det
workers = {workers}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


WORK = "stages.basic:Delay\nmax_ms = 0.3"  # TOPO's {work}: the class of stage work


def arroyo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [arroyo_bin("arroyo"), *args], capture_output=True, text=True, timeout=150, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"arroyo {args} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def supervisord_procs(conf: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("supervisord" in c for c in cmd[:2]) and str(conf) in cmd:
            found.append(p)
    return found


def stage_procs(topology: Path) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("arroyo-stage" in c for c in (p.info["cmdline"] or [])[:2])
        and str(topology) in (p.info["cmdline"] or [])
    ]


@pytest.fixture
def sup(topo, tmp_path) -> Iterator:
    made: list[Path] = []

    def make(frames=200, runs=1, rate=0, workers=1, work=WORK):
        text = TOPO.format(
            frames=frames, runs=runs, rate=rate, workers=workers, work=work, tmp="{tmp}"
        )
        path = topo(text)
        made.append(path)
        return path

    yield make
    for path in made:
        bring_down(path)


def bring_down(path: Path) -> None:
    """``arroyo down`` for a test's topology; whatever of it is left then is killed,
    and the test fails."""
    topology = load(path)
    conf = supervise.paths(topology).conf
    try:
        supervise.down(topology, timeout=60)
    finally:
        for p in supervisord_procs(conf) + stage_procs(path):
            p.kill()
    assert not supervisord_procs(conf), "supervisord left running"
    assert not stage_procs(path), "arroyo-stage left running"


def pids(path: Path) -> dict[str, int]:
    """PIDs of the RUNNING processes, straight from supervisord (no CLI start-up)."""
    infos = supervise.rpc(load(path)).supervisor.getAllProcessInfo()
    return {
        "{}_{}".format(*supervise.split_process_name(i["name"])): i["pid"]
        for i in infos
        if i["statename"] == "RUNNING"
    }
