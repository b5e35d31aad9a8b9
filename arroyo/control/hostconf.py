"""A multi-host topology's supervisord.conf per host and its Supvisors rules file.

Each host runs one supervisord with the Supvisors rpcinterface (docs/multihost.md).
Every host's config has the same ``supvisors_list``, strategies, credentials and rules,
an ``[inet_http_server]`` bound to that host's declared address only, and the programs
of the stages allowed on that host. Each chain is a Supvisors application, placed by
the rules file: a stage's workers may run on its ``host``/``hosts``; sinks start first
and sources stop first; ``on_host_lost`` is the running failure strategy.

Conciliation is SENICIDE: after a partition heals, the older of two copies of a worker
is stopped. The older copy is the one that was cut off: its peers already counted it
dead and closed its share of the run, and the newer copy is the one they work with.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from arroyo.control.render import (
    FINGERPRINT,
    _program,
    fingerprint,
    supervisor_socket,
    worker_count,
)
from arroyo.errors import ConfigError
from arroyo.spec import Topology

USER = "arroyo"
SECRET_FILE = "supervisor.secret"
RUNNING_FAILURE = {
    "restart": "RESTART_PROCESS",
    "leave": "CONTINUE",
    "stop_chain": "STOP_APPLICATION",
}
EXPECTED_LOADING = 10  # per worker: LESS_LOADED then spreads a stage's workers over hosts


@dataclass(frozen=True)
class HostPaths:
    conf: Path
    socket: Path
    pidfile: Path
    logs: Path
    rules: Path


def host_paths(topology: Topology, host: str) -> HostPaths:
    base = topology.run_dir / "hosts" / host
    sock = supervisor_socket(topology, f"sv-{host}.sock")
    return HostPaths(
        conf=base / "supervisord.conf",
        socket=sock,
        pidfile=base / "supervisord.pid",
        logs=base / "logs",
        rules=base / "rules.xml",
    )


def credentials(topology: Topology, create: bool = True) -> tuple[str, str]:
    """(user, password) of every host's inet server, kept 0600 in the keys folder (copy
    that folder to every host, like the CURVE keys)."""
    keys_dir = topology.keys_dir or topology.path.parent
    path = keys_dir / SECRET_FILE
    try:
        user, _, password = path.read_text().strip().partition(":")
        if user and password:
            return user, password
    except OSError:
        pass
    if not create:
        msg = f"{path}: no supervisor credentials (run `arroyo keys` or `arroyo render`)"
        raise ConfigError(msg)
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{USER}:{password}\n")
    return USER, password


def supvisors_list(topology: Topology) -> str:
    port = topology.supervisor_port
    return ",".join(f"<{h}>{a}:{port}" for h, a in topology.hosts.items())


def stages_on(topology: Topology, host: str) -> list[str]:
    return [n for n, s in topology.stages.items() if not s.hosts or host in s.hosts]


def _sequences(topology: Topology, chain: str) -> dict[str, int]:
    """Rank of each stage by supervisor priority, 1 = lowest (sinks): the start order;
    Supvisors stops the greatest rank first, so the same rank stops sources first."""
    prios = sorted({topology.stages[s].supervision.priority for s in topology.chains[chain]})
    rank = {p: i + 1 for i, p in enumerate(prios)}
    return {s: rank[topology.stages[s].supervision.priority] for s in topology.chains[chain]}


def rules_xml(topology: Topology) -> str:
    lines = [
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>',
        f"<!-- rendered by arroyo from {topology.path}: edit the topology, not this file -->",
        "<root>",
    ]
    for chain, members in topology.chains.items():
        seq = _sequences(topology, chain)
        lines += [
            f"  <application name={quoteattr(chain)}>",
            "    <start_sequence>0</start_sequence>",  # started by `arroyo up`, not at boot
            "    <starting_failure_strategy>CONTINUE</starting_failure_strategy>",
            "    <programs>",
        ]
        for stage in members:
            spec = topology.stages[stage]
            where = ",".join(spec.hosts) or "*"
            lines += [
                f"      <program pattern={quoteattr(f'^{stage}_[0-9]+$')}>",
                f"        <identifiers>{where}</identifiers>",
                f"        <start_sequence>{seq[stage]}</start_sequence>",
                f"        <stop_sequence>{seq[stage]}</stop_sequence>",
                f"        <expected_loading>{EXPECTED_LOADING}</expected_loading>",
                "        <running_failure_strategy>"
                f"{RUNNING_FAILURE[spec.on_host_lost]}</running_failure_strategy>",
                "      </program>",
            ]
        lines += ["    </programs>", "  </application>"]
    lines.append("</root>")
    return "\n".join(lines) + "\n"


def render_host(topology: Topology, host: str) -> str:
    """The supervisord.conf of one host."""
    if host not in topology.hosts:
        known = ", ".join(topology.hosts)
        msg = f"{topology.path}: no host {host!r} in [hosts] ({known})"
        raise ConfigError(msg)
    p = host_paths(topology, host)
    user, password = credentials(topology)
    mapping = ",".join(f"{h}={a}" for h, a in topology.hosts.items())
    parts = [
        f"; rendered by arroyo from {topology.path} ({FINGERPRINT} {fingerprint(topology)})"
        f" for host {host}; edit the topology, not this file",
        "[unix_http_server]",
        f"file = {p.socket}",
        "chmod = 0700",
        "",
        "[inet_http_server]",
        f"port = {topology.hosts[host]}:{topology.supervisor_port}",
        f"username = {user}",
        f"password = {password}",
        "",
        "[supervisord]",
        f"logfile = {p.logs}/supervisord.log",
        f"pidfile = {p.pidfile}",
        f"childlogdir = {p.logs}",
        f"identifier = {host}",
        f"directory = {topology.path.parent}",
        f'environment = ARROYO_HOST="{host}"',
        "nodaemon = false",
        "silent = true",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[rpcinterface:supvisors]",
        "supervisor.rpcinterface_factory = arroyo.control.supvisors_plugin:make_rpcinterface",
        f"arroyo_hosts = {mapping}",
        f"supvisors_list = {supvisors_list(topology)}",
        f"rules_files = {p.rules}",
        "starting_strategy = LESS_LOADED",
        "conciliation_strategy = SENICIDE",
        "synchro_options = STRICT,TIMEOUT",
        "synchro_timeout = 15",
        "inactivity_ticks = 2",
        "stats_enabled = false",
        f"logfile = {p.logs}/supvisors.log",
        "",
        "[ctlplugin:supvisors]",
        "supervisor.ctl_factory = supvisors.supvisorsctl:make_supvisors_controller_plugin",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{p.socket}",
        "",
    ]
    here = set(stages_on(topology, host))
    for chain, members in topology.chains.items():
        local = [m for m in members if m in here]
        if local:
            parts.append(f"[group:{chain}]\nprograms = {','.join(local)}\n")
    for name in topology.stages:
        if name in here:
            parts.append(_program(topology, topology.stages[name], p.logs))
    return "\n".join(parts)


def write_host_configs(topology: Topology, only: str | None = None) -> list[Path]:
    """Every host's supervisord.conf (or just ``only``'s) and the rules file beside it."""
    written = []
    for host in [only] if only else list(topology.hosts):
        p = host_paths(topology, host)
        text = render_host(topology, host)
        try:
            for d in (p.conf.parent, p.logs, p.socket.parent, topology.socket_dir):
                d.mkdir(parents=True, exist_ok=True)
            p.rules.write_text(rules_xml(topology))
            fd = os.open(p.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(p.conf, 0o600)
        except OSError as e:
            msg = f"{topology.path}: [topology] run_dir = {topology.run_dir}: not writable ({e})"
            raise ConfigError(msg) from e
        written.append(p.conf)
    return written


__all__ = ["credentials", "host_paths", "rules_xml", "worker_count", "write_host_configs"]
