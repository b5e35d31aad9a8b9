"""Topology INI files: parse, validate, and resolve into frozen dataclasses.

``load(path)`` returns a ``Topology`` or raises ``TopologyError`` listing *every*
problem found, each one line naming the file and section (and key and value where
there is one). See docs/topology.md for the format.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib
import inspect
import os
import re
import sys
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arroyo import convert
from arroyo.errors import TopologyError
from arroyo.stage import Listener, Operator, PassThrough, Publisher

Role = Literal["listener", "operator", "publisher"]
Pattern = Literal["push", "pub"]

ROLE_BASES: dict[str, type] = {"listener": Listener, "operator": Operator, "publisher": Publisher}
TOPOLOGY_KEYS = {"name", "run_dir", "stopwaitsecs"}
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
    "priority",
    "stopwaitsecs",
    "startsecs",
    "autorestart",
    "environment",
}
SECTION_KINDS = ("topology", "chain", "stage")
# Kernels limit a unix socket path (sun_path) to 108 bytes including the NUL.
MAX_IPC_PATH = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INPUT_RE = re.compile(r"^\s*([^\s(]+)\s*(?:\(([^)]*)\))?\s*$")


@dataclass(frozen=True)
class Link:
    """A directed edge: ``source`` stage sends to ``target`` stage over ``endpoint``.

    ``binder`` names the side that binds (the single-process side); the other side's
    workers connect.
    """

    source: str
    target: str
    pattern: Pattern
    endpoint: str
    binder: Literal["source", "target"]

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


@dataclass(frozen=True)
class Supervision:
    """Per-stage supervisord settings."""

    priority: int
    stopwaitsecs: int = 30
    startsecs: int = 1
    autorestart: str = "unexpected"
    environment: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StageSpec:
    name: str
    role: Role
    class_path: str
    options: dict[str, Any]
    inputs: tuple[str, ...]
    workers: int
    scalable: bool
    chain: str
    supervision: Supervision
    on_error: Literal["continue", "stop"] = "continue"
    hwm: int = 1000
    hwm_bytes: int = 256 << 20
    max_message_bytes: int = -1
    drain_timeout: float = 20.0
    device: bool = False  # a forwarding stage Arroyo inserted between two scaled stages

    def load_class(self) -> type:
        return import_class(self.class_path)


@dataclass(frozen=True)
class Topology:
    path: Path
    name: str
    run_dir: Path
    socket_dir: Path
    chains: dict[str, tuple[str, ...]]
    stages: dict[str, StageSpec]
    links: tuple[Link, ...]
    stopwaitsecs: int = 30

    def inputs_of(self, stage: str) -> list[Link]:
        return [link for link in self.links if link.target == stage]

    def outputs_of(self, stage: str) -> list[Link]:
        return [link for link in self.links if link.source == stage]

    def stage(self, name: str) -> StageSpec:
        try:
            return self.stages[name]
        except KeyError:
            known = ", ".join(self.stages)
            msg = f"{self.path}: no stage {name!r} (stages: {known})"
            raise TopologyError([msg]) from None


# -- loading -------------------------------------------------------------------------


class _Problems:
    """Collects problems, each prefixed with the file and section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(
        self, section: str, text: str, key: str | None = None, value: str | None = None
    ) -> None:
        where = f"{self.path}: [{section}]"
        if key is not None:
            where += f" {key}"
            if value is not None:
                where += f" = {value!r}"
        self.items.append(f"{where}: {text}")


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,
        empty_lines_in_values=False,
        # No [DEFAULT] magic: its keys would leak into every section. "" can never be a
        # section header, so a [DEFAULT] section is reported as an unknown section.
        default_section="",
    )
    if not path.is_file():
        msg = f"{path}: no such topology file"
        raise TopologyError([msg])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        msg = f"{path}: [topology] not a valid INI file: not UTF-8 text (byte {e.start})"
        raise TopologyError([msg]) from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as e:
        msg = f"{path}: [{e.section}] duplicate section (line {e.lineno}): merge the two"
        raise TopologyError([msg]) from None
    except configparser.DuplicateOptionError as e:
        msg = f"{path}: [{e.section}] {e.option}: duplicate key (line {e.lineno})"
        raise TopologyError([msg]) from None
    except configparser.MissingSectionHeaderError as e:
        msg = (
            f"{path}: [topology] not a valid INI file: line {e.lineno} comes before any "
            f"[section] header: {e.line.strip()!r}"
        )
        raise TopologyError([msg]) from None
    except configparser.ParsingError as e:
        lines = text.splitlines()
        msgs = [
            f"{path}: [{_section_at(lines, lineno)}] not a valid INI line {lineno}: "
            f"{lines[lineno - 1].strip()!r} (expected key = value)"
            for lineno, _ in e.errors
        ]
        raise TopologyError(msgs) from None
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        msg = f"{path}: [topology] not a valid INI file: {first}"
        raise TopologyError([msg]) from None
    return parser


