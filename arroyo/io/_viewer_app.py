"""The viewer's web side: the page, and a latest-only sender per browser.

Each browser gets one sender task. It waits until there is something newer than what
that browser has and the browser has acknowledged the last update (it sends ``ack``
once it has drawn it), then sends the newest state: the newest frame, drawn for that
browser's settings (one drawing per frame and settings, cached, on one worker thread).
A browser that draws slowly gets fewer frames; one that never acknowledges gets none,
and every frame it did not get counts as ``skipped``. Nothing here blocks the stage's
main thread, which only swaps references and calls ``wake``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from arroyo.errors import WireError
from arroyo.io import _render, _webserve
from arroyo.io.guard import loads_json

log = logging.getLogger("arroyo.viewer")


class Viewer(Protocol):
    """What the web side reads of ``arroyo.io.viewer.LiveViewer``."""

    state: Any  # its ViewerState
    title: str
    max_side: int
    max_fps: float
    colormap: Any  # a _render.Colormap
    scale: Any  # a _render.Scale
    vmin: float | None
    vmax: float | None


@dataclass
class Client:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    last_frame: int = 0  # ``n`` of the newest frame this browser was sent
    first_frame: int = -1  # frames before this browser connected are not its skips
    last_update: int = -1
    sent: int = 0
    skipped: int = 0  # frames it could not take, up to its last update
    drawn: tuple[Any, ...] = ()  # the frame and settings it was last sent
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # something new, or acked
    acked: bool = True

    def took(self, n: int) -> None:
        """It is being sent frame ``n``: the frames between its last one and ``n``
        are skipped."""
        if n > self.last_frame:
            self.skipped += max(0, n - max(self.last_frame, self.first_frame) - 1)
            self.last_frame = n

    def pending(self, frames: int) -> int:
        """Frames published since its last frame that it has not been sent."""
        return max(0, frames - max(self.last_frame, self.first_frame))


class Fanout:
    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.clients: list[Client] = []
        self.gone_sent = 0
        self.gone_skipped = 0
        self.server: Any = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="arroyo-viewer-draw")
        self.cache: collections.OrderedDict[tuple[Any, ...], dict[str, Any]] = (
            collections.OrderedDict()
        )
        self._wake_pending = False

    def bind(self, server: Any) -> None:
        self.server = server

    # -- main-thread side --------------------------------------------------------------

    def wake(self) -> None:
        """Called by ``publish``: one thread-safe call per burst, not per message."""
        if not self._wake_pending and self.server is not None:
            self._wake_pending = True
            self.server.call(self._notify)

    def stats(self) -> dict[str, Any]:
        frames = self.viewer.state.frames
        clients = list(self.clients)
        skipped = self.gone_skipped + sum(c.skipped + c.pending(frames) for c in clients)
        return {
            "clients": len(clients),
            "sent": self.gone_sent + sum(c.sent for c in clients),
            "skipped": skipped,
            "skipped_by_client": {c.name: c.skipped + c.pending(frames) for c in clients},
        }

    # -- loop side ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._wake_pending = False
        for c in self.clients:
            c.ready.set()

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.socket)
        app.router.add_get("/favicon.ico", _no_icon)
        _webserve.add_assets(app)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def index(self, request: web.Request) -> web.Response:
        text = _webserve.page("arroyo.io", "viewer.html")
        return web.Response(text=text, content_type="text/html")

    async def socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 16)
        await ws.prepare(request)
        name = request.query.get("name") or f"{request.remote}#{len(self.clients) + 1}"
        client = Client(name=name, first_frame=self.viewer.state.frames)
        self.clients.append(client)
        reader = asyncio.create_task(self._read(ws, client))
        try:
            await self._send_loop(ws, client)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            reader.cancel()
            self.clients.remove(client)
            self.gone_sent += client.sent
            self.gone_skipped += client.skipped + client.pending(self.viewer.state.frames)
        return ws

    async def _read(self, ws: web.WebSocketResponse, client: Client) -> None:
        try:
            await self._read_messages(ws, client)
        finally:
            client.ready.set()  # a closed socket: the sender wakes up and ends

    async def _read_messages(self, ws: web.WebSocketResponse, client: Client) -> None:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            if msg.data == "ack":
                client.acked = True
                client.ready.set()
                continue
            try:  # a browser's message is foreign input: bounded, and never fatal
                raw = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
                request = loads_json(raw)
            except WireError:
                continue
            if isinstance(request, dict) and isinstance(request.get("settings"), dict):
                client.settings = _clean_settings(request["settings"])
                client.last_update = -1  # send the current frame again, drawn with them
                client.ready.set()

    async def _send_loop(self, ws: web.WebSocketResponse, client: Client) -> None:
        loop = asyncio.get_running_loop()
        next_at = 0.0
        while not ws.closed:
            client.ready.clear()
            state = self.viewer.state
            if not (client.acked and state.updates != client.last_update):
                await client.ready.wait()
                continue
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = loop.time() + 1.0 / max(self.viewer.max_fps, 0.01)
            update = await self._update(client, loop)
            client.acked = False
            await ws.send_str(json.dumps(update))
            client.sent += 1

    async def _update(self, client: Client, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        viewer, state = self.viewer, self.viewer.state
        client.last_update = state.updates
        update: dict[str, Any] = {"t": time.time(), "defaults": self.defaults()}
        frame = state.frame
        if frame is not None:
            n, run, seq, ns, array = frame
            settings = {**self.defaults(), **client.settings}
            key = (n, *(settings[k] for k in ("colormap", "scale", "vmin", "vmax")))
            if key != client.drawn:
                drawn = await loop.run_in_executor(self.pool, self._draw, key, array)
                client.took(n)
                client.drawn = key
                update["frame"] = {**drawn, "n": n, "run": run, "seq": seq, "emitted_ns": ns}
        lines = state.lines
        if lines is not None:
            run, seq, x_name, x, ys = lines
            update["lines"] = {
                "run": run,
                "seq": seq,
                "x_name": x_name,
                "x": _floats(x) if x is not None else None,
                "y": {k: _floats(v) for k, v in ys.items()},
            }
        update["series"] = {k: list(v) for k, v in dict(state.series).items()}
        update["runs"] = [dict(r) for r in reversed(dict(state.runs).values())]
        update["stats"] = {**self.stats(), "frames": state.frames, "you": client.name}
        update["title"] = viewer.title
        return update

    def defaults(self) -> dict[str, Any]:
        v = self.viewer
        return {"colormap": v.colormap, "scale": v.scale, "vmin": v.vmin, "vmax": v.vmax}

    def _draw(self, key: tuple[Any, ...], array: Any) -> dict[str, Any]:
        drawn = self.cache.get(key)
        if drawn is None:
            drawn = _render.render(array, self.viewer.max_side, *key[1:])
            self.cache[key] = drawn
            while len(self.cache) > 8:
                self.cache.popitem(last=False)
        return drawn


def _clean_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A page's own settings, keeping only valid ones (None for a limit: automatic)."""
    out: dict[str, Any] = {}
    if raw.get("colormap") in _render.COLORMAPS:
        out["colormap"] = raw["colormap"]
    if raw.get("scale") in ("linear", "log"):
        out["scale"] = raw["scale"]
    for key in ("vmin", "vmax"):
        if key in raw:
            value = raw[key]
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            out[key] = float(value) if ok and math.isfinite(value) else None
    return out


MAX_POINTS = 4096  # a longer 1-D array is sent with a stride (the page is ~1000 px wide)


def _floats(a: Any) -> list[float | None]:
    """A 1-D array as JSON numbers (NaN and inf as null), at most about MAX_POINTS."""
    step = max(1, -(-len(a) // MAX_POINTS))
    return [None if not math.isfinite(v) else v for v in a[::step].astype(float).tolist()]


async def _no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204)
