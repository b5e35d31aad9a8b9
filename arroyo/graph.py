"""From stages as read to the graph: chains, inputs checked, cycles, binding sides,
endpoints, forwarding devices between two scaled stages, and start order."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arroyo import convert
from arroyo.ini import Problems
from arroyo.options import bound_endpoints, import_class
from arroyo.spec import MAX_IPC_PATH, Link, Pattern, Role, StageSpec, Supervision
from arroyo.stage import PassThrough


@dataclass
class Draft:
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


def find_cycle(drafts: dict[str, Draft]) -> list[str] | None:
    """A cycle of inputs as ``[a, ..., a]`` (each stage takes the next one's output),
    or None. A depth-first walk with its own stack: a chain of thousands of stages
    must not exhaust Python's."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in drafts:
        if start in state:
            continue
        path: list[str] = [start]
        todo = [_ups(drafts, start)]
        state[start] = 1
        while todo:
            up = next(todo[-1], None)
            if up is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(up) == 1:
                return [*path[path.index(up) :], up]
            elif up not in state:
                state[up] = 1
                path.append(up)
                todo.append(_ups(drafts, up))
    return None


def _ups(drafts: dict[str, Draft], name: str) -> Iterator[str]:
    """The stages ``name`` takes input from, leaving out unknown stages and itself
    (both reported on their own)."""
    return (up for up, _, _ in drafts[name].inputs if up in drafts and up != name)


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


def _levels(drafts: dict[str, Draft]) -> dict[str, int]:
    """Longest distance from each stage to a sink (sinks are 0): sinks start first.
    Stages are settled in reverse topological order (Kahn's algorithm from the
    sinks), without recursion. The graph has no cycle (checked before)."""
    downstream: dict[str, list[str]] = {n: [] for n in drafts}
    for name, d in drafts.items():
        for up, _, _ in d.inputs:
            if up in downstream:
                downstream[up].append(name)
    waiting = {n: len(set(targets)) for n, targets in downstream.items()}
    ready = [n for n, count in waiting.items() if count == 0]
    level = dict.fromkeys(ready, 0)
    while ready:
        name = ready.pop()
        for up in {up for up, _, _ in drafts[name].inputs if up in drafts}:
            level[up] = max(level.get(up, 0), level[name] + 1)
            waiting[up] -= 1
            if waiting[up] == 0:
                ready.append(up)
    return level


def resolve_chains(
    topo_name: str,
    chain_values: dict[str, tuple[str, dict[str, str]]],
    drafts: dict[str, Draft],
    declared: set[str],
    problems: Problems,
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


def check_inputs(drafts: dict[str, Draft], declared: set[str], problems: Problems) -> None:
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


def resolve_links(
    drafts: dict[str, Draft],
    chains: dict[str, str],
    socket_dir: Path,
    stopwaitsecs: int,
    problems: Problems,
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
                drafts[device] = Draft(
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


def _spec(d: Draft, chain: str, level: int, stopwaitsecs: int) -> StageSpec:
    s = d.settings
    supervision = Supervision(
        priority=s.get("priority", 100 + 10 * level),
        stopwaitsecs=s.get("stopwaitsecs", stopwaitsecs),
        startsecs=s.get("startsecs", 1),
        autorestart=s.get("autorestart", "true"),
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
        tune_malloc=s.get("tune_malloc", True),
        device=d.device,
    )


_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}


def _same_endpoint(a: str, b: str) -> bool:
    """Whether binding ``a`` and ``b`` would collide: the same string, or tcp on one
    port where the hosts match or either is a wildcard (which binds every address)."""
    if a == b:
        return True
    if not (a.startswith("tcp://") and b.startswith("tcp://")):
        return False
    host_a, _, port_a = a[len("tcp://") :].rpartition(":")
    host_b, _, port_b = b[len("tcp://") :].rpartition(":")
    if port_a != port_b or port_a in ("", "0", "*"):
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS


def check_bound_endpoints(drafts: dict[str, Draft], links: list[Link], problems: Problems) -> None:
    """No two binders on one endpoint: stage options marked ``Binds`` against each
    other and against the links' endpoints; nor a bound option on a stage whose
    several workers would each try to bind it."""
    taken: list[tuple[str, str]] = [
        (link.endpoint, f"link {link.name}") for link in links if "://" in link.endpoint
    ]
    for draft in drafts.values():
        try:
            cls = import_class(draft.class_path)
        except Exception:  # reported where the class was read
            continue
        for key, endpoint in bound_endpoints(cls, draft.options):
            if draft.workers > 1:
                problems.add(
                    draft.section,
                    f"{draft.workers} workers would each bind this endpoint: use workers = 1",
                    key,
                    endpoint,
                )
            for other, owner in taken:
                if _same_endpoint(endpoint, other):
                    problems.add(draft.section, f"endpoint already bound by {owner}", key, endpoint)
                    break
            taken.append((endpoint, f"stage {draft.name} ({key})"))
