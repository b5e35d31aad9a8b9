"""A stage process's side of tcp links: CURVE keys, the ZAP authenticator, heartbeats.

With ``security = curve`` every tcp link is encrypted and authenticated: a binding end
is a CURVE server with its host's key pair and admits only clients whose public key is
one of the topology's (``KEYS_DIR/HOST.key``, written by ``arroyo keys``); a connecting
end uses its host's key pair and the binder's host's public key. CURVE alone admits any
client key: the allow-list is the ZAP handler here (pyzmq's ``ThreadAuthenticator``,
one thread per process), each bound link under its own ZAP domain (the link's name).

Every tcp link, and every PUSH-pattern link over ipc, also gets libzmq's own heartbeats
(ZMTP PING/PONG, handled by libzmq's I/O thread, so a stage busy in ``process()`` still
answers): a connection that stays silent for ``peer_timeout`` is closed, which is what
``liveness.Reach`` watches. A process that is frozen (SIGSTOP), hung in the kernel or on
a host that is gone answers nothing, and its peers let it go. (A PUB link over ipc gets
none: a subscriber whose queue is full stops reading, so its PONG would wait behind the
data and a slow subscriber would be cut off.)
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import psutil
import zmq

from arroyo.errors import ConfigError
from arroyo.spec import Link, StageSpec, Topology

log = logging.getLogger("arroyo.link")

LOCAL = "local"  # the host name used for keys when a topology declares no [hosts]
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


def key_paths(keys_dir: Path, host: str) -> tuple[Path, Path]:
    """``HOST.key`` (public, may be shared) and ``HOST.key_secret`` (mode 0600)."""
    return keys_dir / f"{host}{PUBLIC_SUFFIX}", keys_dir / f"{host}{SECRET_SUFFIX}"


def read_key_file(path: Path) -> tuple[bytes | None, bytes | None]:
    """(public, secret) Z85 keys from a ZeroMQ certificate file (either may be None)."""
    public = secret = None
    for raw in path.read_bytes().splitlines():
        line = raw.strip()
        key, sep, value = line.partition(b"=")
        if not sep:
            continue
        value = value.strip().strip(b"\"'")
        if key.strip() == b"public-key":
            public = value
        elif key.strip() == b"secret-key":
            secret = value
    return public, secret


def key_hosts(topology: Topology) -> list[str]:
    return list(topology.hosts) or [LOCAL]


def public_keys(topology: Topology) -> dict[str, bytes]:
    """Every host's public key; ConfigError naming what is missing."""
    keys_dir = topology.keys_dir or topology.path.parent
    found: dict[str, bytes] = {}
    missing = []
    for host in key_hosts(topology):
        path = key_paths(keys_dir, host)[0]
        try:
            public, _ = read_key_file(path)
        except OSError:
            public = None
        if public is None or len(public) != 40:
            missing.append(str(path))
        else:
            found[host] = public
    if missing:
        msg = f"security = curve: no public key in {', '.join(missing)} (run `arroyo keys`)"
        raise ConfigError(msg)
    return found


def _local_addresses() -> set[str]:
    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            try:
                found.add(str(ipaddress.ip_address(a.address.split("%")[0])))
            except ValueError:
                continue
    return found


def machine_host(topology: Topology) -> str:
    """The [hosts] entry this machine is: ``ARROYO_HOST`` (set by the rendered per-host
    supervisord.conf), else the host whose declared address is on one of this machine's
    interfaces; "" when neither tells."""
    named = os.environ.get("ARROYO_HOST", "")
    if named in topology.hosts:
        return named
    mine = _local_addresses()
    return next((h for h, a in topology.hosts.items() if a in mine), "")


def this_host(topology: Topology, spec: StageSpec) -> str:
    """The topology host a process of ``spec`` runs on: ``machine_host``, else the
    stage's pinned host; ``local`` in a topology without [hosts]."""
    if not topology.hosts:
        return LOCAL
    return machine_host(topology) or spec.pinned


def binder_host(topology: Topology, link: Link) -> str:
    if not topology.hosts:
        return LOCAL
    binder = link.source if link.binder == "source" else link.target
    return topology.stages[binder].pinned


def _authenticator(ctx: zmq.Context[Any]) -> Any:
    """pyzmq's ZAP thread, with the address of the request being judged at hand, so a
    refusal can be logged once per peer address. (Imported here: zmq.auth.thread pulls
    in asyncio, which a stage without CURVE need not pay for at start-up.)"""
    from zmq.auth.thread import ThreadAuthenticator

    class Authenticator(ThreadAuthenticator):
        address = ""

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
            await super().handle_zap_message(msg)

    return Authenticator(ctx, log=logging.getLogger("arroyo.zap"))


