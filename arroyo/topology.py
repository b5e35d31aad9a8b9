"""Topology INI files: parse, validate, and resolve into frozen dataclasses.

``load(path)`` returns a ``Topology`` or raises ``TopologyError`` listing *every*
problem found, each one line naming the file and section (and key and value where
there is one). See docs/topology.md for the format.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path
from typing import Any

from arroyo import convert
from arroyo.errors import TopologyError
from arroyo.graph import (
    Draft,
    check_bound_endpoints,
    check_inputs,
    find_cycle,
    resolve_chains,
    resolve_links,
    socket_dir_for,
)
from arroyo.hosts import HOST_KEYS, MULTIHOST_TOPOLOGY_KEYS, place, read_net, read_placement
from arroyo.ini import Problems, parse_inputs, read_ini, sections
from arroyo.options import class_options, convert_options, import_class
from arroyo.spec import MAX_IPC_PATH, Link, Pattern, Role, StageSpec, Supervision, Topology
from arroyo.stage import Listener, Operator, Publisher

__all__ = [
    "MAX_IPC_PATH",
    "MAX_WORKERS",
    "Link",
    "Pattern",
    "Role",
    "StageSpec",
    "Supervision",
    "Topology",
    "class_options",
    "convert_options",
    "describe",
    "import_class",
    "load",
    "run_dir_hint",
    "socket_dir_for",
    "worker_count",
]

ROLE_BASES: dict[str, type] = {"listener": Listener, "operator": Operator, "publisher": Publisher}
# More processes than this on one host is a typo, not a plan: rendering and starting
# them would hang ``up`` for minutes. docs/topology.md gives the number.
MAX_WORKERS = 256
TOPOLOGY_KEYS = {"name", "run_dir", "stopwaitsecs", *MULTIHOST_TOPOLOGY_KEYS}
CHAIN_KEYS = {"stages"}
# Keys of a [stage:NAME] section that Arroyo reads itself; every other key is a class option.
STAGE_KEYS = {
    "role",
    "class",
    "input",
    "workers",
    "scalable",
    "on_error",
    "hwm",
    "hwm_bytes",
    "max_message_bytes",
    "drain_timeout",
    "tune_malloc",
    "priority",
    "stopwaitsecs",
    "startsecs",
    "autorestart",
    "environment",
    *HOST_KEYS,
}


_SETTING_CONVERTERS: dict[str, convert.Converter] = {
    "on_error": lambda t: convert._literal(("continue", "stop"))(t),
    "hwm": convert.positive_int,
    "hwm_bytes": convert.positive_int,
    "max_message_bytes": convert.integer,
    "drain_timeout": convert.non_negative,
    "tune_malloc": convert.boolean,
    "priority": convert.integer,
    "stopwaitsecs": convert.positive_int,
    "startsecs": convert.non_negative_int,
    "autorestart": lambda t: convert._literal(("true", "false", "unexpected"))(t.lower()),
    "environment": lambda t: _environment(t),
}


def worker_count(text: str) -> int:
    """A stage's number of worker processes: 1 to ``MAX_WORKERS``."""
    workers = convert.positive_int(text)
    if workers > MAX_WORKERS:
        msg = f"expected at most {MAX_WORKERS} workers (processes on one host)"
        raise ValueError(msg)
    return workers


