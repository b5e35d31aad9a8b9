"""supervisord for a topology: start it, drive it over XML-RPC (config in ``render``).

One supervisord per run_dir, listening only on a unix socket (mode 0700). Each chain
is a supervisor group, each stage a program whose processes are its workers
(``STAGE_NN`` runs ``arroyo-stage TOPOLOGY STAGE --worker NN``). Worker counts changed
by ``arroyo scale`` are recorded in ``RUN_DIR/workers.json`` and rendered from there.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from arroyo.control.render import (
    fingerprint,
    paths,
    process_name,
    record_workers,
    rendered_fingerprint,
    split_process_name,
    worker_count,
    write_config,
)
from arroyo.errors import ConfigError
from arroyo.topology import MAX_WORKERS, Topology

RUNNING_STATES = {"RUNNING"}
STOPPED_STATES = {"STOPPED", "EXITED", "FATAL", "UNKNOWN"}


def rpc(topology: Topology) -> Any:
    sock = paths(topology).socket
    transport = SupervisorTransport(None, None, f"unix://{sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def is_running(topology: Topology) -> bool:
    if not paths(topology).socket.exists():
        return False
    try:
        return rpc(topology).supervisor.getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Error):
        return False


def start_supervisord(topology: Topology, timeout: float = 20.0) -> None:
    """Render the config and start supervisord for this run_dir (if not running)."""
    if is_running(topology):
        return
    conf = write_config(topology)
    exe = Path(sys.executable).parent / "supervisord"
    cmd = [str(exe) if exe.exists() else "supervisord", "-c", str(conf)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        msg = f"supervisord did not start: {result.stderr.strip() or result.stdout.strip()}"
        raise ConfigError(msg)
    deadline = time.monotonic() + timeout
    while not is_running(topology):
        if time.monotonic() > deadline:
            msg = f"supervisord did not answer on {paths(topology).socket} within {timeout}s"
            raise ConfigError(msg)
        time.sleep(0.1)


def supervisord_pid(topology: Topology) -> int | None:
    try:
        return int(paths(topology).pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def chains_to_act_on(topology: Topology, chains: tuple[str, ...]) -> list[str]:
    unknown = [c for c in chains if c not in topology.chains]
    if unknown:
        msg = (
            f"{topology.path}: no chain {', '.join(unknown)} (chains: {', '.join(topology.chains)})"
        )
        raise ConfigError(msg)
    return list(chains) or list(topology.chains)


def log_tail(topology: Topology, name: str, lines: int = 15) -> str:
    path = paths(topology).logs / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def up(
    topology: Topology,
    chains: tuple[str, ...] = (),
    timeout: float = 60.0,
    say: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Start supervisord if needed and every process of ``chains`` (sinks first);
    wait until all are RUNNING. Returns problem lines (empty when everything runs).

    A topology edited since supervisord started is re-rendered when nothing runs, and
    refused (ConfigError) while its stages run: they keep the settings they started
    with, and starting more next to them would mix two versions of the graph."""
    targets = chains_to_act_on(topology, chains)
    if is_running(topology) and _config_is_stale(topology):
        _restart_idle_supervisord(topology)
        say(f"{topology.path} changed since supervisord started: config rendered again")
    start_supervisord(topology)
    server = rpc(topology)
    started: list[str] = []
    for chain in targets:
        for stage in _by_priority(topology, chain):
            started += _start_stage(server, chain, stage)
    return _wait_running(topology, server, started, timeout)


def _config_is_stale(topology: Topology) -> bool:
    recorded = rendered_fingerprint(topology)
    return recorded is not None and recorded != fingerprint(topology)


