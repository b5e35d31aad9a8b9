"""Is a peer on another host still there? (docs/links.md §9)

A process on this host is checked by pid (``link.peer_alive``). A peer on another host
is watched through its connection: every tcp link runs libzmq heartbeats (``net``), so
a peer that dies, is SIGKILLed (its kernel resets the connection) or goes silent (a cut
link: no PONG within ``peer_timeout``) loses its connection, and then:

* a binding end (ROUTER, ``ROUTER_MANDATORY``) cannot route to its routing id any more:
  ``Reach`` probes each peer it is asked about with a PING control frame, at most every
  ``PROBE_EVERY`` seconds, and ``EHOSTUNREACH`` means no connection;
* a connecting end (DEALER) has one peer, its binder: the socket monitor reports
  ``EVENT_DISCONNECTED`` (and ``EVENT_CONNECTED`` when it comes back).

A peer without a connection for ``grace`` seconds is dead; one that has never had a
connection (a worker named in a run that is slow to connect to us) gets
``peer_timeout`` more. The bound on detection is therefore ``peer_timeout + grace +
PROBE_EVERY`` for a silent peer, and about ``grace`` for a killed one.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

PING = b"\x00P"
PROBE_EVERY = 0.25  # s


class Reach:
    """Reachability of the remote peers of one link end."""

    def __init__(self, socket: zmq.Socket[Any], router: bool, peer_timeout: float) -> None:
        self.socket = socket
        self.router = router
        self.grace = min(1.0, max(0.2, peer_timeout / 3))
        self.unseen_grace = self.grace + peer_timeout
        self._seen: set[str] = set()  # peers that have had a connection
        self._probed: dict[str, float] = {}
        self._down: dict[str, float] = {}  # peer -> since when it has had no connection
        self._binder_down: float | None = None  # DEALER: since when disconnected

    # -- DEALER ---------------------------------------------------------------------

    def connected(self) -> None:
        self._binder_down = None

    def disconnected(self) -> None:
        if self._binder_down is None:
            self._binder_down = time.monotonic()

    # -- both -----------------------------------------------------------------------

    def alive(self, peer_id: str) -> bool:
        now = time.monotonic()
        if not self.router:
            down = self._binder_down
        else:
            if now - self._probed.get(peer_id, 0.0) >= PROBE_EVERY:
                self._probe(peer_id, now)
            down = self._down.get(peer_id)
            if down is not None and peer_id not in self._seen:
                return now - down < self.unseen_grace
        return down is None or now - down < self.grace

    def _probe(self, peer_id: str, now: float) -> None:
        if len(self._probed) > 4096:  # a bound against peers that come and go forever
            self._probed.clear()
            self._down.clear()
            self._seen.clear()
        self._probed[peer_id] = now
        try:
            self.socket.send_multipart([peer_id.encode(), PING], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._down.setdefault(peer_id, now)
                return
        self._down.pop(peer_id, None)
        self._seen.add(peer_id)

    def dead_for(self, peer_id: str) -> float:
        """How long the peer has been without a connection (0 if it has one)."""
        down = self._binder_down if not self.router else self._down.get(peer_id)
        return 0.0 if down is None else time.monotonic() - down
