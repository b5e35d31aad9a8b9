"""The two ends of a link between stage processes (see docs/links.md).

This module holds what both patterns share: identities, control frames, opening a
socket, and ``LinkEnd``; ``credit`` has the PUSH pattern's ends, ``pubsub`` the PUB's.

PUSH-pattern links use ROUTER/DEALER with receiver-granted credit:

* the single-process side binds a ROUTER, the scalable side's workers connect DEALERs;
* a connecting process says HELLO when its connection comes up, the binder answers
  WELCOME; both carry the process identity ``stage/worker/pid@host``;
* the receiver grants a window (messages and bytes); the sender only sends within it,
  and the receiver returns CREDIT as it consumes. A full link therefore blocks the
  sender (backpressure) and nothing queues without bound;
* ``Start`` and ``Stop`` go to every receiver (so every worker sees each run's
  boundaries), events to one receiver with credit (load balancing by readiness);
* a sender that exits says EOS; a receiver that leaves says BYE and drains until the
  sender's ACK (or EOS, when the sender is itself stopping).

PUB-pattern links use XPUB/SUB: the publisher waits (bounded) for the declared
subscriber before a run's Start and counts every message a full link drops.

Control frames start with 0x00, which never begins a wire header (a msgpack map).
"""

from __future__ import annotations

import logging
import os
import socket as pysocket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import psutil
import zmq
from zmq.utils.monitor import recv_monitor_message

from arroyo import wire
from arroyo.runtime.liveness import Reach
from arroyo.runtime.net import Net
from arroyo.runtime.stats import LinkCounters, parse_identity
from arroyo.topology import Link

log = logging.getLogger("arroyo.link")

HELLO, WELCOME, CREDIT, EOS, BYE, ACK = (b"\x00H", b"\x00W", b"\x00C", b"\x00E", b"\x00B", b"\x00A")
# Handshakes a CURVE end refused or failed: a stranger's key (AUTH), a plain client or a
# wrong server key (PROTOCOL: mechanism mismatch, cryptographic error).
REFUSALS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
SUB_PREFIX = b"\x00sub:"
SERVICE_INTERVAL = 0.001  # s: how stale a sender's view of credit and peers may get
# An idle receiver returns credit at most this often. A quarter window goes back at once
# (``consumed``), so a sender always has three quarters of its window while the
# receiver idles: returning every message's credit at once only wakes the sender.
CREDIT_IDLE_DELAY = 0.01  # s
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
# A zero-copy send wraps the buffer in a zmq.Frame and, once libzmq is done with it,
# wakes pyzmq's collector thread, which takes the GIL to release it: ~5 us of CPU a
# frame over ipc, more than copying 64 KiB in the sending thread (one hop at 64 KiB,
# CPU of both processes per message: 49-52 us copied, 56-58 us zero-copy).
COPY_BELOW = 1 << 17
HOST = pysocket.gethostname()


def identity(stage: str, worker: int) -> str:
    return f"{stage}/{worker}/{os.getpid()}@{HOST}"


def peer_host(peer_id: str) -> str:
    """The host part of an identity ``stage/worker/pid@host`` ("" if it has none)."""
    return peer_id.rpartition("@")[2] if "@" in peer_id else ""


