"""Drive a multi-host topology through Supvisors (docs/multihost.md).

``start_host`` starts this host's supervisord (run once on every host). ``up``,
``status`` and ``scale`` (and ``down``, in ``clusterdown``) work from any host: they
talk XML-RPC to the first host whose inet server answers (this machine's first), wait
while the cluster is still forming or electing, and let Supvisors place and start the
processes.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arroyo.control.hostconf import credentials, host_paths, write_host_configs
from arroyo.control.render import process_name, record_workers, split_process_name, worker_count
from arroyo.control.status import mark_stalled
from arroyo.errors import ConfigError
from arroyo.runtime.net import machine_host
from arroyo.runtime.stats import stats_path
from arroyo.spec import Topology

Say = Callable[[str], None]
FORMING = ("OFF", "SYNCHRONIZATION", "ELECTION", "DISTRIBUTION", "CONCILIATION")


class _Transport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


def proxy(topology: Topology, host: str, timeout: float = 60.0) -> Any:
    user, password = credentials(topology, create=False)
    address = topology.hosts[host]
    url = f"http://{user}:{password}@{address}:{topology.supervisor_port}/RPC2"
    return xmlrpc.client.ServerProxy(url, transport=_Transport(timeout))


def _ordered_hosts(topology: Topology) -> list[str]:
    mine = machine_host(topology)
    return [mine] * bool(mine) + [h for h in topology.hosts if h != mine]


def connect(topology: Topology) -> tuple[str, Any]:
    """(host, proxy) of the first host whose supervisord answers."""
    errors = []
    for host in _ordered_hosts(topology):
        server = proxy(topology, host, timeout=5)
        try:
            server.supervisor.getState()
        except (OSError, xmlrpc.client.Error) as e:
            errors.append(f"{host}: {e}")
            continue
        return host, proxy(topology, host)
    msg = "no host's supervisord answers (run `arroyo host TOPOLOGY` on each host): " + (
        "; ".join(errors)
    )
    raise ConfigError(msg)


def wait_operational(
    topology: Topology,
    timeout: float = 120.0,
    say: Say | None = None,
    states: tuple[str, ...] = ("OPERATION",),
) -> Any:
    """A proxy once Supvisors is in one of ``states``; says what it waits for meanwhile."""
    deadline = time.monotonic() + timeout
    told = ""
    while True:
        try:
            _, server = connect(topology)
            state = server.supvisors.get_supvisors_state()
            name = state["fsm_statename"]
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            name, state = "no supervisord answering yet", {}
        if name in states:
            return server
        line = f"waiting: Supvisors is {name}"
        if name in FORMING:
            line += " (the cluster is still forming or electing a master)"
        if say is not None and line != told:
            say(line)
            told = line
        if time.monotonic() > deadline:
            msg = f"the cluster did not reach {states[0]} within {timeout:.0f}s ({name})"
            raise ConfigError(msg)
        time.sleep(0.5)


def start_host(topology: Topology, host: str = "", timeout: float = 30.0) -> Path:
    """Render and start ``host``'s supervisord (this machine's host by default)."""
    host = host or machine_host(topology)
    if not host:
        msg = "which host is this? give HOST or set ARROYO_HOST (names: " + ", ".join(
            topology.hosts
        )
        raise ConfigError(msg + ")")
    conf = write_host_configs(topology, host)[0]
    p = host_paths(topology, host)
    if p.socket.exists() and _answers(topology, host):
        return conf
    supervisord = Path(sys.executable).parent / "supervisord"
    subprocess.run([str(supervisord), "-c", str(conf)], check=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while not _answers(topology, host):
        if time.monotonic() > deadline:
            msg = f"supervisord for host {host} did not answer (see {p.logs}/supervisord.log)"
            raise ConfigError(msg)
        time.sleep(0.1)
    return conf


def _answers(topology: Topology, host: str) -> bool:
    try:
        proxy(topology, host, timeout=2).supervisor.getState()
    except (OSError, xmlrpc.client.Error):
        return False
    return True


def chains_of(topology: Topology, chains: tuple[str, ...]) -> list[str]:
    unknown = [c for c in chains if c not in topology.chains]
    if unknown:
        msg = f"{topology.path}: no chain {unknown[0]!r} (chains: {', '.join(topology.chains)})"
        raise ConfigError(msg)
    return list(chains or topology.chains)


def is_fault(e: xmlrpc.client.Fault, *names: str) -> bool:
    return any(n in e.faultString for n in names)


def up(topology: Topology, chains: tuple[str, ...] = (), say: Say | None = None) -> None:
    server = wait_operational(topology, say=say)
    for chain in chains_of(topology, chains):
        try:
            server.supvisors.start_application("LESS_LOADED", chain, True)
        except xmlrpc.client.Fault as e:
            if not is_fault(e, "ALREADY_STARTED"):
                msg = f"chain {chain}: {e.faultString}"
                raise ConfigError(msg) from e


def status_rows(topology: Topology) -> list[dict[str, Any]]:
    """One row per process: chain, stage, worker, state and host (Supvisors' view), the
    pid its host's supervisord last reported, and its counters where its stats file is
    readable from here. A process that a live peer has let go (it answered no heartbeat
    for ``peer_timeout``: frozen, or its host cut off) is STALLED. That verdict is read
    from the peer's stats file, so ``status`` on the fan-in's host (or the detector's)
    shows it within ``peer_timeout`` and the 1 s stats tick, long before Supvisors
    notices a host is gone (two of its 5 s ticks)."""
    server = wait_operational(topology, 60, None, ("OPERATION", "DISTRIBUTION", "CONCILIATION"))
    nick = {
        i["identifier"]: i["nick_identifier"] for i in server.supvisors.get_all_instances_info()
    }
    pids = _pids(server, nick)
    rows = []
    for info in server.supvisors.get_all_process_info():
        stage, worker = split_process_name(info["process_name"])
        hosts = [nick.get(i, i) for i in info["identifiers"]]
        row: dict[str, Any] = {
            "chain": info["application_name"],
            "stage": stage,
            "worker": worker,
            "state": info["statename"],
            "hosts": hosts,
        }
        where = (row["chain"], info["process_name"], hosts[0]) if len(hosts) == 1 else None
        row.update(_counters(topology, stage, worker, pids.get(where) if where else None))
        rows.append(row)
    mark_stalled(rows)
    return sorted(rows, key=lambda r: (r["chain"], r["stage"], r["worker"]))


def _pids(server: Any, nick: dict[str, str]) -> dict[tuple[str, str, str], int]:
    """(chain, program, host) -> pid, as each host's supervisord last told Supvisors (a
    host cut off keeps its last word)."""
    found = {}
    for identifier, host in nick.items():
        try:
            infos = server.supvisors.get_all_inner_process_info(identifier)
        except xmlrpc.client.Fault:
            continue
        for i in infos:
            if i.get("pid"):
                found[(i["group"], i["name"], host)] = int(i["pid"])
    return found


def _counters(topology: Topology, stage: str, worker: int, pid: int | None) -> dict[str, Any]:
    """The process's own counters when its stats file is readable from here (its own
    host, or a run_dir shared between hosts) and was written by ``pid`` (when known:
    after a move or a partition the file may be another copy's); else the pid alone."""
    alone = {"pid": pid} if pid else {}
    try:
        stats = json.loads(stats_path(topology, stage, worker).read_text())
    except (OSError, ValueError):
        return alone
    if pid and stats.get("pid") != pid:
        return alone
    keys = ("pid", "received", "sent", "errors", "dropped", "current_run", "links", "runs")
    return {k: stats[k] for k in keys if k in stats}


def scale(topology: Topology, stage: str, count: int, timeout: float = 120.0) -> tuple[int, int]:
    """Set ``stage``'s worker count: every candidate host's supervisord learns the new
    ``numprocs`` (Supvisors' ``update_numprocs``, which restarts nothing), new workers
    are placed and started by Supvisors, removed ones stopped (they drain first)."""
    spec = topology.stage(stage)
    if count < 1:
        msg = f"{stage}: a stage needs at least one worker"
        raise ConfigError(msg)
    if count > 1 and not spec.scalable:
        msg = f"{stage}: not scalable (set scalable = true)"
        raise ConfigError(msg)
    server = wait_operational(topology)
    old = worker_count(topology, stage)
    candidates = list(spec.hosts or topology.hosts)
    if count < old:
        for worker in range(count, old):
            name = f"{spec.chain}:{process_name(stage, worker)}"
            try:
                server.supvisors.stop_process(name, True)
            except xmlrpc.client.Fault as e:
                if not is_fault(e, "NOT_RUNNING"):
                    msg = f"{name}: {e.faultString}"
                    raise ConfigError(msg) from e
    for host in candidates:
        proxy(topology, host, timeout).supvisors.update_numprocs(stage, count, True, False)
    record_workers(topology, stage, count)
    for worker in range(old, count):
        name = f"{spec.chain}:{process_name(stage, worker)}"
        _start_when_known(server, name, timeout)
    return old, count


def _start_when_known(server: Any, name: str, timeout: float) -> None:
    """Supvisors learns a new process from every host's supervisord a little later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.supvisors.start_process("LESS_LOADED", name, "", True)
            return
        except xmlrpc.client.Fault as e:
            if is_fault(e, "ALREADY_STARTED"):
                return
            if not is_fault(e, "BAD_NAME") or time.monotonic() > deadline:
                msg = f"{name}: {e.faultString}"
                raise ConfigError(msg) from e
        time.sleep(0.5)
