"""The two ends of a link between stage processes (see docs/links.md).

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

import contextlib
import logging
import os
import socket as pysocket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import psutil
import zmq
from zmq.utils.monitor import recv_monitor_message

from arroyo import wire
from arroyo.message import Event, Message, Start, Stop
from arroyo.stats import LinkCounters
from arroyo.topology import Link

log = logging.getLogger("arroyo.link")

HELLO, WELCOME, CREDIT, EOS, BYE, ACK = (b"\x00H", b"\x00W", b"\x00C", b"\x00E", b"\x00B", b"\x00A")
SUB_PREFIX = b"\x00sub:"
SERVICE_INTERVAL = 0.001  # s: how stale a sender's view of credit and peers may get
# An idle receiver returns credit at most this often. A quarter window goes back at once
# (``consumed``), so a sender always has three quarters of its window while the
# receiver idles: returning every message's credit at once only wakes the sender.
CREDIT_IDLE_DELAY = 0.01  # s
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
HOST = pysocket.gethostname()


def identity(stage: str, worker: int) -> str:
    return f"{stage}/{worker}/{os.getpid()}@{HOST}"


def peer_alive(peer_id: str) -> bool:
    """False only when ``peer_id`` names a process on this host that no longer exists."""
    try:
        rest, host = peer_id.rsplit("@", 1)
        pid = int(rest.rsplit("/", 1)[1])
    except (ValueError, IndexError):
        return True
    if host != HOST:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_control(frame: Any) -> bool:
    if type(frame) is bytes:  # the usual case: ``_recv`` hands the first frame over as bytes
        return frame[:1] == b"\x00"
    data = frame.buffer if hasattr(frame, "buffer") else frame
    return len(data) > 0 and data[0] == 0


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _control_payload(rest: list[Any]) -> dict[str, Any] | None:
    """The msgpack map of a control message; None if it is not one (a bad peer)."""
    if not rest:
        return {}
    try:
        payload = msgpack.unpackb(_bytes(rest[0]), raw=False, strict_map_key=False)
    except Exception:  # any garbage from the network: counted by the caller
        return None
    return payload if isinstance(payload, dict) else None


def _send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """``send_multipart(frames, copy=False, flags=NOBLOCK)`` for frames that are known to
    be buffers (ours), without its per-call type checks and flag enums: on the hot path
    those cost more than the send. Only the first frame can fail (EAGAIN, EHOSTUNREACH):
    the rest of a multipart message always follows it."""
    send = sock.send
    for frame in frames[:-1]:
        send(frame, _MORE, copy=False)
    send(frames[-1], _NOBLOCK, copy=False)


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
    monitor: bool = False,
    options: Mapping[Any, int] | None = None,
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
    mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED) if monitor else None
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
        options: Mapping[Any, int] | None = None,
    ) -> None:
        self.link = link
        self.me = me
        self.bind = bind
        self.counters = counters
        routing_id = me if kind == zmq.DEALER else ""
        self.monitor: zmq.Socket[Any] | None
        self.socket, self.monitor = open_socket(
            ctx,
            kind,
            link.endpoint,
            bind,
            link.name,
            routing_id,
            monitor=kind == zmq.DEALER,
            options=options,
        )
        if kind == zmq.ROUTER:
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)

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
            if event["event"] == zmq.EVENT_CONNECTED:
                connected = True
                self.welcomed = False
                self._hello_at = time.monotonic()

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


class CreditSender(LinkEnd):
    """Sending end of a PUSH-pattern link."""

    def __init__(self, ctx: zmq.Context[Any], link: Link, me: str, counters: LinkCounters) -> None:
        bind = link.binder == "source"
        super().__init__(ctx, link, me, bind, zmq.ROUTER if bind else zmq.DEALER, counters)
        self.stopping = False  # while stopping, a BYE is not acknowledged: our EOS follows
        self.current_start: Message | None = None
        self.run_members: dict[tuple[str, int], set[str]] = {}  # who got each open run's Start
        self._serviced_at = 0.0
        self._checked_at = 0.0
        self._rr = 0

    # -- control ---------------------------------------------------------------------

    def service(self) -> None:
        """Handle every pending control message (HELLO, CREDIT, BYE) without blocking."""
        if self._poll_monitor():
            self._send_control(None, HELLO, self._hello_payload())
        while (item := self._recv()) is not None:
            peer_id, frames = item
            payload = _control_payload(frames[1:])
            if payload is None or not _is_control(frames[0]):
                self.counters.drop("bad_control")
                continue
            self._control(peer_id, _bytes(frames[0]), payload)
        now = time.monotonic()
        if self.bind and now - self._checked_at > 0.5:
            # a pid lookup per peer costs microseconds: not on every message
            self._checked_at = now
            self._forget_dead()

    def _control(self, peer_id: str, verb: bytes, payload: dict[str, Any]) -> None:
        key = peer_id if self.bind else str(payload.get("id") or next(iter(self.peers), ""))
        if verb in (HELLO, WELCOME):
            self.welcomed = True
            if verb == HELLO:
                self._send_control(peer_id, WELCOME, self._hello_payload())
            known = self.peers.get(key)
            if known is not None:
                # the same process saying hello again (a retried HELLO): keep its state
                known.window_msgs = payload.get("wm", known.window_msgs)
                known.window_bytes = payload.get("wb", known.window_bytes)
                known.away = False
                return
            self.peers = {k: p for k, p in self.peers.items() if self.bind or k == key}
            self.peers[key] = Peer(key, payload.get("wm", 0), payload.get("wb", 0))
            if self.current_start is not None:
                # A worker that joins mid-run (or a receiver that restarted) needs the
                # run's Start before its events; a duplicate is dropped downstream.
                start = self.current_start
                if self._send_to(key, start, wire.encode(start)):
                    run_key = (str(start.routing.get("o", "")), start.run)
                    self.run_members.setdefault(run_key, set()).add(key)
            log.info("link %s: receiver %s joined", self.link.name, key)
        elif verb == CREDIT and key in self.peers:
            peer = self.peers[key]
            peer.inflight_msgs = max(0, peer.inflight_msgs - payload.get("m", 0))
            peer.inflight_bytes = max(0, peer.inflight_bytes - payload.get("b", 0))
        elif verb == BYE and key in self.peers:
            if self.stopping:
                return  # we are draining too: keep feeding it, our EOS will follow
            self.peers[key].away = True
            self._send_control(peer_id, ACK)
            log.info("link %s: receiver %s left", self.link.name, key)

    def _forget_dead(self) -> None:
        for key in [k for k in self.peers if not peer_alive(k)]:
            log.warning("link %s: receiver %s is gone", self.link.name, key)
            del self.peers[key]

    # -- data ------------------------------------------------------------------------

    def _live(self) -> list[Peer]:
        return [p for p in self.peers.values() if not p.away]

    def _send_to(self, key: str, message: Message, frames: list[Any]) -> bool:
        out = [key.encode(), *frames] if self.bind else frames
        try:
            _send_frames(self.socket, out)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self.peers.pop(key, None)
                return False
            if e.errno == zmq.EAGAIN:
                return False
            raise
        return True

    def wait(self, timeout_ms: int, alive: Callable[[], bool]) -> None:
        """Block until a control message arrives (or timeout), then service it."""
        poller = zmq.Poller()
        for s in self.sockets():
            poller.register(s, zmq.POLLIN)
        if alive():
            poller.poll(timeout_ms)
        self.service()

    def send(self, message: Message, give_up: Callable[[], bool]) -> bool:
        """Send one message; blocks while no receiver has credit. False if dropped
        because ``give_up()`` said so while waiting."""
        frames = wire.encode(message)
        size = wire.frames_nbytes(frames)
        if isinstance(message, Event):
            # Reading control costs two failed non-blocking receives: for events, at
            # most once per SERVICE_INTERVAL (a sender out of credit services while it
            # waits anyway).
            now = time.monotonic()
            if now - self._serviced_at >= SERVICE_INTERVAL:
                self._serviced_at = now
                self.service()
            return self._send_event(message, frames, size, give_up)
        self.service()
        return self._broadcast(message, frames, size, give_up)

    def _send_event(
        self, message: Event, frames: list[Any], size: int, give_up: Callable[[], bool]
    ) -> bool:
        while True:
            live = self._live()
            n = len(live)
            for i in range(n):
                peer = live[(self._rr + i) % n]
                if peer.has_credit(size) and self._send_to(peer.id, message, frames):
                    self._rr = (self._rr + i + 1) % max(n, 1)
                    peer.inflight_msgs += 1
                    peer.inflight_bytes += size
                    self.counters.count(size, True)
                    return True
            if give_up():
                return False
            self.wait(100, lambda: True)

    def _broadcast(
        self, message: Message, frames: list[Any], size: int, give_up: Callable[[], bool]
    ) -> bool:
        while not self._live():
            if give_up():
                return False
            self.wait(100, lambda: True)
        run_key = (str(message.routing.get("o", "")), message.run)
        if isinstance(message, Start):
            self.current_start = message
        if self.bind and isinstance(message, Stop):
            # Every worker that saw this run's Start must send its Stop downstream, and
            # one that died meanwhile must be waited for (or found dead) there too.
            got = sorted(self.run_members.pop(run_key, set()))
            routing = {**message.routing, "w": got or [p.id for p in self._live()]}
            frames = wire.encode(replace(message, routing=routing))
        if isinstance(message, Stop):
            self.current_start = None
        members = (
            self.run_members.setdefault(run_key, set()) if isinstance(message, Start) else None
        )
        for peer in self._live():
            if self._send_to(peer.id, message, frames) and members is not None:
                members.add(peer.id)
        self.counters.count(size, False)
        return True

    def close(self, linger_ms: int = 5000) -> None:
        if self.bind:
            for peer in list(self.peers.values()):
                self._send_control(peer.id, EOS)
        else:
            self._send_control(None, EOS)
        super().close(linger_ms)


class CreditReceiver(LinkEnd):
    """Receiving end of a PUSH-pattern link."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        counters: LinkCounters,
        window_msgs: int,
        window_bytes: int,
        max_message_bytes: int = -1,
    ) -> None:
        bind = link.binder == "target"
        limit = {zmq.MAXMSGSIZE: max_message_bytes} if max_message_bytes > 0 else {}
        kind = zmq.ROUTER if bind else zmq.DEALER
        super().__init__(ctx, link, me, bind, kind, counters, limit)
        self.window_msgs = window_msgs
        self.window_bytes = window_bytes
        self.leaving = False
        self._idle_flushed = 0.0

    def _window(self) -> bytes:
        return self._hello_payload(wm=self.window_msgs, wb=self.window_bytes)

    def receive(self) -> list[tuple[str, list[Any]]]:
        """Every data message waiting now, as (sender id, frames); control is handled."""
        if self._poll_monitor():
            self._send_control(None, HELLO, self._window())
            if self.leaving:
                self._send_control(None, BYE)
        out: list[tuple[str, list[Any]]] = []
        while (item := self._recv()) is not None:
            peer_id, frames = item
            if frames and _is_control(frames[0]):
                self._control(peer_id, _bytes(frames[0]), frames[1:])
                continue
            key = peer_id if self.bind else self._single_peer()
            if key not in self.peers:
                self.peers[key] = Peer(key)
            out.append((key, frames))
        return out

    def _single_peer(self) -> str:
        return next(iter(self.peers), "?")

    def _control(self, peer_id: str, verb: bytes, rest: list[Any]) -> None:
        payload = _control_payload(rest)
        if payload is None:
            self.counters.drop("bad_control")
            return
        if verb in (HELLO, WELCOME):
            self.welcomed = True
            key = str(payload.get("id", peer_id))
            if not self.bind:
                self.peers = {}
            self.peers[key] = Peer(key)
            if verb == HELLO:
                self._send_control(peer_id, WELCOME, self._window())
                if self.leaving:
                    self._send_control(peer_id, BYE)
            log.info("link %s: sender %s joined", self.link.name, key)
            return
        if verb not in (EOS, ACK):
            self.counters.drop("bad_control")  # a receiver is never sent anything else
            return
        key = peer_id if self.bind else self._single_peer()
        peer = self.peers.setdefault(key, Peer(key))
        peer.eos = True
        log.info(
            "link %s: sender %s finished (%s)",
            self.link.name,
            key,
            "EOS" if verb == EOS else "ACK",
        )

    def consumed(self, key: str, size: int) -> None:
        """Return credit for one consumed message (batched)."""
        peer = self.peers.get(key)
        if peer is None:
            return
        peer.pending_msgs += 1
        peer.pending_bytes += size
        if peer.pending_msgs * 4 >= self.window_msgs or peer.pending_bytes * 4 >= self.window_bytes:
            self._flush_peer(peer)

    def _flush_peer(self, peer: Peer) -> None:
        if peer.pending_msgs:
            self._send_control(
                peer.id if self.bind else None,
                CREDIT,
                msgpack.packb({"m": peer.pending_msgs, "b": peer.pending_bytes}),
            )
            peer.pending_msgs = peer.pending_bytes = 0

    def credit_pending(self) -> bool:
        """Credit is owed to a sender (the stage must come back within the delay)."""
        return any(p.pending_msgs for p in self.peers.values())

    def flush_credit(self) -> None:
        """Called when the stage is idle: return owed credit, at most every
        ``CREDIT_IDLE_DELAY``."""
        now = time.monotonic()
        if now - self._idle_flushed < CREDIT_IDLE_DELAY:
            return
        self._idle_flushed = now
        for peer in self.peers.values():
            self._flush_peer(peer)

    def leave(self) -> None:
        """Ask every sender to stop sending to us; they answer ACK (or EOS later)."""
        self.leaving = True
        for peer in self.peers.values():
            self._send_control(peer.id if self.bind else None, BYE)

    def finished(self) -> bool:
        """Every known sender has finished (EOS, or ACK after our BYE) or is gone."""
        return all(p.eos or not peer_alive(p.id) for p in self.peers.values())


