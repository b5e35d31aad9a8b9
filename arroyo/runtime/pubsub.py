"""The PUB pattern's two ends: XPUB that waits for declared subscribers before a
run's Start and counts what a full link drops, and SUB (see docs/links.md)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import zmq

from arroyo import wire
from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.link import (
    EOS,
    SUB_PREFIX,
    LinkEnd,
    Peer,
    frame_bytes,
    is_control,
    peer_alive,
)
from arroyo.runtime.net import Net
from arroyo.runtime.stats import LinkCounters
from arroyo.topology import Link

log = logging.getLogger("arroyo.link")


class PubSender(LinkEnd):
    """Sending end of a PUB-pattern link: XPUB that waits for its subscriber."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        link: Link,
        me: str,
        counters: LinkCounters,
        join_timeout: float,
        net: Net | None = None,
    ) -> None:
        bind = link.binder == "source"
        options = {zmq.XPUB_NODROP: 1, zmq.SNDHWM: 1000}
        super().__init__(ctx, link, me, bind, zmq.XPUB, counters, options, net)
        self.subscribed = False
        self.join_timeout = join_timeout
        self._waited = False
        self.stopping = False

    def service(self) -> None:
        self._poll_monitor()  # counts refused CURVE handshakes
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
        net: Net | None = None,
    ) -> None:
        bind = link.binder == "target"
        options = {zmq.RCVHWM: 1000}
        if max_message_bytes > 0:
            options[zmq.MAXMSGSIZE] = max_message_bytes
        super().__init__(ctx, link, me, bind, zmq.SUB, counters, options, net)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        # A topic unique to this stage tells the publisher that we are here.
        self.socket.setsockopt(zmq.SUBSCRIBE, SUB_PREFIX + link.target.encode())
        self.last_data = time.monotonic()

    def receive(self) -> list[tuple[str, list[Any]]]:
        self._poll_monitor()  # counts refused CURVE handshakes
        out = []
        while (item := self._recv()) is not None:
            _, frames = item
            if frames and is_control(frames[0]):
                if frame_bytes(frames[0]) == EOS and len(frames) > 1:
                    key = frame_bytes(frames[1]).decode(errors="replace")
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