def _environment(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in convert.split_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            msg = "expected KEY=value pairs separated by commas"
            raise ValueError(msg)
        pairs.append((key, value))
    return tuple(pairs)


def _read_stage(
    section: str, name: str, values: dict[str, str], problems: Problems
) -> Draft | None:
    def bad(key: str, value: str | None, text: str) -> None:
        problems.add(section, text, key, value)

    role = values.get("role", "").strip()
    class_path = values.get("class", "").strip()
    if not role:
        bad("role", None, "missing (listener, operator or publisher)")
    elif role not in ROLE_BASES:
        bad("role", role, "expected listener, operator or publisher")
        role = ""
    if not class_path:
        bad("class", None, "missing (module:Class)")
    raw_options = {k: v for k, v in values.items() if k not in STAGE_KEYS}
    options: dict[str, Any] = {}
    if class_path:
        try:
            cls = import_class(class_path)
        except Exception as e:
            bad("class", class_path, f"cannot import: {type(e).__name__}: {e}")
        else:
            base = ROLE_BASES.get(role)
            if base is not None and not issubclass(cls, base):
                bad(
                    "class",
                    class_path,
                    f"is not a subclass of {base.__name__} (required for role {role})",
                )
            options = convert_options(cls, raw_options, bad)
    try:
        workers = worker_count(values.get("workers", "1"))
    except ValueError as e:
        bad("workers", values["workers"], str(e))
        workers = 1
    settings: dict[str, Any] = {}
    for key, conv in _SETTING_CONVERTERS.items():
        if key in values:
            try:
                settings[key] = conv(values[key])
            except ValueError as e:
                bad(key, values[key], str(e))
    scalable = role == "operator" or workers > 1
    if "scalable" in values:
        try:
            scalable = convert.boolean(values["scalable"]) or workers > 1
        except ValueError as e:
            bad("scalable", values["scalable"], str(e))
    inputs = parse_inputs(section, values.get("input", ""), problems)
    if role == "listener" and inputs:
        bad("input", values["input"], "a listener takes no input from other stages")
    if role in ("operator", "publisher") and not values.get("input", "").strip():
        bad("input", None, f"missing: every {role} needs at least one input stage")
    if not role or not class_path:
        return None
    return Draft(name, section, role, class_path, options, inputs, workers, scalable, settings)  # type: ignore[arg-type]


def load(path: str | os.PathLike[str], text: str | None = None) -> Topology:
    """Read and validate a topology file (or ``text`` as that file, e.g. the copy
    ``arroyo up`` keeps); ``TopologyError`` lists every problem."""
    path = Path(path).absolute()
    problems = Problems(path)
    parser = read_ini(path, text)
    base_dir = path.parent
    if str(base_dir) not in sys.path:
        # Users' own stage modules live next to their topology file.
        sys.path.insert(0, str(base_dir))

    topo_values: dict[str, str] = {}
    chain_values: dict[str, tuple[str, dict[str, str]]] = {}
    drafts: dict[str, Draft] = {}
    declared: set[str] = set()  # every [stage:NAME], also those too broken to draft
    hosts_values: dict[str, str] | None = None
    placement: dict[str, dict[str, Any]] = {}
    for section, kind, name in sections(parser, problems):
        values = dict(parser.items(section))
        known = {"topology": TOPOLOGY_KEYS, "chain": CHAIN_KEYS}.get(kind)
        if known is not None:
            for key in values:
                if key not in known:
                    problems.add(section, f"unknown key (expected {', '.join(sorted(known))})", key)
        if kind == "topology":
            topo_values = values
        elif kind == "hosts":
            hosts_values = values
        elif kind == "chain":
            chain_values[name] = (section, values)
        else:
            declared.add(name)
            draft = _read_stage(section, name, values, problems)
            placement[name] = read_placement(values, section, problems)
            if draft is not None:
                drafts[name] = draft

    if not parser.has_section("topology"):
        problems.add("topology", "missing section (it gives at least the topology's name)")
    name, run_dir = _name_and_run_dir(path, topo_values)
    stopwaitsecs = 30
    if "stopwaitsecs" in topo_values:
        try:
            stopwaitsecs = convert.positive_int(topo_values["stopwaitsecs"])
        except ValueError as e:
            problems.add("topology", str(e), "stopwaitsecs", topo_values["stopwaitsecs"])
    net = read_net(topo_values, hosts_values, base_dir, name, problems)
    if not parser.sections() or not [s for s in parser.sections() if s.startswith("stage:")]:
        problems.add("topology", "no [stage:NAME] sections: a topology needs at least one stage")

    chains = resolve_chains(name, chain_values, drafts, declared, problems)
    check_inputs(drafts, declared, problems)
    cycle = find_cycle(drafts)
    if cycle:
        problems.add(drafts[cycle[0]].section, "cycle: " + " -> ".join(reversed(cycle)), "input")
    if problems.items:
        raise TopologyError(problems.items)

    socket_dir = socket_dir_for(run_dir)
    explicit = {ep for d in drafts.values() for _, _, ep in d.inputs if ep}
    stages, links = resolve_links(drafts, chains, socket_dir, stopwaitsecs, problems)
    where = {n: f"stage:{n}" for n in stages}
    for link in links:  # a device is reported under the stage it feeds
        if stages[link.source].device:
            where[link.source] = f"stage:{link.target}"
    stages, links = place(stages, links, placement, explicit, where, net, problems)
    check_bound_endpoints(drafts, links, problems)
    if problems.items:
        raise TopologyError(problems.items)
    chain_map: dict[str, list[str]] = {}
    for stage in stages.values():
        chain_map.setdefault(stage.chain, []).append(stage.name)
    return Topology(
        path=path,
        name=name,
        run_dir=run_dir,
        socket_dir=socket_dir,
        chains={c: tuple(s) for c, s in chain_map.items()},
        stages=stages,
        links=tuple(links),
        stopwaitsecs=stopwaitsecs,
        hosts=net.hosts,
        security=net.security,
        keys_dir=net.keys_dir,
        peer_timeout=net.peer_timeout,
        supervisor_port=net.supervisor_port,
    )


def _name_and_run_dir(path: Path, values: dict[str, str]) -> tuple[str, Path]:
    name = values.get("name", path.stem).strip() or path.stem
    return name, (path.parent / values.get("run_dir", f".arroyo/{name}").strip()).resolve()


def run_dir_hint(path: str | os.PathLike[str]) -> Path | None:
    """The run_dir of the topology file at ``path`` as far as it can be read from its
    ``[topology]`` section, however broken the rest; None when that cannot be read. For
    a topology that no longer loads: ``arroyo status`` finds what ``up`` started there."""
    path = Path(path).absolute()
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), strict=False, default_section=""
    )
    try:
        parser.read_string(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, configparser.MissingSectionHeaderError):
        return None
    except configparser.Error:
        pass  # the lines around a bad one are read all the same
    values = dict(parser.items("topology")) if parser.has_section("topology") else {}
    return _name_and_run_dir(path, values)[1]


def describe(topology: Topology) -> str:
    """Human-readable summary for ``arroyo check``."""
    lines = [f"topology {topology.name} ({topology.path})", f"  run_dir {topology.run_dir}"]
    if topology.hosts:
        lines.append("  hosts:")
        lines += [f"    {h:<20} {a}" for h, a in topology.hosts.items()]
    for chain, members in topology.chains.items():
        lines.append(f"  chain {chain}:")
        for name in members:
            s = topology.stages[name]
            extra = " scalable" if s.scalable else ""
            extra += " (forwarding device)" if s.device else ""
            extra += f" hosts={','.join(s.hosts)}" if s.hosts else ""
            lines.append(f"    {name:<20} {s.role:<9} workers={s.workers}{extra}  {s.class_path}")
    lines.append("  links:")
    for link in topology.links:
        binder = link.source if link.binder == "source" else link.target
        curve = " curve" if link.curve else ""
        lines.append(
            f"    {link.name:<30} {link.pattern:<4} {link.endpoint}  (bound by {binder}){curve}"
        )
    return "\n".join(lines)
