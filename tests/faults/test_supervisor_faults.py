"""Faults of the control side: a killed supervisord, a stage that fails late in its
start, and a supervisor RPC that races another command (issue 13, items 2, 3, 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import Stages, arroyo_bin, read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, pids, stage_procs, supervisord_procs

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

CHAIN = """
[topology]
name = ctl
run_dir = run

[chain:main]
stages = det, work, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = 1000
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

HELPERS = '''
"""Operators that misbehave on purpose, for the control fault tests."""
import os
import sys
import time

from arroyo import Event, Operator


class SlowFail(Operator):
    """Its __init__ takes a while, then fails: a missing calibration file, say."""

    def __init__(self, delay: float = 1.5) -> None:
        time.sleep(delay)
        raise RuntimeError("calibration file missing")

    def process(self, message):
        return message


class SlowClose(Operator):
    """Takes ``close_s`` seconds to close, so that a stop is seen in progress."""

    def __init__(self, close_s: float = 3.0) -> None:
        self.close_s = close_s

    def process(self, message):
        return message

    def close(self) -> None:
        time.sleep(self.close_s)


class ExitOnce(Operator):
    """Once ``go`` exists, the first worker to see an event writes its pid to
    ``marker`` and calls ``sys.exit(0)``, as a user's code may; every other event passes."""

    def __init__(self, go: str, marker: str) -> None:
        self.go = go
        self.marker = marker

    def process(self, message):
        if isinstance(message, Event) and os.path.exists(self.go):
            try:
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return message
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            sys.exit(0)
        return message


class Picky(Operator):
    """Its live option ``level`` converts fine, and every change of it is refused."""

    live_options = ("level",)

    def __init__(self, level: int = 0) -> None:
        self.level = level

    def process(self, message):
        return message

    def apply_live(self, changes) -> None:
        raise ValueError("level is fixed while a run is open")
'''


@pytest.fixture
def chain(topo, tmp_path) -> Iterator:
    (tmp_path / "misbehave.py").write_text(textwrap.dedent(HELPERS))
    made: list[Path] = []

    def make(frames=1_000_000, rate=1000, workers=2, work="stages.basic:Delay\nmax_ms = 0.2"):
        path = topo(CHAIN.format(frames=frames, rate=rate, workers=workers, work=work, tmp="{tmp}"))
        made.append(path)
        return path

    yield make
    for path in made:
        conf = supervise.paths(load(path)).conf
        try:
            supervise.down(load(path), timeout=60)
        finally:
            for p in supervisord_procs(conf) + stage_procs(path):
                p.kill()
        assert not supervisord_procs(conf), "supervisord left running"
        assert not stage_procs(path), "arroyo-stage left running"


def rpc_state(path: Path, name: str) -> str:
    return supervise.rpc(load(path)).supervisor.getProcessInfo(name)["statename"]


# -- item 2: a killed supervisord ------------------------------------------------------


def test_stages_end_with_a_killed_supervisord_and_lose_nothing(chain, tmp_path):
    path = chain()
    arroyo("up", str(path))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 300, timeout=30)
    assert len(stage_procs(path)) == 4
    os.kill(supervise.supervisord_pid(load(path)), signal.SIGKILL)
    # Each stage is told its supervisor died (SIGTERM): the chain drains and ends.
    wait_for(lambda: not stage_procs(path), timeout=60)
    runs = runs_of(read_jsonl(out))
    assert runs, "no run reached the sink"
    _, n, stop = runs[-1]
    assert stop["data"].get("interrupted") is True, stop
    assert "incomplete" not in stop["data"], stop
    assert n == stop["seq"]


