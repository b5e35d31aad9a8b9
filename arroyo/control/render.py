"""The supervisord.conf of a topology: run_dir paths, process names, worker counts
kept across ``down``/``up``, one program per stage, and the fingerprint that tells a
rendered config from an edited topology. Pure text: nothing here talks to supervisord.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from arroyo.errors import ConfigError
from arroyo.runtime import malloc, threads
from arroyo.topology import MAX_IPC_PATH, StageSpec, Topology


@dataclass(frozen=True)
class Paths:
    conf: Path
    socket: Path
    pidfile: Path
    logs: Path
    workers: Path
    topology: Path  # the topology file as it was rendered (``arroyo.control.rendered``)


def supervisor_socket(topology: Topology, name: str) -> Path:
    """A supervisord's unix socket in the topology's socket folder; refused (one line,
    exit 2) when the path is too long for a unix socket."""
    sock = topology.socket_dir / name
    if len(str(sock)) > MAX_IPC_PATH:
        msg = f"{topology.path}: [topology] run_dir: supervisor socket path too long: {sock}"
        raise ConfigError(msg)
    return sock


CONF = "supervisord.conf"
RENDERED_TOPOLOGY = "rendered-topology.ini"


def paths(topology: Topology) -> Paths:
    run_dir = topology.run_dir
    sock = supervisor_socket(topology, "supervisor.sock")
    return Paths(
        conf=run_dir / CONF,
        socket=sock,
        pidfile=run_dir / "supervisord.pid",
        logs=run_dir / "logs",
        workers=run_dir / "workers.json",
        topology=run_dir / RENDERED_TOPOLOGY,
    )


def process_name(stage: str, worker: int) -> str:
    return f"{stage}_{worker:02d}"


def split_process_name(name: str) -> tuple[str, int]:
    stage, _, worker = name.rpartition("_")
    return stage, int(worker)


def recorded_workers(topology: Topology) -> dict[str, int]:
    path = paths(topology).workers
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if k in topology.stages}


def record_workers(topology: Topology, stage: str, count: int) -> None:
    _write_workers(topology, {**recorded_workers(topology), stage: count})


def forget_workers(topology: Topology, stages: list[str]) -> None:
    """Drop ``stages`` from the recorded counts: the next render uses the INI's."""
    data = {k: v for k, v in recorded_workers(topology).items() if k not in stages}
    if data:
        _write_workers(topology, data)
    else:
        paths(topology).workers.unlink(missing_ok=True)


def _write_workers(topology: Topology, data: dict[str, int]) -> None:
    path = paths(topology).workers
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def worker_count(topology: Topology, stage: str) -> int:
    return recorded_workers(topology).get(stage, topology.stages[stage].workers)


def _stage_command() -> str:
    exe = Path(sys.executable).parent / "arroyo-stage"
    return str(exe) if exe.exists() else shutil.which("arroyo-stage") or "arroyo-stage"


def _program(topology: Topology, spec: StageSpec, logs: Path) -> str:
    sup = spec.supervision
    # the malloc thresholds reach code that runs before the stage sets them itself
    tuned = malloc.ENVIRONMENT if spec.tune_malloc else {}
    # one OpenMP thread per worker unless said otherwise (arroyo.runtime.threads)
    env = {"PYTHONUNBUFFERED": "1", **tuned, **threads.defaults(), **dict(sup.environment)}
    env_text = ",".join(f'{k}="{v}"' for k, v in env.items())
    command = f"{_stage_command()} {topology.path} {spec.name} --worker %(process_num)d"
    return "\n".join(
        [
            f"[program:{spec.name}]",
            f"command = {command}",
            "process_name = %(program_name)s_%(process_num)02d",
            f"numprocs = {worker_count(topology, spec.name)}",
            "numprocs_start = 0",
            f"directory = {topology.path.parent}",
            f"priority = {sup.priority}",
            "autostart = false",
            # true by default: a worker that exits by itself comes back, whatever its
            # code (a user's sys.exit(0) too); one that supervisord stops (down,
            # supervisorctl stop, scale) is not restarted, and exit 2 goes FATAL (rpcext)
            f"autorestart = {sup.autorestart}",
            "exitcodes = 0",
            f"startsecs = {sup.startsecs}",
            "startretries = 3",
            "stopsignal = TERM",
            f"stopwaitsecs = {sup.stopwaitsecs}",
            "stopasgroup = true",
            "killasgroup = true",
            "redirect_stderr = true",
            f"stdout_logfile = {logs}/%(program_name)s_%(process_num)02d.log",
            "stdout_logfile_maxbytes = 20MB",
            "stdout_logfile_backups = 3",
            f"environment = {env_text}",
            "",
        ]
    )


FINGERPRINT = "sha256"


def fingerprint(topology: Topology) -> str:
    """The topology file as it is now, in 16 hex digits (recorded in the rendered config)."""
    try:
        return hashlib.sha256(topology.path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def _first_line(conf: Path) -> tuple[str, str] | None:
    """(topology path, fingerprint) from a rendered config's first line."""
    try:
        with conf.open() as f:
            first = f.readline()
    except OSError:
        return None
    head, found, rest = first.partition(f" ({FINGERPRINT} ")
    _, ours, source = head.partition("; rendered by arroyo from ")
    return (source, rest.split(")", 1)[0]) if found and ours else None


def rendered_fingerprint(topology: Topology) -> str | None:
    """The fingerprint the running config was rendered from (None: not recorded)."""
    found = _first_line(paths(topology).conf)
    return found[1] if found else None


def rendered_source(conf: Path) -> Path | None:
    """The topology file a rendered config ``conf`` was rendered from."""
    found = _first_line(conf)
    return Path(found[0]) if found else None


def render(topology: Topology) -> str:
    """The complete supervisord.conf for ``topology``."""
    p = paths(topology)
    parts = [
        f"; rendered by arroyo from {topology.path} ({FINGERPRINT} {fingerprint(topology)});"
        " edit the topology, not this file",
        "[unix_http_server]",
        f"file = {p.socket}",
        "chmod = 0700",
        "",
        "[supervisord]",
        f"logfile = {p.logs}/supervisord.log",
        f"pidfile = {p.pidfile}",
        f"childlogdir = {p.logs}",
        f"identifier = arroyo-{topology.name}",
        f"directory = {topology.path.parent}",
        "nodaemon = false",
        "silent = true",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[rpcinterface:arroyo]",
        "supervisor.rpcinterface_factory = arroyo.control.rpcext:make_interface",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{p.socket}",
        "",
    ]
    for chain, members in topology.chains.items():
        parts.append(f"[group:{chain}]\nprograms = {','.join(members)}\n")
    for spec in topology.stages.values():
        parts.append(_program(topology, spec, p.logs))
    return "\n".join(parts)


def write_config(topology: Topology, out: Path | None = None) -> Path:
    p = paths(topology)
    target = out or p.conf
    try:
        for d in (target.parent, p.logs, p.socket.parent, topology.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
        target.write_text(render(topology))
        if target == p.conf:  # what runs: ``arroyo status`` and ``down`` fall back on it
            p.topology.write_bytes(topology.path.read_bytes())
    except OSError as e:
        msg = f"{topology.path}: [topology] run_dir = {topology.run_dir}: not writable ({e})"
        raise ConfigError(msg) from e
    return target


# -- control -----------------------------------------------------------------------
