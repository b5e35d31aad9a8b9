"""The real supervisord running a topology: up, supervisorctl, scale, kill, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, pids, stage_procs, supervisord_procs

pytestmark = pytest.mark.timeout(180)


def test_up_supervisorctl_stop_start_down(sup, tmp_path):
    path = sup(frames=1_000_000, rate=2000, workers=2)
    arroyo("up", str(path))
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    assert {(r["stage"], r["worker"], r["state"]) for r in rows} == {
        ("det", 0, "RUNNING"),
        ("work", 0, "RUNNING"),
        ("work", 1, "RUNNING"),
        ("sink", 0, "RUNNING"),
    }
    for key in (
        "chain",
        "stage",
        "worker",
        "state",
        "pid",
        "cpu_percent",
        "rss_bytes",
        "received",
        "sent",
        "errors",
        "dropped",
    ):
        assert all(key in r for r in rows)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 1500, timeout=30)
    conf = supervise.paths(load(path)).conf
    ctl = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(conf)]
    stopped = subprocess.run([*ctl, "stop", "main:*"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30).stdout
    assert status.count("STOPPED") == 4, status
    runs = runs_of(read_jsonl(out))
    assert len(runs) == 1
    _, n, stop = runs[0]
    assert n == stop["seq"] > 1500, f"sink got {n}, source emitted {stop['seq']}"
    started = subprocess.run([*ctl, "start", "main:*"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for(lambda: len(pids(path)) == 4, timeout=30)
    arroyo("down", str(path))
    assert not supervisord_procs(conf)
    assert not stage_procs(path)


def test_scale_under_load_keeps_other_pids_and_loses_nothing(sup, tmp_path):
    path = sup(frames=15000, rate=1500, workers=1)
    arroyo("up", str(path))
    before = pids(path)
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 300, timeout=30)
    arroyo("scale", str(path), "work", "3")
    after_up = pids(path)
    assert {k: after_up[k] for k in before} == before
    assert {"work_1", "work_2"} <= after_up.keys()
    n1 = len(read_jsonl(out))
    wait_for(lambda: len(read_jsonl(out)) > n1 + 300, timeout=30)  # the stream goes on
    arroyo("scale", str(path), "work", "1")
    after_down = pids(path)
    assert after_down == before
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 1, timeout=60)
    (_, n, stop) = runs_of(read_jsonl(out))[0]
    assert n == 15000 and stop["seq"] == 15000
    frames = [r["metadata"]["frame"] for r in read_jsonl(out) if r["kind"] == "Event"]
    assert sorted(frames) == list(range(15000)), "every event exactly once"
    assert "incomplete" not in stop["data"]
    # the count survives down + up
    arroyo("scale", str(path), "work", "2")
    arroyo("down", str(path))
    arroyo("up", str(path))
    assert {"work_0", "work_1"} <= pids(path).keys() and "work_2" not in pids(path)


def test_sigkill_worker_is_restarted_and_stream_continues(sup, tmp_path):
    path = sup(frames=1_000_000, rate=1000, workers=2)
    arroyo("up", str(path))
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(read_jsonl(out)) > 200, timeout=30)
    victim = pids(path)["work_1"]
    os.kill(victim, signal.SIGKILL)
    new = wait_for(lambda: (p := pids(path).get("work_1")) and p != victim and p, timeout=5)
    assert new != victim
    n = len(read_jsonl(out))
    wait_for(lambda: len(read_jsonl(out)) > n + 500, timeout=30)


def test_scale_refused_for_a_bound_stage(sup):
    path = sup()
    result = arroyo("scale", str(path), "sink", "2", check=False)
    assert result.returncode == 2
    assert "[stage:sink] cannot be scaled" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_reports_a_stage_that_fails_in_init(sup, topo):
    path = sup()
    text = path.read_text().replace("frames = 200", "frames = -1")
    path.write_text(text)
    result = arroyo("up", str(path), check=False)
    assert result.returncode != 0
    assert "stage det" in result.stderr
    assert "frames and runs must be >= 0" in result.stderr


def test_render_is_unix_socket_only(sup):
    path = sup()
    conf = Path(arroyo("render", str(path)).stdout.strip())
    text = conf.read_text()
    assert "[unix_http_server]" in text and "chmod = 0700" in text
    assert "inet_http_server" not in text
    assert "[group:main]" in text and "programs = det,work,sink" in text
    assert "stopasgroup = true" in text and "killasgroup = true" in text
    prio = {
        s: int(text.split(f"[program:{s}]")[1].split("priority = ")[1].split()[0])
        for s in ("det", "work", "sink")
    }
    assert prio["sink"] < prio["work"] < prio["det"]


def test_up_after_an_edit_refuses_while_running_and_renders_again_when_idle(sup, tmp_path):
    path = sup(frames=1_000_000, rate=500, workers=1)
    arroyo("up", str(path))
    before = pids(path)
    path.write_text(path.read_text().replace("workers = 1", "workers = 2"))

    # Stages are running with the old settings: refused, in one line, nothing touched.
    refused = arroyo("up", str(path), check=False)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert str(path) in refused.stderr and "arroyo down" in refused.stderr
    assert pids(path) == before

    # With every process stopped (plain supervisorctl), up renders the edit and runs it.
    conf = supervise.paths(load(path)).conf
    ctl = [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(conf)]
    subprocess.run([*ctl, "stop", "main:*"], capture_output=True, timeout=120, check=True)
    again = arroyo("up", str(path))
    assert "rendered again" in again.stderr
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    assert sorted((r["stage"], r["worker"]) for r in rows if r["state"] == "RUNNING") == [
        ("det", 0),
        ("sink", 0),
        ("work", 0),
        ("work", 1),
    ]
    out = tmp_path / "out.jsonl"
    n = len(read_jsonl(out))
    wait_for(lambda: len(read_jsonl(out)) > n + 200, timeout=30)


def _typo(text: str) -> str:
    return text.replace("workers = 2", "workers = two")


def _no_header(text: str) -> str:  # even [topology] run_dir cannot be read any more
    return text.replace("[topology]", "topology")


@pytest.mark.parametrize(
    ("breaks", "why"),
    [
        (_typo, "[stage:work] workers = 'two': expected an integer"),
        (_no_header, "not a valid INI file"),
        (None, "no such topology file"),  # the file is gone
    ],
)
def test_status_and_down_use_what_up_started_once_the_ini_is_broken(sup, breaks, why):
    path = sup(frames=1_000_000, rate=500, workers=2)
    arroyo("up", str(path))
    conf = supervise.paths(load(path)).conf
    text = path.read_text()
    try:
        if breaks is None:
            path.unlink()
        else:
            path.write_text(breaks(text))
        for refused in (
            arroyo("check", str(path), check=False),
            arroyo("up", str(path), check=False),
        ):
            assert refused.returncode == 2 and why in refused.stderr, refused
        note = f"; using the topology `arroyo up` started ({conf.parent}/rendered-topology.ini)"

        status = arroyo("status", str(path))
        assert status.stderr.count("\n") == 1 and why in status.stderr, status.stderr
        assert status.stderr.startswith(str(path)) and note in status.stderr, status.stderr
        assert status.stdout.count(" RUNNING ") == 4, status.stdout
        rows = json.loads(arroyo("status", str(path), "--json").stdout)
        assert [r["state"] for r in rows] == ["RUNNING"] * 4

        down = arroyo("down", str(path))
        assert down.stderr.count("\n") == 1 and note in down.stderr, down.stderr
        assert down.stdout.strip() == "stopped"
        assert not stage_procs(path) and not supervisord_procs(conf)
    finally:
        path.write_text(text)
