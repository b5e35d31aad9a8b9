"""A topology on four namespace hosts under real supervisord + Supvisors, driven by
the ``arroyo`` command line from one host: detector and sink on h1, two reduce
workers allowed on every other host (h2, h3 and h4). Covers ``arroyo host``/``up``/
``status``/``down``, placement, a lost host's worker restarted elsewhere by Supvisors
(three times, the lost host coming back each time), and scaling across hosts mid-run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from arroyo.topology import load
from tests.conftest import arroyo_bin, read_jsonl, runs_of, wait_for
from tests.multihost.conftest import hosts_or_skip
from tests.multihost.netns import Host, NetnsHosts
from tests.multihost.test_links_across_hosts import (
    BUSY,
    PASS,
    check_losses,
    incomplete_after,
    last_run,
    mid_run,
    settled,
)

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(420)]

TOPO = """
[topology]
name = sv
run_dir = run
security = curve
peer_timeout = 2

[hosts]
{hosts}

[chain:main]
stages = det, reduce, sink

[stage:det]
role = listener
class = mhstages:MarkedSource
runs = {runs}
frames = {frames}
rate_hz = {rate}
host = h1
stopwaitsecs = 15

[stage:reduce]
role = operator
{reduce}
input = det
workers = 2
hosts = {reduce_hosts}
on_host_lost = restart
stopwaitsecs = 15

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = reduce
host = h1
drain_timeout = 8
stopwaitsecs = 15
"""


@pytest.fixture
def hosts4():
    hosts = hosts_or_skip(4)
    try:
        yield hosts
    finally:
        hosts.close()


def cli(host: Host, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    r = host.run([arroyo_bin("arroyo"), *args], timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"arroyo {args} on {host.name} -> {r.returncode}\n{r.stderr}")
    return r


def status(host: Host, path: Path) -> list[dict[str, Any]]:
    return json.loads(cli(host, "status", str(path), "--json").stdout)


def where(rows: list[dict[str, Any]], stage: str) -> dict[int, tuple[str, str]]:
    return {r["worker"]: (r["state"], ",".join(r["hosts"])) for r in rows if r["stage"] == stage}


def start_cluster(
    topo: Any, hosts: NetnsHosts, marked_source: Any, reduce: str = PASS, **kw: int
) -> Path:
    marked_source()
    lines = "\n".join(f"{h.name} = {h.address}" for h in hosts)
    reduce_hosts = ", ".join(h.name for h in list(hosts)[1:])  # all but h1
    text = TOPO.format(hosts=lines, reduce_hosts=reduce_hosts, reduce=reduce, tmp="{tmp}", **kw)
    path = topo(text, name="sv.ini")
    cli(hosts[0], "keys", str(path))
    t0 = time.monotonic()
    for h in hosts:
        started = cli(h, "host", str(path), h.name)
        assert "ephemeral range" not in started.stderr, started.stderr  # the default ports
    cli(hosts[0], "up", str(path))
    print(f"cluster formed and chain up in {time.monotonic() - t0:.1f}s")
    return path


def test_runs_across_hosts_and_three_lost_hosts(topo, hosts4, marked_source, tmp_path):
    # BUSY workers: the one lost holds events of the run (see test_links_across_hosts)
    path = start_cluster(topo, hosts4, marked_source, BUSY, runs=60, frames=600, rate=300)
    h1 = hosts4[0]
    rows = status(h1, path)
    assert {r["state"] for r in rows} == {"RUNNING"}, rows
    assert where(rows, "det") == {0: ("RUNNING", "h1")}
    reduce = where(rows, "reduce")
    assert len({host for _, host in reduce.values()}) == 2, reduce  # spread over two hosts
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= 5, timeout=90)
    assert all("incomplete" not in s["data"] for _, _, s in runs_of(read_jsonl(out))[:5])

    recovered = []
    for _ in range(3):
        victim_name = where(status(h1, path), "reduce")[1][1]
        victim = next(h for h in hosts4 if h.name == victim_name)
        wait_for(lambda: mid_run(out, 600), timeout=30)
        closed = last_run(path)
        t0 = time.monotonic()
        victim.kill_all()  # the whole host: supervisord, Supvisors and the worker
        wait_for(
            lambda closed=closed: incomplete_after(path, closed),
            timeout=60,
        )
        detected = time.monotonic() - t0

        def moved(victim_name: str = victim_name) -> bool:
            state, host = where(status(h1, path), "reduce")[1]
            return state == "RUNNING" and host not in ("", victim_name)

        wait_for(moved, timeout=90, interval=0.5)
        recovered.append((round(detected, 1), round(time.monotonic() - t0, 1)))
        n = len(read_jsonl(out))
        wait_for(lambda n=n: len(read_jsonl(out)) > n + 600, timeout=60)
        cli(victim, "host", str(path), victim.name)  # the host comes back
    print(f"(dead-remote detected, worker running elsewhere) after kill, s: {recovered}")
    wait_for(lambda: settled(path), timeout=60)
    t0 = time.monotonic()
    cli(h1, "down", str(path))
    print(f"arroyo down took {time.monotonic() - t0:.1f}s")
    check_losses(path, out)
    assert {r["state"] for r in status(h1, path)} <= {"STOPPED", "EXITED", "UNKNOWN"}


def test_scale_across_hosts_mid_run(topo, hosts4, marked_source, tmp_path):
    path = start_cluster(topo, hosts4, marked_source, runs=30, frames=400, rate=400)
    h1 = hosts4[0]
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= 2, timeout=90)
    before = {(r["stage"], r["worker"]): r for r in status(h1, path)}
    pids_before = _pids(path)
    cli(h1, "scale", str(path), "reduce", "3")
    rows = status(h1, path)
    assert where(rows, "reduce")[2][0] == "RUNNING", rows
    table = cli(h1, "status", str(path)).stdout
    assert "HOST" in table.splitlines()[0] and " h1 " in table, table
    n = len(runs_of(read_jsonl(out)))
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= n + 2, timeout=60)
    cli(h1, "scale", str(path), "reduce", "2")
    n = len(runs_of(read_jsonl(out)))
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= n + 2, timeout=60)
    pids_after = _pids(path)
    for key in before:
        assert pids_after.get(key) == pids_before.get(key), (key, pids_before, pids_after)
    cli(h1, "down", str(path))
    runs = runs_of(read_jsonl(out))
    finished = [stop for _, _, stop in runs if not stop["data"].get("interrupted")]
    assert finished and all("incomplete" not in s["data"] for s in finished), finished
    for run, count, stop in runs:
        if not stop["data"].get("interrupted"):
            assert count == 400, run


def _pids(path: Path) -> dict[tuple[str, int], int]:
    """pid of every stage process, from its stats file (shared run_dir in this test)."""
    found = {}
    for f in (load(path).run_dir / "stats").glob("*.json"):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        stage, _, worker = f.stem.rpartition(".")
        found[(stage, int(worker))] = data.get("pid")
    return found


def test_a_cut_off_host_and_the_partition_healing(topo, hosts4, marked_source, tmp_path):
    """The host of a worker is cut off mid-run: the run closes incomplete, Supvisors
    starts the worker elsewhere; when the network heals, conciliation (SENICIDE) leaves
    one copy of every worker, and the chain goes on with complete runs."""
    path = start_cluster(topo, hosts4, marked_source, runs=60, frames=600, rate=300)
    h1 = hosts4[0]
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= 2, timeout=90)
    victim_name = where(status(h1, path), "reduce")[1][1]
    index = next(i for i, h in enumerate(hosts4) if h.name == victim_name)
    closed = last_run(path)
    wait_for(lambda: (r := read_jsonl(out)) and r[-1]["kind"] == "Event", timeout=30)
    t0 = time.monotonic()
    hosts4.cut(index)
    wait_for(
        lambda: incomplete_after(path, closed),
        timeout=60,
    )
    detected = time.monotonic() - t0

    def moved() -> bool:
        state, host = where(status(h1, path), "reduce")[1]
        return state == "RUNNING" and host not in ("", victim_name)

    wait_for(moved, timeout=90, interval=0.5)
    moved_after = time.monotonic() - t0
    hosts4.heal(index)
    t1 = time.monotonic()

    def one_copy_each() -> bool:
        rows = status(h1, path)
        return all(r["state"] == "RUNNING" and len(r["hosts"]) == 1 for r in rows)

    time.sleep(6)  # a tick for the healed host to be seen again before judging
    wait_for(one_copy_each, timeout=90, interval=0.5)
    print(
        f"cut: run closed incomplete after {detected:.1f}s, worker elsewhere after "
        f"{moved_after:.1f}s; one copy of each {time.monotonic() - t1:.1f}s after the heal"
    )
    wait_for(lambda: settled(path), timeout=90)
    cli(h1, "down", str(path))
    # the cut-off side may also restart the other worker for itself (it lost sight of
    # it); conciliation then stops one of those copies too: up to two more runs
    check_losses(path, out, losses=1, most=4)