def _section_at(lines: list[str], lineno: int) -> str:
    """The section header in force at 1-based ``lineno`` (``topology`` before any)."""
    for line in reversed(lines[: lineno - 1]):
        m = configparser.ConfigParser.SECTCRE.match(line.strip())
        if m:
            return m.group("header")
    return "topology"


def import_class(path: str) -> type:
    """``module:Class`` -> the class; ``ImportError``/``AttributeError`` with a clear text."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        msg = "expected module:Class"
        raise ImportError(msg)
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        msg = f"{path} is not a class"
        raise ImportError(msg)
    return obj


def class_options(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The ``__init__`` parameters of a stage class, their hints, and whether it takes **kwargs."""
    init = cls.__init__  # type: ignore[misc]
    if init is object.__init__:
        return {}, {}, False
    params = dict(inspect.signature(init).parameters)
    params.pop("self", None)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable forward references: treat as strings
        hints = {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    params = {
        n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return params, hints, var_kw


def convert_options(cls: type, raw: dict[str, str], report: Any) -> dict[str, Any]:
    """Convert raw INI options by ``cls.__init__`` annotations; ``report(key, value, text)``."""
    params, hints, var_kw = class_options(cls)
    options: dict[str, Any] = {}
    for key, value in raw.items():
        param = params.get(key)
        if param is None:
            if var_kw:
                options[key] = value
            else:
                names = ", ".join(params) or "none"
                report(key, value, f"unknown key (options of {cls.__name__}: {names})")
            continue
        annotation = hints.get(key, str)
        try:
            options[key] = convert.converter_for(annotation)(value)
        except TypeError as e:
            report(key, value, str(e))
        except ValueError as e:
            report(key, value, f"{e} ({convert.describe(annotation)})")
    for name, param in params.items():
        if param.default is inspect.Parameter.empty and name not in raw:
            report(name, None, f"missing option required by {cls.__name__}")
    return options


def _sections(
    parser: configparser.ConfigParser, problems: _Problems
) -> Iterator[tuple[str, str, str]]:
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind not in SECTION_KINDS or (kind == "topology") != (name == ""):
            problems.add(
                section, "unknown section (expected [topology], [chain:NAME] or [stage:NAME])"
            )
            continue
        if name and not NAME_RE.match(name):
            problems.add(section, "names use letters, digits, '_', '.' and '-' only")
            continue
        yield section, kind, name


def _parse_inputs(
    section: str, text: str, problems: _Problems
) -> list[tuple[str, Pattern, str | None]]:
    inputs: list[tuple[str, Pattern, str | None]] = []
    for item in _split_inputs(text):
        m = INPUT_RE.match(item)
        if not m:
            problems.add(section, "expected NAME or NAME (pub|push [ENDPOINT])", "input", item)
            continue
        name, opts = m.group(1), (m.group(2) or "").split()
        pattern: Pattern = "push"
        endpoint = None
        for opt in opts:
            if opt in ("push", "pub"):
                pattern = opt  # type: ignore[assignment]
            elif "://" in opt:
                endpoint = opt
            else:
                problems.add(
                    section,
                    f"unknown link option {opt!r} (push, pub or an endpoint)",
                    "input",
                    item,
                )
        inputs.append((name, pattern, endpoint))
    return inputs


def _split_inputs(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]


@dataclass
class _Draft:
    """A stage as read, before links are resolved."""

    name: str
    section: str
    role: Role
    class_path: str
    options: dict[str, Any]
    inputs: list[tuple[str, Pattern, str | None]]
    workers: int
    scalable: bool
    settings: dict[str, Any] = field(default_factory=dict)
    device: bool = False


_SETTING_CONVERTERS: dict[str, convert.Converter] = {
    "on_error": lambda t: convert._literal(("continue", "stop"))(t),
    "hwm": convert.positive_int,
    "hwm_bytes": convert.positive_int,
    "max_message_bytes": convert.integer,
    "drain_timeout": convert.non_negative,
    "priority": convert.integer,
    "stopwaitsecs": convert.positive_int,
    "startsecs": convert.non_negative_int,
    "autorestart": lambda t: convert._literal(("true", "false", "unexpected"))(t.lower()),
    "environment": lambda t: _environment(t),
}


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
    section: str, name: str, values: dict[str, str], problems: _Problems
) -> _Draft | None:
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
        workers = convert.positive_int(values.get("workers", "1"))
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
    inputs = _parse_inputs(section, values.get("input", ""), problems)
    if role == "listener" and inputs:
        bad("input", values["input"], "a listener takes no input from other stages")
    if role in ("operator", "publisher") and not values.get("input", "").strip():
        bad("input", None, f"missing: every {role} needs at least one input stage")
    if not role or not class_path:
        return None
    return _Draft(name, section, role, class_path, options, inputs, workers, scalable, settings)  # type: ignore[arg-type]


def _find_cycle(drafts: dict[str, _Draft]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        stack.append(name)
        for up, _, _ in drafts[name].inputs:
            if up not in drafts or up == name:  # a self-loop is reported on its own
                continue
            if state.get(up) == 1:
                return [*stack[stack.index(up) :], up]
            if up not in state and (found := visit(up)):
                return found
        stack.pop()
        state[name] = 2
        return None

    for name in drafts:
        if name not in state and (found := visit(name)):
            return found
    return None


def socket_dir_for(run_dir: Path) -> Path:
    """Where ipc sockets go: ``run_dir/sock`` unless that path is too deep for the
    kernel's unix socket limit; then a short per-run_dir folder under the temp dir."""
    preferred = run_dir / "sock"
    if len(str(preferred)) + 24 <= MAX_IPC_PATH:
        return preferred
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"arroyo-{os.getuid()}" / digest


def _endpoint(socket_dir: Path, source: str, target: str) -> str:
    name = f"{source}.{target}"
    if len(name) > 20:
        name = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"ipc://{socket_dir}/{name}.sk"


def _levels(drafts: dict[str, _Draft]) -> dict[str, int]:
    """Longest distance from each stage to a sink (sinks are 0): sinks start first."""
    downstream: dict[str, list[str]] = {n: [] for n in drafts}
    for name, d in drafts.items():
        for up, _, _ in d.inputs:
            if up in downstream:
                downstream[up].append(name)
    memo: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in memo:
            memo[name] = 1 + max((level(d) for d in downstream[name]), default=-1)
        return memo[name]

    return {n: level(n) for n in drafts}


def load(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology file; ``TopologyError`` lists every problem."""
    path = Path(path).absolute()
    problems = _Problems(path)
    parser = _read_ini(path)
    base_dir = path.parent
    if str(base_dir) not in sys.path:
        # Users' own stage modules live next to their topology file.
        sys.path.insert(0, str(base_dir))

    topo_values: dict[str, str] = {}
    chain_values: dict[str, tuple[str, dict[str, str]]] = {}
    drafts: dict[str, _Draft] = {}
    declared: set[str] = set()  # every [stage:NAME], also those too broken to draft
    for section, kind, name in _sections(parser, problems):
        values = dict(parser.items(section))
        known = {"topology": TOPOLOGY_KEYS, "chain": CHAIN_KEYS}.get(kind)
        if known is not None:
            for key in values:
                if key not in known:
                    problems.add(section, f"unknown key (expected {', '.join(sorted(known))})", key)
        if kind == "topology":
            topo_values = values
        elif kind == "chain":
            chain_values[name] = (section, values)
        else:
            declared.add(name)
            draft = _read_stage(section, name, values, problems)
            if draft is not None:
                drafts[name] = draft

    if not parser.has_section("topology"):
        problems.add("topology", "missing section (it gives at least the topology's name)")
    name = topo_values.get("name", path.stem).strip() or path.stem
    run_dir = (base_dir / topo_values.get("run_dir", f".arroyo/{name}").strip()).resolve()
    stopwaitsecs = 30
    if "stopwaitsecs" in topo_values:
        try:
            stopwaitsecs = convert.positive_int(topo_values["stopwaitsecs"])
        except ValueError as e:
            problems.add("topology", str(e), "stopwaitsecs", topo_values["stopwaitsecs"])
    if not parser.sections() or not [s for s in parser.sections() if s.startswith("stage:")]:
        problems.add("topology", "no [stage:NAME] sections: a topology needs at least one stage")

    chains = _resolve_chains(name, chain_values, drafts, declared, problems)
    _check_inputs(drafts, declared, problems)
    cycle = _find_cycle(drafts)
    if cycle:
        problems.add(drafts[cycle[0]].section, "cycle: " + " -> ".join(reversed(cycle)), "input")
    if problems.items:
        raise TopologyError(problems.items)

    socket_dir = socket_dir_for(run_dir)
    stages, links = _resolve_links(drafts, chains, socket_dir, stopwaitsecs, problems)
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
    )


def _resolve_chains(
    topo_name: str,
    chain_values: dict[str, tuple[str, dict[str, str]]],
    drafts: dict[str, _Draft],
    declared: set[str],
    problems: _Problems,
) -> dict[str, str]:
    """Map each stage to its chain; a topology without chains is one chain."""
    if not chain_values:
        return {s: topo_name for s in drafts}
    owner: dict[str, str] = {}
    for chain, (section, values) in chain_values.items():
        members = convert.split_list(values.get("stages", ""))
        if not members:
            problems.add(section, "missing or empty (list the chain's stages)", "stages")
        for member in members:
            if member in owner:
                problems.add(
                    section, f"stage {member!r} is already in chain {owner[member]!r}", "stages"
                )
            elif member not in drafts:
                if member not in declared:  # a declared but broken stage is reported already
                    problems.add(
                        section, f"unknown stage {member!r}", "stages", values.get("stages")
                    )
            else:
                owner[member] = chain
    for name, draft in drafts.items():
        if name not in owner:
            problems.add(
                draft.section, "stage is in no [chain:NAME] (list it in one chain's stages)"
            )
    return owner


def _check_inputs(drafts: dict[str, _Draft], declared: set[str], problems: _Problems) -> None:
    for draft in drafts.values():
        seen: set[str] = set()
        for up, pattern, _ in draft.inputs:
            if up not in drafts:
                if up not in declared:  # a declared but broken stage is reported already
                    problems.add(draft.section, f"unknown stage {up!r}", "input")
            elif up == draft.name:
                problems.add(draft.section, "a stage cannot take its own output", "input")
            elif drafts[up].role == "publisher":
                problems.add(
                    draft.section, f"{up!r} is a publisher: it has no output to take", "input"
                )
            if up in seen:
                problems.add(draft.section, f"stage {up!r} is named twice", "input")
            seen.add(up)
            if pattern == "pub" and draft.scalable:
                problems.add(
                    draft.section,
                    f"a PUB/SUB input ({up} (pub)) cannot feed a scalable stage: every worker "
                    "would see every message; set workers = 1 and scalable = false",
                    "input",
                )


def _resolve_links(
    drafts: dict[str, _Draft],
    chains: dict[str, str],
    socket_dir: Path,
    stopwaitsecs: int,
    problems: _Problems,
) -> tuple[dict[str, StageSpec], list[Link]]:
    """Choose binding sides and endpoints; insert a forwarding device between two
    scalable stages."""
    drafts = dict(drafts)
    edges: list[tuple[str, str, Pattern, str | None]] = []
    for draft in list(drafts.values()):
        new_inputs = []
        for up, pattern, endpoint in draft.inputs:
            if drafts[up].scalable and draft.scalable:
                device = f"{up}__{draft.name}"
                if device in drafts:
                    problems.add(
                        draft.section,
                        f"the forwarding device between {up} and {draft.name} needs the name "
                        f"{device!r}, which a stage already has: rename that stage",
                        "input",
                    )
                drafts[device] = _Draft(
                    device,
                    draft.section,
                    "operator",
                    _class_path(PassThrough),
                    {},
                    [(up, "push", None)],
                    1,
                    False,
                    device=True,
                )
                chains[device] = chains[draft.name]
                edges.append((up, device, "push", None))
                up = device
            new_inputs.append((up, pattern, endpoint))
            edges.append((up, draft.name, pattern, endpoint))
        draft.inputs = new_inputs
    levels = _levels(drafts)
    links: list[Link] = []
    used: dict[str, str] = {}
    for up, down, pattern, endpoint in edges:
        binder: Literal["source", "target"] = "target" if not drafts[down].scalable else "source"
        ep = endpoint or _endpoint(socket_dir, up, down)
        if ep.startswith("ipc://") and len(ep) - len("ipc://") > MAX_IPC_PATH:
            problems.add(
                drafts[down].section, f"ipc path longer than {MAX_IPC_PATH} bytes", "input", ep
            )
        if ep in used:
            problems.add(
                drafts[down].section, f"endpoint already used by link {used[ep]}", "input", ep
            )
        used[ep] = f"{up}->{down}"
        links.append(Link(up, down, pattern, ep, binder))
    stages = {
        name: _spec(d, chains[name], levels[name], stopwaitsecs) for name, d in drafts.items()
    }
    return stages, links


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _spec(d: _Draft, chain: str, level: int, stopwaitsecs: int) -> StageSpec:
    s = d.settings
    supervision = Supervision(
        priority=s.get("priority", 100 + 10 * level),
        stopwaitsecs=s.get("stopwaitsecs", stopwaitsecs),
        startsecs=s.get("startsecs", 1),
        autorestart=s.get("autorestart", "unexpected"),
        environment=s.get("environment", ()),
    )
    return StageSpec(
        name=d.name,
        role=d.role,
        class_path=d.class_path,
        options=d.options,
        inputs=tuple(up for up, _, _ in d.inputs),
        workers=d.workers,
        scalable=d.scalable,
        chain=chain,
        supervision=supervision,
        on_error=s.get("on_error", "continue"),
        hwm=s.get("hwm", 1000),
        hwm_bytes=s.get("hwm_bytes", 256 << 20),
        max_message_bytes=s.get("max_message_bytes", -1),
        drain_timeout=s.get("drain_timeout", 20.0),
        device=d.device,
    )


def describe(topology: Topology) -> str:
    """Human-readable summary for ``arroyo check``."""
    lines = [f"topology {topology.name} ({topology.path})", f"  run_dir {topology.run_dir}"]
    for chain, members in topology.chains.items():
        lines.append(f"  chain {chain}:")
        for name in members:
            s = topology.stages[name]
            extra = " scalable" if s.scalable else ""
            extra += " (forwarding device)" if s.device else ""
            lines.append(f"    {name:<20} {s.role:<9} workers={s.workers}{extra}  {s.class_path}")
    lines.append("  links:")
    for link in topology.links:
        binder = link.source if link.binder == "source" else link.target
        lines.append(f"    {link.name:<30} {link.pattern:<4} {link.endpoint}  (bound by {binder})")
    return "\n".join(lines)