def _restart_idle_supervisord(topology: Topology) -> None:
    """Shut down a supervisord whose config is out of date, if none of its processes
    runs; the caller starts it again with a fresh render."""
    server = rpc(topology)
    busy = [
        f"{i['group']}:{i['name']}"
        for i in server.supervisor.getAllProcessInfo()
        if i["statename"] not in STOPPED_STATES
    ]
    if busy:
        msg = (
            f"{topology.path}: changed since its stages were started ({len(busy)} still "
            f"running, e.g. {busy[0]}); they keep their old settings. To apply it: "
            f"arroyo down {topology.path} && arroyo up {topology.path}"
        )
        raise ConfigError(msg)
    _shutdown(topology, server)


def _shutdown(topology: Topology, server: Any) -> None:
    pid = supervisord_pid(topology)
    with contextlib.suppress(OSError, xmlrpc.client.Error):
        server.supervisor.shutdown()
    _wait_gone(pid, timeout=30)


def _by_priority(topology: Topology, chain: str, reverse: bool = False) -> list[str]:
    members = topology.chains[chain]
    return sorted(members, key=lambda s: topology.stages[s].supervision.priority, reverse=reverse)


def _processes_of(server: Any, chain: str, stage: str) -> list[dict[str, Any]]:
    return [
        info
        for info in server.supervisor.getAllProcessInfo()
        if info["group"] == chain and split_process_name(info["name"])[0] == stage
    ]


def _start_stage(server: Any, chain: str, stage: str) -> list[str]:
    names = []
    for info in _processes_of(server, chain, stage):
        name = f"{chain}:{info['name']}"
        if info["statename"] in RUNNING_STATES | {"STARTING"}:
            continue
        with contextlib.suppress(xmlrpc.client.Fault):  # reported by _wait_running
            server.supervisor.startProcess(name, False)
        names.append(name)
    return names