class PubSender(LinkEnd):
    """Sending end of a PUB-pattern link: XPUB that waits for its subscriber."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        counters: LinkCounters,
        join_timeout: float,
    ) -> None:
        bind = link.binder == "source"
        options = {zmq.XPUB_NODROP: 1, zmq.SNDHWM: 1000}
        super().__init__(ctx, link, me, bind, zmq.XPUB, counters, options)
        self.subscribed = False
        self.join_timeout = join_timeout
        self._waited = False
        self.stopping = False

    def service(self) -> None:
        while True:
            try:
                frame = self.socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[1:].startswith(SUB_PREFIX):
                self.subscribed = frame[0] == 1
                if self.subscribed:
                    self._waited = False

    def send(self, message: Message, give_up: Callable[[], bool]) -> bool:
        self.service()
        if isinstance(message, Start) and not self.subscribed and not self._waited:
            # Slow joiner: give the declared subscriber a chance to connect first.
            deadline = time.monotonic() + self.join_timeout
            while not self.subscribed and time.monotonic() < deadline and not give_up():
                if self.socket.poll(50):
                    self.service()
            self._waited = not self.subscribed
        if isinstance(message, Start | Stop):
            message = replace(message, routing={**message.routing, "s": self.me})
        frames = wire.encode(message)
        size = wire.frames_nbytes(frames)
        is_event = isinstance(message, Event)
        while True:
            try:
                self.socket.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                # Events are dropped (and counted) when the subscriber is full; a run's
                # Start and Stop wait for room, so a lossy run is still a whole run.
                if is_event or give_up():
                    self.counters.drop("pub_full")
                    return False
                self.socket.poll(100, zmq.POLLOUT)
                self.service()
        self.counters.count(size, is_event)
        return True

    def close(self, linger_ms: int = 1000) -> None:
        with contextlib.suppress(zmq.ZMQError):  # a full link: subscribers time out instead
            self.socket.send_multipart([EOS, self.me.encode()], flags=zmq.NOBLOCK)
        super().close(linger_ms)


class SubReceiver(LinkEnd):
    """Receiving end of a PUB-pattern link."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        counters: LinkCounters,
        max_message_bytes: int = -1,
    ) -> None:
        bind = link.binder == "target"
        options = {zmq.RCVHWM: 1000}
        if max_message_bytes > 0:
            options[zmq.MAXMSGSIZE] = max_message_bytes
        super().__init__(ctx, link, me, bind, zmq.SUB, counters, options)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        # A topic unique to this stage tells the publisher that we are here.
        self.socket.setsockopt(zmq.SUBSCRIBE, SUB_PREFIX + link.target.encode())
        self.last_data = time.monotonic()

    def receive(self) -> list[tuple[str, list[Any]]]:
        out = []
        while (item := self._recv()) is not None:
            _, frames = item
            if frames and _is_control(frames[0]):
                if _bytes(frames[0]) == EOS and len(frames) > 1:
                    key = _bytes(frames[1]).decode(errors="replace")
                    self.peers.setdefault(key, Peer(key)).eos = True
                continue
            self.last_data = time.monotonic()
            out.append(("", frames))
        return out

    def consumed(self, key: str, size: int) -> None:
        pass

    def credit_pending(self) -> bool:
        return False

    def flush_credit(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def finished(self) -> bool:
        # Lossy by design: done when every publisher we heard from said EOS, or after
        # a quiet second.
        quiet = time.monotonic() - self.last_data > 1.0
        return quiet or (
            bool(self.peers) and all(p.eos or not peer_alive(p.id) for p in self.peers.values())
        )
