"""The PUSH pattern's two ends: a sender within the credit its receivers grant, and a
receiver that grants it (see ``link`` and docs/links.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack
import zmq

from arroyo import wire
from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.link import (
    ACK,
    BYE,
    CREDIT,
    CREDIT_IDLE_DELAY,
    EOS,
    HELLO,
    SERVICE_INTERVAL,
    WELCOME,
    LinkEnd,
    Peer,
    control_payload,
    frame_bytes,
    is_control,
    send_frames,
)
from arroyo.runtime.liveness import PING
from arroyo.runtime.merge import AGAIN
from arroyo.runtime.net import Net
from arroyo.runtime.stats import LinkCounters
from arroyo.topology import Link

log = logging.getLogger("arroyo.link")


class CreditSender(LinkEnd):
    """Sending end of a PUSH-pattern link."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        counters: LinkCounters,
        net: Net | None = None,
    ) -> None:
        bind = link.binder == "source"
        kind = zmq.ROUTER if bind else zmq.DEALER
        super().__init__(ctx, link, me, bind, kind, counters, net=net)
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
            payload = control_payload(frames[1:])
            if payload is None or not is_control(frames[0]):
                self.counters.drop("bad_control")
                continue
            self._control(peer_id, frame_bytes(frames[0]), payload)
        now = time.monotonic()
        if self.bind and now - self._checked_at > 0.5:
            # a pid lookup per peer costs microseconds: not on every message
            self._checked_at = now
            self._forget_dead()

    def _control(self, peer_id: str, verb: bytes, payload: dict[str, Any]) -> None:
        key = peer_id if self.bind else str(payload.get("id") or next(iter(self.peers), ""))
        if verb in (HELLO, WELCOME):
            self.welcomed = True
            self.counters.back(key)
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
                # run's Start before its events; a duplicate is dropped downstream. It
                # is marked: a stage whose run begins with it missed the run's start.
                start = self.current_start
                again = replace(start, routing={**start.routing, AGAIN: True})
                if self._send_to(key, start, wire.encode(again)):
                    run_key = (str(start.routing.get("o", "")), start.run)
                    self.run_members.setdefault(run_key, set()).add(key)
            log.info("link %s: receiver %s joined", self.link.name, key)
        elif verb == CREDIT and key in self.peers:
            peer = self.peers[key]
            peer.inflight_msgs = max(0, peer.inflight_msgs - payload.get("m", 0))
            peer.taken_msgs += int(payload.get("m", 0))
            peer.inflight_bytes = max(0, peer.inflight_bytes - payload.get("b", 0))
        elif verb == BYE and key in self.peers:
            if self.stopping:
                return  # we are draining too: keep feeding it, our EOS will follow
            self.peers[key].away = True
            self._send_control(peer_id, ACK)
            log.info("link %s: receiver %s left", self.link.name, key)

    def _forget_dead(self) -> None:
        for key in [k for k in self.peers if not self.alive(k)]:
            self._let_go(key, "is gone (its process ended, or it answers no heartbeat)")

    def _let_go(self, key: str, why: str) -> None:
        """Send a receiver nothing more; its credit goes with it. What it was sent and
        has not passed on is the missing part of its share downstream."""
        if self.peers.pop(key, None) is not None:
            log.warning("link %s: receiver %s %s; sent nothing more", self.link.name, key, why)
            self.counters.gone_since(key)

    # -- data ------------------------------------------------------------------------

    def _live(self) -> list[Peer]:
        return [p for p in self.peers.values() if not p.away]

    def _send_to(self, key: str, message: Message, frames: list[Any]) -> bool:
        out = [key.encode(), *frames] if self.bind else frames
        try:
            send_frames(self.socket, out)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._let_go(key, "has no connection (closed, or cut by libzmq's heartbeats)")
                return False
            if e.errno == zmq.EAGAIN:
                return False
            raise
        peer = self.peers.get(key)
        if peer is not None:
            peer.sent_msgs += 1
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
        net: Net | None = None,
    ) -> None:
        bind = link.binder == "target"
        limit = {zmq.MAXMSGSIZE: max_message_bytes} if max_message_bytes > 0 else {}
        kind = zmq.ROUTER if bind else zmq.DEALER
        super().__init__(ctx, link, me, bind, kind, counters, limit, net)
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
            if frames and is_control(frames[0]):
                self._control(peer_id, frame_bytes(frames[0]), frames[1:])
                continue
            key = peer_id if self.bind else self._single_peer()
            if key not in self.peers:
                self.peers[key] = Peer(key)
            out.append((key, frames))
        return out

    def _single_peer(self) -> str:
        return next(iter(self.peers), "?")

    def _control(self, peer_id: str, verb: bytes, rest: list[Any]) -> None:
        payload = control_payload(rest)
        if payload is None:
            self.counters.drop("bad_control")
            return
        if verb in (HELLO, WELCOME):
            self.welcomed = True
            key = str(payload.get("id", peer_id))
            self.counters.back(key)
            # The same sender saying hello again (its HELLO and our WELCOME crossed)
            # keeps its state: credit owed for what it sent in between must go back.
            known = self.peers.get(key)
            if not self.bind:
                self.peers = {}
            self.peers[key] = known if known is not None else Peer(key)
            if verb == HELLO:
                self._send_control(peer_id, WELCOME, self._window())
                if self.leaving:
                    self._send_control(peer_id, BYE)
            log.info("link %s: sender %s joined", self.link.name, key)
            return
        if verb == PING:
            return  # a binder checking that we are still connected
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
        return all(p.eos or not self.alive(p.id) for p in self.peers.values())
