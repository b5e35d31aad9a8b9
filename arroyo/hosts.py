"""Several hosts in one topology: the ``[hosts]`` section, where each stage may run,
and the tcp endpoints of the links that cross hosts (DESIGN §14, docs/multihost.md).

``place(...)`` runs after the graph is resolved (binding sides, devices, endpoints as
on one host). It pins or restricts every stage to declared hosts, turns each link
that may cross hosts into ``tcp://ADDRESS:PORT`` on the binder's host (ports taken in
order from ``port_range`` unless the link gives its own), marks tcp links CURVE when
``security = curve``, and reports every problem: an unknown host, a binder that is not
pinned, ipc across hosts, a port used twice on one host.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from arroyo import convert
from arroyo.ini import NAME_RE, Problems
from arroyo.spec import HostLost, Link, Security, StageSpec

HOST_KEYS = {"host", "hosts", "on_host_lost"}
MULTIHOST_TOPOLOGY_KEYS = {"security", "keys", "peer_timeout", "port_range", "supervisor_port"}
# Below 32768, where Linux hands out no ephemeral ports (its default range is
# 32768-60999): a listening port inside that range can be taken for a moment by any
# outgoing connection of the host (Supvisors' own calls), and the stage that binds
# it then fails to start.
DEFAULT_PORT_RANGE = (29100, 29899)
DEFAULT_SUPERVISOR_PORT = 29000
LOCAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
HOST_LOST = ("restart", "leave", "stop_chain")
_TCP_RE = re.compile(r"^tcp://([^:/]+|\[[^\]]+\]):(\d+)$")


@dataclass(frozen=True)
class Net:
    """The topology-wide network settings read from ``[topology]`` and ``[hosts]``."""

    hosts: dict[str, str]
    security: Security = "none"
    keys_dir: Path | None = None
    peer_timeout: float = 3.0
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    supervisor_port: int = 0


def _address(text: str) -> str:
    text = text.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", text):
        msg = "expected an IP address or a host name"
        raise ValueError(msg)
    return text


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        lo = hi = 0
    if not sep or not 1024 <= lo <= hi <= 65535:
        msg = "expected LOW-HIGH, two ports between 1024 and 65535"
        raise ValueError(msg)
    return lo, hi


def read_net(
    topo: dict[str, str],
    hosts_section: dict[str, str] | None,
    base_dir: Path,
    name: str,
    problems: Problems,
) -> Net:
    """``[hosts]`` (name = address) and the multi-host keys of ``[topology]``."""
    hosts: dict[str, str] = {}
    for host, text in (hosts_section or {}).items():
        if not NAME_RE.match(host):
            problems.add("hosts", "host names use letters, digits, '_', '.' and '-' only", host)
            continue
        try:
            hosts[host] = _address(text)
        except ValueError as e:
            problems.add("hosts", str(e), host, text)
    if hosts_section is not None and not hosts_section:
        problems.add("hosts", "empty: name each host as NAME = ADDRESS")
    seen: dict[str, str] = {}
    for host, address in hosts.items():
        if address in seen:
            problems.add("hosts", f"address already given to host {seen[address]!r}", host, address)
        seen[address] = host

    def setting(key: str, conv: convert.Converter, default: object) -> object:
        if key not in topo:
            return default
        try:
            return conv(topo[key])
        except ValueError as e:
            problems.add("topology", str(e), key, topo[key])
            return default

    security = setting("security", convert._literal(("none", "curve")), "none")
    keys = str(setting("keys", str, f"{name}-keys")).strip()
    timeout = float(setting("peer_timeout", convert.non_negative, 3.0))  # type: ignore[arg-type]
    if not 0.3 <= timeout <= 120:
        text = topo["peer_timeout"]
        problems.add("topology", "expected 0.3 to 120 seconds", "peer_timeout", text)
    ports = setting("port_range", _port_range, DEFAULT_PORT_RANGE)
    sup_port = setting("supervisor_port", convert.positive_int, DEFAULT_SUPERVISOR_PORT)
    return Net(
        hosts=hosts,
        security=security,  # type: ignore[arg-type]
        keys_dir=(base_dir / keys).resolve(),
        peer_timeout=timeout,
        port_range=ports,  # type: ignore[arg-type]
        supervisor_port=int(sup_port) if hosts else 0,  # type: ignore[call-overload]
    )


def read_placement(values: dict[str, str], section: str, problems: Problems) -> dict[str, Any]:
    """The ``host``/``hosts``/``on_host_lost`` keys of one ``[stage:NAME]``."""
    out: dict[str, Any] = {}
    if "host" in values and "hosts" in values:
        problems.add(section, "give host (one) or hosts (a set), not both", "host")
    if "host" in values:
        out["hosts"] = (values["host"].strip(),)
    elif "hosts" in values:
        out["hosts"] = tuple(convert.split_list(values["hosts"]))
        if not out["hosts"]:
            problems.add(section, "empty (name one or more [hosts])", "hosts")
    if "on_host_lost" in values:
        text = values["on_host_lost"].strip()
        if text in HOST_LOST:
            out["on_host_lost"] = text
        else:
            problems.add(section, f"expected {', '.join(HOST_LOST)}", "on_host_lost", text)
    return out


def _possible(spec: StageSpec, net: Net) -> tuple[str, ...]:
    return spec.hosts or tuple(net.hosts)


def _device_hosts(
    spec: StageSpec, stages: dict[str, StageSpec], links: list[Link], net: Net
) -> tuple[str, ...]:
    """A forwarding device binds both its links: it runs on one host, its upstream's
    when that is pinned, else the first host its downstream may use."""
    up = next(link.source for link in links if link.target == spec.name)
    down = next(link.target for link in links if link.source == spec.name)
    if stages[up].pinned:
        return (stages[up].pinned,)
    return _possible(stages[down], net)[:1]


def _check_hosts(
    stages: dict[str, StageSpec], sections: dict[str, str], net: Net, problems: Problems
) -> None:
    for name, spec in stages.items():
        for host in spec.hosts:
            if host not in net.hosts:
                known = ", ".join(net.hosts) or "none: add a [hosts] section"
                problems.add(
                    sections[name], f"unknown host {host!r} (hosts: {known})", "host", host
                )


def _binder(link: Link) -> str:
    return link.source if link.binder == "source" else link.target


def _crosses(link: Link, stages: dict[str, StageSpec], net: Net) -> bool:
    """True unless both ends can only ever run on one and the same host."""
    ends = set(_possible(stages[link.source], net)) | set(_possible(stages[link.target], net))
    return len(ends) > 1


def _explicit_tcp(endpoint: str, binder_host: str, net: Net) -> tuple[str, int] | None:
    m = _TCP_RE.match(endpoint)
    if not m:
        return None
    where, port = m.group(1), int(m.group(2))
    by_address = {a: h for h, a in net.hosts.items()}
    host = where if where in net.hosts else by_address.get(where, binder_host)
    return host, port


def place(
    stages: dict[str, StageSpec],
    links: list[Link],
    placement: dict[str, dict[str, Any]],
    explicit: set[str],
    sections: dict[str, str],
    net: Net,
    problems: Problems,
) -> tuple[dict[str, StageSpec], list[Link]]:
    """Stages with their hosts, links with their cross-host endpoints (see module doc)."""
    placed: dict[str, StageSpec] = {}
    for name, spec in stages.items():
        opts = placement.get(name, {})
        hosts: tuple[str, ...] = tuple(opts.get("hosts", ()))
        lost: HostLost = opts.get("on_host_lost", "restart")
        placed[name] = replace(spec, hosts=hosts, on_host_lost=lost)
    if not net.hosts:
        for name, spec in placed.items():
            if spec.hosts:
                text = "no [hosts] section declares it"
                problems.add(sections[name], text, "host", spec.hosts[0])
        return placed, [replace(link, curve=_curve(link, net)) for link in links]
    for name, spec in placed.items():
        if spec.device:
            placed[name] = replace(spec, hosts=_device_hosts(spec, placed, links, net))
    _check_hosts(placed, sections, net, problems)
    used: dict[tuple[str, int], str] = {}
    out: list[Link] = []
    pending: list[tuple[int, Link, str]] = []
    for i, link in enumerate(links):
        binder = placed[_binder(link)]
        section = sections[link.target]
        if not _crosses(link, placed, net):
            out.append(link)
            continue
        if link.endpoint in explicit and link.endpoint.startswith("ipc://"):
            problems.add(
                section,
                f"link {link.name} crosses hosts: give it a tcp:// endpoint (or none)",
                "input",
                link.endpoint,
            )
        if binder.pinned and binder.pinned not in net.hosts:
            out.append(link)  # reported as an unknown host
            continue
        if not binder.pinned:
            problems.add(
                sections[binder.name],
                f"binds link {link.name}, which crosses hosts: pin it (host = NAME)",
                "hosts" if binder.hosts else "host",
            )
            out.append(link)
            continue
        if link.endpoint in explicit:
            tcp = _explicit_tcp(link.endpoint, binder.pinned, net)
            if tcp is not None:
                _claim(used, tcp, link.name, section, problems)
            out.append(link)
            continue
        out.append(link)
        pending.append((i, link, binder.pinned))
    claimed = {(h, p) for h, p in used} | {(h, net.supervisor_port) for h in net.hosts}
    next_port = dict.fromkeys(net.hosts, net.port_range[0])
    for i, link, host in pending:
        port = next_port[host]
        while (host, port) in claimed:
            port += 1
        if port > net.port_range[1]:
            problems.add(sections[link.target], "port_range is exhausted on host " + host)
            continue
        claimed.add((host, port))
        next_port[host] = port + 1
        out[i] = replace(link, endpoint=f"tcp://{net.hosts[host]}:{port}")
    for (host, port), name in used.items():
        if port == net.supervisor_port:
            problems.add(
                sections[name.split("->")[1]],
                f"port {port} on host {host} is the supervisor_port (link {name})",
                "input",
            )
    return placed, [replace(link, curve=_curve(link, net)) for link in out]


def _claim(
    used: dict[tuple[str, int], str],
    key: tuple[str, int],
    link: str,
    section: str,
    problems: Problems,
) -> None:
    if key in used:
        problems.add(
            section,
            f"port {key[1]} on host {key[0]} is already used by link {used[key]}",
            "input",
        )
    used[key] = link


def _curve(link: Link, net: Net) -> bool:
    return net.security == "curve" and link.endpoint.startswith("tcp://")


def bound_ports(
    topology_hosts: dict[str, str], supervisor_port: int, links: Any, host: str
) -> list[int]:
    """The tcp ports ``host`` listens on: its supervisord's and those of the links it binds."""
    address = topology_hosts[host]
    ports = [supervisor_port]
    for link in links:
        m = _TCP_RE.match(link.endpoint)
        if m and m.group(1).strip("[]") == address:
            ports.append(int(m.group(2)))
    return sorted(set(ports))


def ephemeral_clashes(
    ports: list[int], range_file: Path = LOCAL_PORT_RANGE
) -> tuple[list[int], str]:
    """Those of ``ports`` inside this machine's ephemeral port range, and that range as
    text ("" where it cannot be read: not Linux)."""
    try:
        low, high = (int(x) for x in range_file.read_text().split())
    except (OSError, ValueError):
        return [], ""
    return [p for p in ports if low <= p <= high], f"{low}-{high}"
