"""A topology of 1,000 stages in one line: every graph walk is iterative, so check,
render and status work on it (a recursive walk overflowed Python's stack at ~360)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from arroyo.topology import load
from tests.conftest import arroyo_bin

LENGTH = 1000


def _chain(length: int, cycle: bool = False) -> str:
    """A line of ``length`` stages, declared sink first (so a walk from the first
    declared stage goes the whole way up); ``cycle``: the source takes the sink's output
    through a listener-free loop of operators instead."""
    names = [f"s{i}" for i in range(length)]
    parts = [
        "[topology]\nname = long\nrun_dir = run\n",
        f"[chain:main]\nstages = {', '.join(reversed(names))}\n",
        f"[stage:{names[-1]}]\nrole = publisher\nclass = stages.sinks:Discard\n"
        f"input = {names[-2]}\n",
    ]
    for i in range(length - 2, 0, -1):
        parts.append(
            f"[stage:{names[i]}]\nrole = operator\nclass = stages.basic:Scale\n"
            f"input = {names[i - 1]}\nscalable = false\n"
        )
    if cycle:
        head = f"[stage:s0]\nrole = operator\nclass = stages.basic:Scale\ninput = s{length - 2}\n"
    else:
        head = "[stage:s0]\nrole = listener\nclass = stages.synthetic:DetectorSimulator\n"
        head += "frames = 1\nshape = 2, 2\n"
    parts.append(head)
    return "\n".join(parts)


def _arroyo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [arroyo_bin("arroyo"), *args], capture_output=True, text=True, timeout=100, check=False
    )


@pytest.mark.timeout(200)
def test_a_thousand_stage_chain_checks_renders_and_shows_status(tmp_path: Path) -> None:
    path = tmp_path / "long.ini"
    path.write_text(_chain(LENGTH))
    for command in ("check", "render", "status"):
        result = _arroyo(command, str(path))
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    topology = load(path)
    priority = {n: s.supervision.priority for n, s in topology.stages.items()}
    assert priority["s999"] < priority["s500"] < priority["s0"] == 100 + 10 * (LENGTH - 1)
    conf = (tmp_path / "run" / "supervisord.conf").read_text()
    assert conf.count("[program:") == LENGTH


@pytest.mark.timeout(200)
def test_a_thousand_stage_chain_checks_in_about_the_time_of_a_short_one(tmp_path: Path) -> None:
    """Checking 1,000 stages costs little beyond starting the command (measured
    against a 3-stage chain in the same run; bounds generous for a loaded machine)."""
    long, short = tmp_path / "long.ini", tmp_path / "short.ini"
    long.write_text(_chain(LENGTH))
    short.write_text(_chain(3))

    def seconds(path: Path) -> float:
        t0 = time.monotonic()
        result = _arroyo("check", str(path))
        assert result.returncode == 0, result.stderr[-2000:]
        return time.monotonic() - t0

    baseline = min(seconds(short) for _ in range(2))
    assert min(seconds(long) for _ in range(2)) < baseline + 10 * max(baseline, 0.2)


@pytest.mark.timeout(200)
def test_a_thousand_stage_cycle_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "loop.ini"
    path.write_text(_chain(LENGTH, cycle=True))
    result = _arroyo("check", str(path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "cycle: " in lines[0] and "Traceback" not in result.stderr
    assert lines[0].count(" -> ") == LENGTH - 1


@pytest.mark.timeout(200)
def test_a_thousand_stage_chain_runs_inline(tmp_path: Path) -> None:
    """In one process the links are calls into the next stage: queued, not nested, so
    the run's messages go the whole way (a direct call overflowed the stack)."""
    text = _chain(LENGTH).replace("stages.sinks:Discard", "stages.sinks:JsonLinesLog")
    out = tmp_path / "out.jsonl"
    text = text.replace(f"input = s{LENGTH - 2}\n", f"input = s{LENGTH - 2}\npath = {out}\n", 1)
    path = tmp_path / "long.ini"
    path.write_text(text)
    done = _arroyo("run", str(path), "--inline")
    assert done.returncode == 0, done.stderr[-2000:]
    kinds = [json.loads(line)["kind"] for line in out.read_text().splitlines()]
    assert kinds == ["Start", "Event", "Stop"]
