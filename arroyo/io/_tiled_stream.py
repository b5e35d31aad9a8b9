"""One Tiled websocket subscription, kept open: the listener's view of a node's stream.

Tiled streams a node's updates over ``/api/v1/stream/single/PATH`` (msgpack
envelopes): a schema message first, then one message per update with a ``sequence``.
``Follow`` runs one such connection in a thread and puts every decoded message on a
queue the listener reads, tagged with the path. When the connection drops (the
server restarted, the network) it reconnects with backoff, live, and puts a
``RECONNECTED`` marker: sequence numbers do not survive a server restart (a memory
cache starts again at 1), so the listener never resumes by them; it knows what it
has emitted by row counts (arroyo/io/tiled_listener.py).

We speak the protocol with the ``websockets`` library directly rather than through
``tiled.client.stream.Subscription``: that class retries a dead server only
``TILED_RETRY_ATTEMPTS`` times and then ends its thread, resumes by sequence number,
and holds callbacks by weak reference; the listener needs none of that.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from arroyo.io.retry import Backoff

log = logging.getLogger("arroyo.io.tiled")

RECV_SECONDS = 0.25  # how often a waiting thread checks that it should end
CONNECTED = "arroyo-connected"  # the marker's "type": first connection
RECONNECTED = "arroyo-reconnected"  # ...and every later one
UNDECODABLE = "arroyo-undecodable"


def stream_url(url: str, path: str) -> str:
    """The websocket address of ``path``'s stream on the server at ``url``."""
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    base = parts.path.rstrip("/")
    where = "/".join(quote(p) for p in path.split("/") if p)
    return urlunsplit((scheme, parts.netloc, f"{base}/api/v1/stream/single/{where}",
                       "envelope_format=msgpack", ""))  # fmt: skip


class Follow(threading.Thread):
    """Follows ``path``'s stream until ``close()``; messages go to ``out`` as
    ``(path, message)``. ``start_at`` is Tiled's ``start`` (a sequence to replay from)
    for the first connection only."""

    def __init__(
        self,
        url: str,
        path: str,
        api_key: str | None,
        out: queue.Queue[tuple[str, dict[str, Any]]],
        max_bytes: int,
        start_at: int | None = None,
    ) -> None:
        super().__init__(name=f"tiled-follow {path or '/'}", daemon=True)
        self.url = stream_url(url, path)
        self.path = path
        self._headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
        self._out = out
        self._max_bytes = max_bytes
        self._start_at = start_at
        self._closed = threading.Event()
        self.connections = 0

    def close(self) -> None:
        self._closed.set()

    def run(self) -> None:
        from websockets.sync.client import connect

        backoff = Backoff(f"TiledListener: stream of {self.path or '/'}")
        while not self._closed.is_set():
            url = self.url
            if self._start_at is not None and self.connections == 0:
                url += f"&start={self._start_at}"
            try:
                with connect(url, additional_headers=self._headers,
                             max_size=self._max_bytes, open_timeout=5) as ws:  # fmt: skip
                    backoff.succeeded()
                    marker = RECONNECTED if self.connections else CONNECTED
                    self.connections += 1
                    self._out.put((self.path, {"type": marker}))
                    self._receive(ws)
            except Exception as e:  # (a dead server, a refused key, a cut connection)
                if self._closed.is_set():
                    return
                self._closed.wait(backoff.failed(e))

    def _receive(self, ws: Any) -> None:
        import msgpack

        while not self._closed.is_set():
            try:
                data = ws.recv(timeout=RECV_SECONDS)
            except TimeoutError:
                continue
            try:
                message = msgpack.unpackb(data)
                if not isinstance(message, dict):
                    msg = f"a {type(message).__name__}, not a map"
                    raise TypeError(msg)
            except Exception as e:  # (foreign bytes: counted by the listener)
                message = {"type": UNDECODABLE, "why": f"{type(e).__name__}: {e}"}
            self._out.put((self.path, message))