def _wait_running(topology: Topology, server: Any, names: list[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    pending = list(names)
    problems = []
    while pending:
        for name in list(pending):
            info = server.supervisor.getProcessInfo(name)
            state = info["statename"]
            if state == "RUNNING" and time.time() - info["start"] >= 1.0:
                pending.remove(name)
            elif state in {"FATAL", "EXITED", "BACKOFF"}:
                stage = split_process_name(info["name"])[0]
                tail = log_tail(topology, info["name"])
                problems.append(f"stage {stage} ({name}) failed to start ({state}):\n{tail}")
                with contextlib.suppress(xmlrpc.client.Fault):
                    server.supervisor.stopProcess(name, False)
                pending.remove(name)
        if time.monotonic() > deadline:
            problems += [f"{n}: not RUNNING after {timeout:.0f}s" for n in pending]
            break
        time.sleep(0.1)
    return problems


def down(topology: Topology, chains: tuple[str, ...] = (), timeout: float = 120.0) -> None:
    """Stop chains sources first, each program drained before the next; shut
    supervisord down once nothing is running."""
    if not is_running(topology):
        return
    targets = chains_to_act_on(topology, chains)
    server = rpc(topology)
    for chain in targets:
        for stage in _by_priority(topology, chain, reverse=True):
            _stop_stage(server, chain, stage, timeout)
    if not any(i["statename"] not in STOPPED_STATES for i in server.supervisor.getAllProcessInfo()):
        _shutdown(topology, server)


def _stop_stage(server: Any, chain: str, stage: str, timeout: float) -> None:
    names = [
        f"{chain}:{i['name']}"
        for i in _processes_of(server, chain, stage)
        if i["statename"] not in STOPPED_STATES
    ]
    for name in names:
        with contextlib.suppress(xmlrpc.client.Fault):
            server.supervisor.stopProcess(name, False)
    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        names = [
            n
            for n in names
            if server.supervisor.getProcessInfo(n)["statename"] not in STOPPED_STATES
        ]
        time.sleep(0.1)


def _wait_gone(pid: int | None, timeout: float) -> None:
    if pid is None:
        return
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout)


def _cpu_percent(pids: list[int], interval: float = 0.1) -> dict[int, float]:
    """CPU % of every pid over one shared interval (not one interval per process)."""
    import psutil

    procs = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs[pid] = psutil.Process(pid)
            procs[pid].cpu_percent(None)
    if procs:
        time.sleep(interval)
    out = {}
    for pid, proc in procs.items():
        with contextlib.suppress(psutil.Error):
            out[pid] = proc.cpu_percent(None)
    return out


def status_rows(topology: Topology) -> list[dict[str, Any]]:
    """One row per process known to supervisord (or per stage when it is not running)."""
    import psutil

    from arroyo.runtime.stats import stats_path

    rows: list[dict[str, Any]] = []
    infos = rpc(topology).supervisor.getAllProcessInfo() if is_running(topology) else []
    cpu = _cpu_percent([i["pid"] for i in infos if i["pid"]])
    now = time.time()
    for info in infos:
        stage, worker = split_process_name(info["name"])
        row: dict[str, Any] = {
            "chain": info["group"],
            "stage": stage,
            "worker": worker,
            "state": info["statename"],
            "pid": info["pid"] or None,
            "uptime": (now - info["start"]) if info["statename"] == "RUNNING" else 0.0,
            "cpu_percent": None,
            "rss_bytes": None,
        }
        if info["pid"]:
            with contextlib.suppress(psutil.Error):
                row["cpu_percent"] = cpu.get(info["pid"])
                row["rss_bytes"] = psutil.Process(info["pid"]).memory_info().rss
        try:
            stats = json.loads(stats_path(topology, stage, worker).read_text())
        except (OSError, ValueError):
            stats = {}
        if stats.get("pid") not in (None, info["pid"]) and info["statename"] == "RUNNING":
            stats = {**stats, "stale": True}
        row.update(
            {
                "received": stats.get("received", 0),
                "sent": stats.get("sent", 0),
                "errors": stats.get("errors", 0),
                "dropped": stats.get("dropped", 0),
                "current_run": stats.get("current_run"),
                "rate_in": stats.get("rate_in", 0.0) if info["statename"] == "RUNNING" else 0.0,
                "rate_out": stats.get("rate_out", 0.0) if info["statename"] == "RUNNING" else 0.0,
                "drops": stats.get("drops", {}),
                "process_ms_mean": stats.get("process_ms_mean", 0.0),
                "process_ms_p99": stats.get("process_ms_p99", 0.0),
                "links": stats.get("links", []),
                "runs": stats.get("runs", []),
            }
        )
        rows.append(row)
    return rows


def scale(topology: Topology, stage: str, count: int, timeout: float = 120.0) -> tuple[int, int]:
    """Set a running stage's worker count; every other process keeps running.

    Removed workers (highest index first) drain before they exit. The count is
    recorded in run_dir so the next ``up`` renders it. Returns (old, new)."""
    spec = topology.stage(stage)
    if not 1 <= count <= MAX_WORKERS:
        msg = f"{topology.path}: [stage:{stage}] workers must be 1 to {MAX_WORKERS}, not {count}"
        raise ConfigError(msg)
    if not spec.scalable:
        msg = (
            f"{topology.path}: [stage:{stage}] cannot be scaled: it is a single process that "
            "binds its links (set scalable = true, or give it workers > 1, and re-run up)"
        )
        raise ConfigError(msg)
    old = worker_count(topology, stage)
    record_workers(topology, stage, count)
    if not is_running(topology):
        return old, count
    server = rpc(topology)
    chain = spec.chain
    current = sorted(
        split_process_name(i["name"])[1]
        for i in server.supervisor.getAllProcessInfo()
        if i["group"] == chain and split_process_name(i["name"])[0] == stage
    )
    for index in range(count):
        if index not in current:
            name = server.arroyo.addWorker(chain, stage, index)
            server.supervisor.startProcess(f"{chain}:{name}", True)
    for index in [i for i in current if i >= count]:
        name = f"{chain}:{process_name(stage, index)}"
        with contextlib.suppress(xmlrpc.client.Fault):  # already stopped
            server.supervisor.stopProcess(name, True)
        server.arroyo.removeWorker(chain, process_name(stage, index))
    return old, count
