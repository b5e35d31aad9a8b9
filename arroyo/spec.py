"""The resolved topology: frozen dataclasses every wing reads (see ``topology.load``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arroyo.errors import TopologyError
from arroyo.options import import_class

Role = Literal["listener", "operator", "publisher"]
Pattern = Literal["push", "pub"]
Security = Literal["none", "curve"]
# What Supvisors does with a stage whose host is lost (rules running_failure_strategy).
HostLost = Literal["restart", "leave", "stop_chain"]
# Kernels limit a unix socket path (sun_path) to 108 bytes including the NUL.
MAX_IPC_PATH = 100


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
    curve: bool = False  # CURVE-encrypted, peers admitted by the topology's public keys

    @property
    def name(self) -> str:
        return f"{self.source}->{self.target}"


@dataclass(frozen=True)
class Supervision:
    """Per-stage supervisord settings."""

    priority: int
    stopwaitsecs: int = 30
    startsecs: int = 1
    autorestart: str = "true"  # a worker that exits, with any code, comes back
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
    tune_malloc: bool = True  # fixed glibc malloc thresholds (arroyo.runtime.malloc)
    device: bool = False  # a forwarding stage Arroyo inserted between two scaled stages
    hosts: tuple[str, ...] = ()  # where its workers may run ([hosts] names); () = anywhere
    on_host_lost: HostLost = "restart"

    @property
    def pinned(self) -> str:
        """The one host this stage runs on, or "" when it may run on several."""
        return self.hosts[0] if len(self.hosts) == 1 else ""

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
    hosts: dict[str, str] = field(default_factory=dict)  # [hosts]: name -> address
    security: Security = "none"
    keys_dir: Path | None = None  # where ``arroyo keys`` puts the hosts' CURVE keys
    peer_timeout: float = 3.0  # s: a silent remote peer is dead after this long
    supervisor_port: int = 0  # multi-host: every host's supervisord inet port

    @property
    def multihost(self) -> bool:
        return bool(self.hosts)

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