class _AllowList:
    """The CURVE credentials provider: the topology's public keys, nothing else."""

    def __init__(self, allowed: set[bytes], auth: Any) -> None:
        self.allowed = allowed
        self.auth = auth
        self.logged: set[str] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        address = self.auth.address
        if address not in self.logged and len(self.logged) < 1024:
            self.logged.add(address)
            log.warning(
                "link %s: refused a connection from %s: its CURVE key %s is not one of "
                "the topology's (logged once per address)",
                domain,
                address,
                key.decode(errors="replace")[:12] + "...",
            )
        return False


class Net:
    """Per process: which host it is, its keys, the authenticator, the heartbeats."""

    def __init__(self, topology: Topology, host: str) -> None:
        self.topology = topology
        self.host = host
        self.peer_timeout = topology.peer_timeout
        self.curve = topology.security == "curve" and any(k.curve for k in topology.links)
        self.public: bytes | None = None
        self.secret: bytes | None = None
        self.servers: dict[str, bytes] = {}
        self._auth: Any = None
        if self.curve:
            self._load_keys()

    @classmethod
    def for_stage(cls, topology: Topology, spec: StageSpec) -> Net:
        return cls(topology, this_host(topology, spec))

    def _load_keys(self) -> None:
        self.servers = public_keys(self.topology)
        if not self.host:
            msg = (
                "security = curve: cannot tell which [hosts] entry this machine is "
                "(set ARROYO_HOST, pin the stage with host =, or declare a local address)"
            )
            raise ConfigError(msg)
        keys_dir = self.topology.keys_dir or self.topology.path.parent
        path = key_paths(keys_dir, self.host)[1]
        try:
            self.public, self.secret = read_key_file(path)
        except OSError as e:
            msg = f"security = curve: cannot read this host's secret key {path}: {e}"
            raise ConfigError(msg) from e
        if not self.public or not self.secret:
            msg = f"security = curve: {path} holds no key pair (run `arroyo keys`)"
            raise ConfigError(msg)

    def heartbeats(self) -> dict[int, Any]:
        """libzmq's heartbeat options: a PING every third of ``peer_timeout``, and a
        connection that answers nothing for ``peer_timeout`` is closed."""
        ms = max(100, int(self.peer_timeout * 1000))
        return {
            zmq.HEARTBEAT_IVL: max(50, ms // 3),
            zmq.HEARTBEAT_TIMEOUT: ms,
            zmq.HEARTBEAT_TTL: ms,
        }

    def options(self, ctx: zmq.Context[Any], link: Link, bind: bool) -> dict[int, Any]:
        """Socket options for one tcp link end (heartbeats, CURVE), set before its
        bind/connect. Over ipc, ``LinkEnd`` adds the heartbeats where they are safe."""
        if not link.endpoint.startswith("tcp://"):
            return {}
        ms = max(100, int(self.peer_timeout * 1000))
        opts: dict[int, Any] = {
            **self.heartbeats(),
            # a handshake that stalls is dropped and retried after this, not libzmq's 30 s
            zmq.HANDSHAKE_IVL: max(5000, 2 * ms),
        }
        if not link.curve:
            return opts
        assert self.public is not None and self.secret is not None
        opts[zmq.CURVE_PUBLICKEY] = self.public
        opts[zmq.CURVE_SECRETKEY] = self.secret
        if bind:
            opts[zmq.CURVE_SERVER] = 1
            opts[zmq.ZAP_DOMAIN] = link.name.encode()
            self._allow(ctx, link.name)
        else:
            server = self.servers.get(binder_host(self.topology, link))
            if server is None:
                msg = f"link {link.name}: no public key for its binder's host"
                raise ConfigError(msg)
            opts[zmq.CURVE_SERVERKEY] = server
        return opts

    def _allow(self, ctx: zmq.Context[Any], domain: str) -> None:
        if self._auth is None:
            self._auth = _authenticator(ctx)
            self._auth.start()
        provider = _AllowList(set(self.servers.values()), self._auth)
        self._auth.configure_curve_callback(domain=domain, credentials_provider=provider)

    def close(self) -> None:
        """Stop the ZAP thread (before the context is terminated)."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