def test_a_supervised_stage_whose_parent_is_gone_ends_on_its_own(chain, tmp_path):
    path = chain(workers=1)
    log = tmp_path / "orphan.log"
    # The parent (sh) exits at once: before the stage can ask to follow it, or soon after.
    started = subprocess.run(
        ["sh", "-c", '"$0" "$1" sink > "$2" 2>&1 & echo $!', arroyo_bin("arroyo-stage"), path, log],
        env={**os.environ, "SUPERVISOR_ENABLED": "1"},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    pid = int(started.stdout)

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(gone, timeout=30)
    finally:
        if not gone():
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in log.read_text()


def test_a_stage_outside_supervisord_is_shown_refused_and_stopped(chain, tmp_path):
    path = chain(workers=1)
    stages = Stages(tmp_path)
    try:
        # What a supervisord killed before this fix left behind: a live sink of the
        # topology that no supervisord knows, holding the sink's endpoint.
        stray = stages.start(path, "sink")
        wait_for(lambda: "started as" in stages.log("sink.0"), timeout=30)

        rows = json.loads(arroyo("status", str(path), "--json").stdout)
        assert [(r["stage"], r["worker"], r["state"], r["pid"]) for r in rows] == [
            ("sink", 0, "UNMANAGED", stray.pid)
        ]
        text = arroyo("status", str(path)).stdout
        assert "UNMANAGED" in text and str(stray.pid) in text

        refused = arroyo("up", str(path), check=False)
        assert refused.returncode == 2, refused
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert f"sink_00 (pid {stray.pid})" in refused.stderr
        assert not supervisord_procs(supervise.paths(load(path)).conf)

        down = arroyo("down", str(path))
        assert "1 process" in down.stdout, down.stdout
        assert stray.wait(30) == 0, "the stray sink stops cleanly"
        assert arroyo("status", str(path)).stdout.strip() == "not running"
    finally:
        stages.cleanup()


# -- item 3: a stage that fails after its startsecs ----------------------------------


def test_up_reports_a_late_init_failure_and_supervisord_gives_up(chain):
    path = chain(workers=1, work="misbehave:SlowFail\ndelay = 1.5")
    result = arroyo("up", str(path), check=False)
    assert result.returncode == 1, result
    assert "stage work (main:work_00)" in result.stderr, result.stderr
    assert "FATAL" in result.stderr
    assert "calibration file missing" in result.stderr
    assert "Traceback" not in result.stderr.split("\n")[0]
    # A configuration error is not restarted: supervisord leaves it FATAL (terminal).
    assert rpc_state(path, "main:work_00") == "FATAL"
    info = supervise.rpc(load(path)).supervisor.getProcessInfo("main:work_00")
    assert info["exitstatus"] == 2 and "configuration error" in info["description"]
    log = (supervise.paths(load(path)).logs / "work_00.log").read_text()
    assert log.count("calibration file missing") == 1, "started exactly once"


# -- item 6: RPC faults --------------------------------------------------------------


def test_down_completes_when_scale_removes_a_worker_under_it(chain):
    path = chain(workers=2, work="misbehave:SlowClose\nclose_s = 3")
    arroyo("up", str(path))
    before = pids(path)
    assert {"work_0", "work_1"} <= before.keys()
    down = subprocess.Popen(
        [arroyo_bin("arroyo"), "down", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # down has asked work_01 to stop; freeze it there, let scale remove the worker
        wait_for(lambda: rpc_state(path, "main:work_01") == "STOPPING", timeout=60)
        down.send_signal(signal.SIGSTOP)
        wait_for(lambda: rpc_state(path, "main:work_01") == "STOPPED", timeout=30)
        scaled = arroyo("scale", str(path), "work", "1", check=False)
        assert scaled.returncode == 0 and "Traceback" not in scaled.stderr, scaled
        down.send_signal(signal.SIGCONT)
        stdout, stderr = down.communicate(timeout=120)
    finally:
        down.send_signal(signal.SIGCONT)
        if down.poll() is None:
            down.kill()
        down.wait(10)
    assert down.returncode == 0, stderr
    assert "Traceback" not in stderr and stdout.strip().endswith("stopped"), (stdout, stderr)
    assert not supervisord_procs(supervise.paths(load(path)).conf)
    assert not stage_procs(path)
    again = arroyo("down", str(path))
    assert again.returncode == 0 and again.stderr == ""


# -- issue 19, item 5: control paths that lied ------------------------------------------


def test_a_worker_that_exits_0_is_restarted(chain, tmp_path):
    go, marker = tmp_path / "go", tmp_path / "exited"
    path = chain(workers=2, work=f"misbehave:ExitOnce\ngo = {go}\nmarker = {marker}")
    arroyo("up", str(path))
    go.touch()  # now that up has seen both workers run (an exit before is a failed start)
    wait_for(marker.exists, timeout=30)
    gone = int(wait_for(marker.read_text, timeout=5))

    def workers() -> list[int]:
        return [p for k, p in pids(path).items() if k.startswith("work_") and p != gone]

    wait_for(lambda: len(workers()) == 2, timeout=30)  # the stage runs both workers again
    logs = supervise.paths(load(path)).logs
    log = next(t for f in logs.glob("work_*.log") if f"/{gone}@" in (t := f.read_text()))
    assert log.count("started as") == 2, log[-3000:]
    out = tmp_path / "out.jsonl"
    n = len(read_jsonl(out))
    wait_for(lambda: len(read_jsonl(out)) > n + 300, timeout=30)  # and the stream goes on


def test_set_fails_when_every_worker_refuses_and_keeps_nothing(chain):
    path = chain(workers=2, work="misbehave:Picky")
    arroyo("up", str(path))
    result = arroyo("set", str(path), "work", "level=3", check=False)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"{path}: [stage:work] level = 3: refused by every worker (work[0], work[1]): "
        "ValueError: level is fixed while a run is open"
    ], result.stderr
    # A worker that starts later takes the INI's value, not the one its peers refused.
    old = pids(path)["work_1"]
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := pids(path).get("work_1")) not in (None, old) and p, timeout=30)
    stats = supervise.paths(load(path)).conf.parent / "stats" / "work.1.json"
    live = wait_for(lambda: (s := json.loads(stats.read_text())).get("pid") == new and s["live"])
    assert live["values"] == {} and live["error"] == "", live