def peer_alive(peer_id: str) -> bool:
    """False only when ``peer_id`` names a process on this host that no longer exists."""
    who = parse_identity(peer_id)
    if who is None or who.host != HOST:
        return True
    try:
        return psutil.Process(who.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_control(frame: Any) -> bool:
    if type(frame) is bytes:  # the usual case: ``_recv`` hands the first frame over as bytes
        return frame[:1] == b"\x00"
    data = frame.buffer if hasattr(frame, "buffer") else frame
    return len(data) > 0 and data[0] == 0


def frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def control_payload(rest: list[Any]) -> dict[str, Any] | None:
    """The msgpack map of a control message; None if it is not one (a bad peer)."""
    if not rest:
        return {}
    try:
        payload = msgpack.unpackb(frame_bytes(rest[0]), raw=False, strict_map_key=False)
    except Exception:  # any garbage from the network: counted by the caller
        return None
    return payload if isinstance(payload, dict) else None


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """``send_multipart(frames, flags=NOBLOCK)`` for frames that are known to be buffers
    (ours), without its per-call type checks and flag enums: on the hot path those cost
    more than the send. Frames below ``COPY_BELOW`` bytes are copied, larger ones go
    zero-copy. Only the first frame can fail (EAGAIN, EHOSTUNREACH): the rest of a
    multipart message always follows it."""
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        if type(frame) is np.ndarray:
            frame = _received_frame(frame)  # (a zmq.Frame is sent by reference, never copied)
        send(frame, _NOBLOCK if i == last else _MORE, copy=_nbytes(frame) < COPY_BELOW)


def _nbytes(frame: Any) -> int:
    # len() of bytes or a flat uint8 array is its size; a memoryview's counts items
    return frame.nbytes if type(frame) is memoryview else len(frame)


def _received_frame(frame: Any) -> Any:
    """The received ``zmq.Frame`` that ``frame`` (a flat array from ``wire.encode``) is
    a whole view of, else ``frame``. A stage forwarding what it received (a relay, a
    pass-through, a filter) then re-sends libzmq's own buffer by reference count, as a
    raw relay does, instead of wrapping that memory in a new Frame whose release
    wakes pyzmq's collector thread. The bytes are the same: decoded arrays are
    read-only views of the frame, and only a view of all of it qualifies."""
    if type(frame) is not np.ndarray:
        return frame
    base = frame.base
    while type(base) is np.ndarray:
        base = base.base
    if (
        type(base) is memoryview
        and type(base.obj) is zmq.Frame
        and base.nbytes == frame.nbytes == len(base.obj)  # a slice's obj is the whole Frame
    ):
        return base.obj
    return frame


def _socket_path(endpoint: str) -> None:
    """Make the ipc socket's folder, and refuse a path another process listens on
    (zmq would silently take the path over)."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # nobody there (or a stale file from a killed process): ours to bind
    finally:
        probe.close()
    msg = f"{path} is in use by another process"
    raise zmq.ZMQError(zmq.EADDRINUSE, msg)


def open_socket(
    ctx: zmq.Context[Any],
    kind: int,
    endpoint: str,
    bind: bool,
    name: str,
    routing_id: str = "",
    monitor_events: int = 0,
    options: Mapping[Any, Any] | None = None,
) -> tuple[zmq.Socket[Any], zmq.Socket[Any] | None]:
    """A bound or connected socket, and (if asked) a monitor attached *before* the
    connect so that no CONNECTED event can be missed. ``options`` are set before the
    bind/connect too: zmq copies them into each connection when it is made."""
    sock = ctx.socket(kind)
    sock.linger = 5000
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    if routing_id:
        sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    if kind in (zmq.ROUTER, zmq.DEALER):
        # Credit already bounds what is queued (set before bind/connect: pipes copy the
        # HWM when they are made); a HWM here could only refuse a Start or Stop.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    mon = sock.get_monitor_socket(monitor_events) if monitor_events else None
    try:
        if bind:
            _socket_path(endpoint)
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except (zmq.ZMQError, OSError) as e:
        if mon is not None:
            mon.close(0)
        sock.close(0)
        verb = "bind" if bind else "connect"
        msg = f"link {name}: cannot {verb} {endpoint}: {e}"
        raise OSError(msg) from e
    return sock, mon


@dataclass
class Peer:
    """The far side of a link as one end sees it."""

    id: str
    window_msgs: int = 0
    window_bytes: int = 0
    inflight_msgs: int = 0
    inflight_bytes: int = 0
    away: bool = False  # it said BYE and we acknowledged: send it nothing more
    eos: bool = False  # it said EOS (or ACK): it will send nothing more
    pending_msgs: int = 0  # receiver side: consumed but not yet returned as CREDIT
    pending_bytes: int = 0
    # sender side, since it joined: messages sent to it, and those it returned credit
    # for (consumed there: handled and passed on), for ``arroyo.runtime.handoff``
    sent_msgs: int = 0
    taken_msgs: int = 0

    def has_credit(self, size: int) -> bool:
        if self.away or self.inflight_msgs >= self.window_msgs:
            return False
        return self.inflight_bytes == 0 or self.inflight_bytes + size <= self.window_bytes


class LinkEnd:
    """What both ends share: the socket, the identity, the connection monitor."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        bind: bool,
        kind: int,
        counters: LinkCounters,
        options: Mapping[Any, Any] | None = None,
        net: Net | None = None,
    ) -> None:
        self.link = link
        self.me = me
        self.bind = bind
        self.counters = counters
        routing_id = me if kind == zmq.DEALER else ""
        tcp = link.endpoint.startswith("tcp://")
        # PUSH-pattern ends watch their peers' connections over any transport: a peer
        # on this host can be frozen or hung, which its pid does not tell
        watched = net is not None and kind in (zmq.ROUTER, zmq.DEALER)
        opts = {**(net.options(ctx, link, bind) if net is not None else {}), **(options or {})}
        if watched and net is not None and not tcp:
            opts.update(net.heartbeats())
        if kind == zmq.ROUTER and watched:
            # a peer back after a cut (or a thaw) takes its routing id over from the
            # connection that was closed under it
            opts[zmq.ROUTER_HANDOVER] = 1
        events = 0
        if kind == zmq.DEALER:
            events = int(zmq.EVENT_CONNECTED) | (int(zmq.EVENT_DISCONNECTED) if watched else 0)
        if link.curve:
            events |= int(REFUSALS)
        self.monitor: zmq.Socket[Any] | None
        self.socket, self.monitor = open_socket(
            ctx,
            kind,
            link.endpoint,
            bind,
            link.name,
            routing_id,
            monitor_events=events,
            options=opts,
        )
        if kind == zmq.ROUTER:
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.reach: Reach | None = None
        if watched and net is not None:
            self.reach = Reach(self.socket, kind == zmq.ROUTER, net.peer_timeout)
        self._refusals_logged: set[int] = set()

        self._router = bind and kind == zmq.ROUTER
        self._ids: dict[bytes, str] = {}
        self.peers: dict[str, Peer] = {}
        self.welcomed = bind  # a connector is welcomed once the binder answered its HELLO
        self._hello_at = 0.0

    def sockets(self) -> list[zmq.Socket[Any]]:
        return [s for s in (self.socket, self.monitor) if s is not None]

    def _hello_payload(self, **extra: Any) -> bytes:
        return msgpack.packb({"id": self.me, **extra})

    def _send_control(self, peer: str | None, verb: bytes, payload: bytes | None = None) -> None:
        frames: list[bytes] = [verb] if payload is None else [verb, payload]
        if self.bind and peer is not None:
            frames.insert(0, peer.encode())
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY) or pipe full
            log.debug("link %s: control %r to %s not sent: %s", self.link.name, verb, peer, e)

    def _poll_monitor(self) -> bool:
        """True when a HELLO is due: the connection (re)established since the last
        call, or no WELCOME came back within a second of the last HELLO."""
        if self.monitor is None:
            return False
        now = time.monotonic()
        connected = not self.welcomed and now - self._hello_at > 1.0
        if connected:
            self._hello_at = now
        while True:
            try:
                event = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return connected
            kind = event["event"]
            if kind == zmq.EVENT_CONNECTED:
                connected = True
                self.welcomed = False
                self._hello_at = time.monotonic()
                if self.reach is not None:
                    self.reach.connected()
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.reach is not None:
                    self.reach.disconnected()
            elif kind & REFUSALS:
                self._refused(kind, event["value"])

    def _refused(self, kind: int, value: int) -> None:
        """A CURVE handshake refused (or, connecting, failed): counted; logged once per
        kind of failure (libzmq names no peer address here; the ZAP handler logs the
        address of a refused key)."""
        self.counters.auth_refused += 1
        if kind in self._refusals_logged:
            return
        self._refusals_logged.add(kind)
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = "its key is not one of the topology's"
        elif value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1):
            why = "the peer does not speak CURVE (a plain client)"
        elif value == getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", -1):
            why = "cryptographic error (a wrong server key, or not this topology's keys)"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            why = f"the handshake broke off (errno {value}; a wrong server key?)"
        else:
            why = f"handshake error {value}"
        log.warning(
            "link %s: %s a CURVE handshake: %s (counted as auth_refused; logged once)",
            self.link.name,
            "refused" if self.bind else "failed",
            why,
        )

    def alive(self, peer_id: str) -> bool:
        """The peer is there: its process exists (a pid on this host tells at once), and
        its connection answers libzmq's heartbeats (``liveness.Reach``, on PUSH-pattern
        links), which a frozen or hung process, or a host that is gone, does not.
        Unknown: assumed alive. A process of this host that is not a peer of this link
        (a run's source seen through a fan-in) is judged by its pid alone: it has no
        connection here to watch. A peer found dead is named in the link's stats
        (``gone``) until it says HELLO again: ``arroyo status`` shows it STALLED."""
        if not peer_alive(peer_id):
            ok = False
        elif self.reach is None or (peer_id not in self.peers and peer_host(peer_id) == HOST):
            return True
        else:
            ok = self.reach.alive(peer_id)
        if not ok and peer_id in self.peers:
            self.counters.gone_since(peer_id)
        return ok

    def _recv(self) -> tuple[str, list[Any]] | None:
        """One whole message as (sender id or "", frames), its first frame as bytes."""
        recv = self.socket.recv
        try:
            frame = recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return None
        # (recv_multipart asks the socket for RCVMORE through an enum per frame; the
        # frame knows it, and the whole message is already here)
        frames: list[Any] = [frame]
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            frames.append(frame)
        sender = ""
        if self._router:
            sender = self._sender_id(frames.pop(0).bytes)
        if frames and len(frames[0]) <= wire.MAX_HEADER_BYTES:
            # A header (or control verb) is small and read whole at once: as bytes it
            # costs less to test and unpack than through a memoryview of the frame.
            frames[0] = frames[0].bytes
        return sender, frames

    def _sender_id(self, routing_id: bytes) -> str:
        known = self._ids.get(routing_id)
        if known is None:
            known = routing_id.decode(errors="replace")
            if len(self._ids) < 4096:  # a bound against peers that come and go forever
                self._ids[routing_id] = known
        return known

    def close(self, linger_ms: int = 5000) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(0)
        self.socket.close(linger_ms)
