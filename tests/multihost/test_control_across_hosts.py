"""`arroyo status`, `down` and `down --hosts` of a multi-host topology when a worker's
host is cut off the network, on one cluster of three namespace hosts (supervisord +
Supvisors on each, the topology of ``test_supvisors`` with the reduce workers on h2
and h3). Each host has its own ``run_dir/stats``, as separate machines do: `status`
on h1 reads only the detector's and the sink's figures.

The tests run in this order and share the cluster, each going on from where the one
before left it: a worker's host is cut and ``status`` marks the worker (from the
fan-in's view, before Supvisors notices), ``down`` stops everything while that host
heals, and ``down --hosts`` ends every host's supervisord."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from arroyo.topology import load
from tests.conftest import arroyo_bin, read_jsonl, runs_of, wait_for
from tests.multihost.conftest import MARKED_SOURCE, hosts_or_skip
from tests.multihost.netns import NetnsHosts
from tests.multihost.test_supvisors import PASS, TOPO, cli, start_cluster, status, where

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(300)]

MARKED = ("STALLED", "LOST")


@dataclass
class Cluster:
    hosts: NetnsHosts
    path: Path
    tmp: Path
    stats: Path  # h1's own run_dir/stats
    victim: int = -1  # index of the host that was cut off, -1 before


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("mhc")

    def write(text: str, name: str) -> Path:
        path = tmp / name
        path.write_text(text.replace("{tmp}", str(tmp)))
        return path

    hosts = hosts_or_skip(3)
    try:
        own = [h.own_folder(tmp / "run" / "stats") for h in hosts]  # TOPO: run_dir = run
        path = start_cluster(
            write,
            hosts,
            lambda: (tmp / "mhstages.py").write_text(MARKED_SOURCE),
            runs=60,
            frames=600,
            rate=300,
        )
        yield Cluster(hosts, path, tmp, own[0])
    finally:
        hosts.close()


def stage_processes(path: Path) -> list[str]:
    """``stage/worker/pid`` of every live arroyo-stage process of this topology, on any
    namespace host (they share this machine's process table)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or str(path) not in cmd:
            continue
        if any(part.endswith("arroyo-stage") for part in cmd):
            i = cmd.index(str(path))
            found.append(f"{cmd[i + 1]}/{cmd[i + 3]}/{p.pid}")
    return found


def supervisords(path: Path, host: str = "*") -> list[int]:
    """pids of the supervisords of this topology's hosts (or of one)."""
    confs = {str(p) for p in (load(path).run_dir / "hosts").glob(f"{host}/supervisord.conf")}
    return [
        p.pid
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE and confs & set(p.info["cmdline"] or [])
    ]


def let_go(stats_dir: Path, identity: str) -> bool:
    """A stage process of h1 (the detector or the sink) counts ``identity`` as gone."""
    for name in ("det.0", "sink.0"):
        try:
            stats = json.loads((stats_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue
        if any(identity in link.get("gone", {}) for link in stats.get("links", [])):
            return True
    return False


def test_status_marks_a_cut_off_remote_worker(cluster: Cluster) -> None:
    """Once the fan-in (or the detector) has let the cut-off worker go, which takes
    ``peer_timeout``, the next ``status`` shows it STALLED or LOST, long before
    Supvisors notices the host is gone (two 5 s ticks) and starts it elsewhere."""
    h1, path = cluster.hosts[0], cluster.path
    out = cluster.tmp / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) >= 1, timeout=90)
    victim_name = where(status(h1, path), "reduce")[1][1]
    pid = next(int(p.split("/")[2]) for p in stage_processes(path) if p.startswith("reduce/1/"))
    identity = f"reduce/1/{pid}@{victim_name}"
    cluster.victim = next(i for i, h in enumerate(cluster.hosts) if h.name == victim_name)
    t0 = time.monotonic()
    cluster.hosts.cut(cluster.victim)
    seen: list[tuple[bool, str, str]] = []

    def marked() -> bool:
        judged = let_go(cluster.stats, identity)  # read before status reads the same files
        row = next(r for r in status(h1, path) if (r["stage"], r["worker"]) == ("reduce", 1))
        seen.append((judged, row["state"], ",".join(row["hosts"])))
        if row["state"] in MARKED:
            return True
        assert not judged, f"let go by its peers, still shown as live: {seen}"
        assert row["hosts"] == [victim_name], f"moved before it was ever marked: {seen}"
        return False

    wait_for(marked, timeout=60, interval=0.2)
    print(f"(let go by a peer, state, hosts) per status call after the cut: {seen}")
    print(f"cut -> status shows it {seen[-1][1]}: {time.monotonic() - t0:.1f}s")


def test_down_while_the_cut_off_host_heals(cluster: Cluster) -> None:
    """`down` starts while a worker's host is cut off (its worker running elsewhere by
    now, the cut-off copy still running there), and the host heals once the sources
    have stopped: the cluster reshapes under the stop (the host rejoins, two
    copies of a worker are conciliated). `down` waits for it to settle and exits 0
    with nothing left running, or 1 naming what still runs; never 2."""
    hosts, path = cluster.hosts, cluster.path
    if cluster.victim < 0:  # run alone: cut reduce worker 1's host now
        name = where(status(hosts[0], path), "reduce")[1][1]
        cluster.victim = next(i for i, h in enumerate(hosts) if h.name == name)
        hosts.cut(cluster.victim)
    victim = hosts[cluster.victim].name

    def moved() -> bool:  # Supvisors saw the host go and started the worker elsewhere
        state, host = where(status(hosts[0], path), "reduce")[1]
        return state == "RUNNING" and host not in ("", victim)

    wait_for(moved, timeout=90, interval=0.5)
    log = cluster.tmp / "down.log"
    t0 = time.monotonic()
    with log.open("wb") as f:
        down = hosts[0].popen(
            [arroyo_bin("arroyo"), "down", str(path)], stdout=f, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: not any(p.startswith("det/") for p in stage_processes(path)), timeout=90)
        hosts.heal(cluster.victim)
        rc = down.wait(timeout=240)
        print(f"arroyo down took {time.monotonic() - t0:.1f}s")
    finally:
        if down.poll() is None:
            down.kill()
            down.wait()
    text = log.read_text()
    print(f"arroyo down -> {rc}:\n{text}")
    assert rc in (0, 1), text
    left = stage_processes(path)
    if rc == 1:
        assert "still running" in text or "no answer from" in text, text
    assert not left, f"stage processes left running after `arroyo down` ({rc}): {left}\n{text}"


def test_down_hosts_ends_every_supervisord(cluster: Cluster) -> None:
    h1, path = cluster.hosts[0], cluster.path
    assert len(supervisords(path)) >= len(list(cluster.hosts))
    t0 = time.monotonic()
    r = cli(h1, "down", str(path), "--hosts")
    print(f"arroyo down --hosts took {time.monotonic() - t0:.1f}s:\n{r.stderr}")
    assert "supervisord ended" in r.stderr, r.stderr
    assert not supervisords(path, "h1"), r.stderr  # where `down` ran: watched to its exit
    # another host's process cannot be watched from h1: it has closed its inet server
    # and exits next
    wait_for(lambda: not supervisords(path), timeout=30)
    assert not stage_processes(path)


def one_run(hosts: str, reduce_hosts: str) -> str:
    """``test_supvisors``' topology (for ``topo``) with these [hosts] lines."""
    kw = {"runs": 1, "frames": 1, "rate": 1}
    return TOPO.format(hosts=hosts, reduce_hosts=reduce_hosts, reduce=PASS, tmp="{tmp}", **kw)


def test_down_names_a_host_that_does_not_answer(topo, marked_source) -> None:
    """No cluster: h1 runs no supervisord (connection refused: nothing runs under one)
    and h2 is declared but not there (no route). `down` waits a while for h2, then
    exits 1 saying that what runs there is unknown."""
    hosts = hosts_or_skip(1)
    try:
        marked_source()
        declared = f"h1 = {hosts[0].address}\nh2 = 10.77.0.250"
        path = topo(one_run(declared, "h1, h2"), name="sv.ini")
        cli(hosts[0], "keys", str(path))
        r = hosts[0].run([arroyo_bin("arroyo"), "down", str(path)], timeout=120)
        print(r.stderr)
        assert r.returncode == 1, r
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("no answer from host h2 ("), r.stderr
        assert "h1" not in last, r.stderr
    finally:
        hosts.close()


def test_down_hosts_with_chains_is_a_mistake(topo, marked_source) -> None:
    path = topo(one_run("h1 = 10.77.0.11\nh2 = 10.77.0.12", "h2"), name="sv.ini")
    marked_source()
    r = subprocess.run(
        [arroyo_bin("arroyo"), "down", str(path), "main", "--hosts"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r
    assert r.stderr.strip() == (
        "--hosts ends every host's supervisord, so every chain stops: give no CHAINS (main)"
    ), r.stderr
