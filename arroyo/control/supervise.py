"""supervisord for a topology: start it, drive it over XML-RPC (config in ``render``).

One supervisord per run_dir, listening only on a unix socket (mode 0700). Each chain
is a supervisor group, each stage a program whose processes are its workers
(``STAGE_NN`` runs ``arroyo-stage TOPOLOGY STAGE --worker NN``). Worker counts changed
by ``arroyo scale`` are recorded in ``RUN_DIR/workers.json`` and rendered from there.
"""

from __future__ import annotations

import contextlib
import glob
import json
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import Faults, SupervisorTransport

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
from arroyo.control.status import CpuMeter
from arroyo.control.status import status_rows as rows_of
from arroyo.control.strays import Stray, describe, find_strays, stop_strays
from arroyo.errors import ConfigError
from arroyo.runtime.live import forget_live
from arroyo.topology import MAX_WORKERS, Topology

RUNNING_STATES = {"RUNNING"}
STOPPED_STATES = {"STOPPED", "EXITED", "FATAL", "UNKNOWN"}
DOWN_PASSES = 3  # a worker that ``scale`` adds while ``down`` runs is stopped by the next


class _Transport(SupervisorTransport):
    """supervisor's unix-socket transport, whose socket errors (supervisord gone in
    the middle of a command) are raised as ``xmlrpc.client.ProtocolError``: every
    RPC failure is then an ``xmlrpc.client.Error``, which the CLI prints as one line."""

    def request(self, host: Any, handler: Any, request_body: Any, verbose: Any = 0) -> Any:
        try:
            return super().request(host, handler, request_body, verbose)
        except OSError as e:
            self.close()
            raise xmlrpc.client.ProtocolError(self.serverurl, 0, str(e), {}) from e


def rpc(topology: Topology) -> Any:
    sock = paths(topology).socket
    transport = _Transport(None, None, f"unix://{sock}")
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
    wait until each is RUNNING and has said it is ready (links open, user object
    built). Returns problem lines (empty when everything runs).

    Refused (ConfigError) while stage processes of the topology run outside
    supervisord (a second set would fight them for their endpoints), and while its
    stages run on a topology edited since supervisord started: they keep the settings
    they started with, and starting more next to them would mix two versions of the
    graph. An edited topology with nothing running is simply rendered again."""
    targets = chains_to_act_on(topology, chains)
    _refuse_strays(topology)
    if is_running(topology) and _config_is_stale(topology):
        _restart_idle_supervisord(topology)
        say(f"{topology.path} changed since supervisord started: config rendered again")
    start_supervisord(topology)
    server = rpc(topology)
    started: list[str] = []
    for chain in targets:
        for stage in _by_priority(topology, chain):
            _forget_counts(topology, server, chain, stage)
            started += _start_stage(server, chain, stage)
    return _wait_running(topology, server, started, timeout)


def strays(topology: Topology) -> list[Stray]:
    """Stage processes of ``topology`` that its supervisord (if any) does not know."""
    if not is_running(topology):
        return find_strays(topology)
    infos = rpc(topology).supervisor.getAllProcessInfo()
    return find_strays(topology, {i["pid"] for i in infos if i["pid"]}, supervisord_pid(topology))


def _refuse_strays(topology: Topology) -> None:
    found = strays(topology)
    if found:
        msg = (
            f"{topology.path}: {len(found)} stage process(es) of this topology run outside "
            f"supervisord: {describe(found)}; `arroyo down {topology.path}` stops them"
        )
        raise ConfigError(msg)


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


def _forget_counts(topology: Topology, server: Any, chain: str, stage: str) -> None:
    """A stage that ``up`` starts with none of its processes running begins its
    counts anew: the stats files of its earlier processes (kept since their exit, so
    that totals stay right across restarts and scaling) belong to the last session."""
    infos = _processes_of(server, chain, stage)
    if any(i["statename"] in RUNNING_STATES | {"STARTING"} for i in infos):
        return
    folder = topology.run_dir / "stats"
    for path in folder.glob(f"{glob.escape(stage)}.*.json") if folder.is_dir() else []:
        if path.name.removesuffix(".json").removesuffix(".past")[len(stage) + 1 :].isdigit():
            with contextlib.suppress(OSError):
                path.unlink()


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


def _ready(topology: Topology, stage: str, worker: int, pid: int) -> bool:
    """Has process ``pid`` of this worker said it is ready (in its stats file)?"""
    from arroyo.runtime.stats import stats_path

    try:
        stats = json.loads(stats_path(topology, stage, worker).read_text())
    except (OSError, ValueError):
        return False
    return bool(stats.get("ready")) and stats.get("pid") == pid


def _failure(topology: Topology, name: str, info: dict[str, Any]) -> str:
    stage = split_process_name(info["name"])[0]
    state = info["statename"]
    if state in {"FATAL", "BACKOFF"} and info.get("description"):
        state += f": {info['description']}"  # supervisord's reason (spawnerr)
    elif info.get("exitstatus"):
        state += f", exit status {info['exitstatus']}"
    tail = log_tail(topology, info["name"])
    return f"stage {stage} ({name}) failed to start ({state}):\n{tail}"


def _wait_running(topology: Topology, server: Any, names: list[str], timeout: float) -> list[str]:
    """Wait until every process of ``names`` is RUNNING and ready; stop and report
    those that fail (FATAL, EXITED, BACKOFF) or are not ready within ``timeout``."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    problems = []
    while pending:
        infos = {f"{i['group']}:{i['name']}": i for i in server.supervisor.getAllProcessInfo()}
        for name in list(pending):
            info = infos.get(name)
            if info is None:  # removed meanwhile (scale): nothing to wait for
                pending.remove(name)
                continue
            stage, worker = split_process_name(info["name"])
            if info["statename"] == "RUNNING" and _ready(topology, stage, worker, info["pid"]):
                pending.remove(name)
            elif info["statename"] in {"FATAL", "EXITED", "BACKOFF"}:
                problems.append(_failure(topology, name, info))
                with contextlib.suppress(xmlrpc.client.Fault):
                    server.supervisor.stopProcess(name, False)
                pending.remove(name)
        if time.monotonic() > deadline:
            problems += [
                f"{n}: not ready after {timeout:.0f}s ({infos[n]['statename']}):\n"
                f"{log_tail(topology, n.split(':', 1)[1])}"
                for n in pending
            ]
            break
        if pending:
            time.sleep(0.1)
    return problems


def down(topology: Topology, chains: tuple[str, ...] = (), timeout: float = 120.0) -> list[Stray]:
    """Stop chains sources first, each program drained before the next; shut
    supervisord down once nothing is running; stop the chains' stage processes that
    run outside supervisord. Returns those strays.

    Safe to repeat, and to run while ``scale`` adds or removes workers: a worker that
    vanishes counts as stopped, and one added meanwhile is stopped by another pass."""
    targets = chains_to_act_on(topology, chains)
    if is_running(topology):
        server = rpc(topology)
        for _ in range(DOWN_PASSES):
            for chain in targets:
                for level in _levels(topology, chain):
                    _stop_stages(server, chain, level, timeout)
            if not _live_names(server, targets):
                break
        if not _live_names(server, None):
            _shutdown(topology, server)
    else:
        _wait_gone(_live_supervisord(topology), timeout=30)  # one already shutting down
    for chain in targets:
        forget_live(topology.run_dir, list(topology.chains[chain]))  # `arroyo set`'s
    found = [s for s in strays(topology) if topology.stages[s.stage].chain in targets]
    stop_strays(found, timeout)
    return found


def _live_names(server: Any, chains: list[str] | None) -> set[str]:
    """``group:name`` of every process of ``chains`` (None: all) not yet stopped."""
    return {
        f"{i['group']}:{i['name']}"
        for i in server.supervisor.getAllProcessInfo()
        if i["statename"] not in STOPPED_STATES and (chains is None or i["group"] in chains)
    }


def _levels(topology: Topology, chain: str) -> list[list[str]]:
    """The chain's stages in stop order (sources first), those of one priority together:
    stages at one depth of the graph do not feed each other, so they drain side by
    side instead of one after the other (a viewer and a sink, say)."""
    levels: dict[int, list[str]] = {}
    for stage in _by_priority(topology, chain, reverse=True):
        levels.setdefault(topology.stages[stage].supervision.priority, []).append(stage)
    return list(levels.values())


def _stop_stages(server: Any, chain: str, stages: list[str], timeout: float) -> None:
    infos = [
        i
        for stage in stages
        for i in _processes_of(server, chain, stage)
        if i["statename"] not in STOPPED_STATES
    ]
    names = {f"{chain}:{i['name']}" for i in infos}
    for name in names:
        with contextlib.suppress(xmlrpc.client.Fault):  # stopped, or removed by scale
            server.supervisor.stopProcess(name, False)
    _thaw([i["pid"] for i in infos if i["pid"]])
    deadline = time.monotonic() + timeout
    while names and time.monotonic() < deadline:
        time.sleep(0.1)
        names &= _live_names(server, [chain])


def _thaw(pids: list[int]) -> None:
    """Let a SIGSTOPped process run: it cannot act on the SIGTERM it was just sent, and
    would wait for supervisord's SIGKILL at ``stopwaitsecs`` instead of draining."""
    import psutil

    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_STOPPED:
                proc.resume()


def _live_supervisord(topology: Topology) -> int | None:
    """The pid in supervisord.pid if that process still is this run_dir's supervisord
    (the file outlives a killed supervisord, and its pid may be reused)."""
    import psutil

    pid = supervisord_pid(topology)
    if pid is None:
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return None
    return pid if str(paths(topology).conf) in cmdline else None


def _wait_gone(pid: int | None, timeout: float) -> None:
    if pid is None:
        return
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout)


def status_rows(topology: Topology, cpu: CpuMeter | None = None) -> list[dict[str, Any]]:
    """One row per process of the topology, supervised or not (``arroyo.control.status``;
    ``cpu``: the CPU meter of a reader that refreshes)."""
    infos = rpc(topology).supervisor.getAllProcessInfo() if is_running(topology) else []
    return rows_of(topology, infos, supervisord_pid(topology) if infos else None, cpu)


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
        _remove_worker(server, chain, process_name(stage, index), timeout)
    return old, count


def _remove_worker(server: Any, chain: str, name: str, timeout: float) -> None:
    """Stop one worker, wait until it has drained and exited, and forget it. It may
    already be stopping (``down`` runs too) or gone (another ``scale``)."""
    with contextlib.suppress(xmlrpc.client.Fault):  # stopping or stopped already
        server.supervisor.stopProcess(f"{chain}:{name}", True)
    deadline = time.monotonic() + timeout
    while f"{chain}:{name}" in _live_names(server, [chain]) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        server.arroyo.removeWorker(chain, name)
    except xmlrpc.client.Fault as e:
        if e.faultCode != Faults.BAD_NAME:
            raise
