"""The viewer's web side: the page, and a latest-only sender per browser.

Each browser gets one sender task. It waits until there is something newer than what
that browser has and the browser has acknowledged the last update (it sends ``ack``
once it has drawn it), then sends the newest state: the newest frame, drawn for that
browser's settings (one drawing per frame and settings, cached, on one worker thread).
A browser that draws slowly gets fewer frames; one that never acknowledges gets none,
and every frame it did not get counts as ``skipped``. Nothing here blocks the stage's
main thread, which only swaps references and calls ``wake``.

A page may also look back: it sends ``{"view": {"run": R, "index": i}}`` (``index``
left out: the run's last kept event) and is sent that event of the viewer's history
instead of the newest, with the same drawing settings, until it sends
``{"view": "live"}``. It still gets the run list, the series and the counts with
every update, so it knows the range it can step through.
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
from arroyo.io import _render, _viewer_data, _webserve
from arroyo.io._viewer_history import History, Part, Slot
from arroyo.io.guard import DecodeGuard, describe, loads_json, reason_of

log = logging.getLogger("arroyo.viewer")


class Viewer(Protocol):
    """What the web side reads of ``arroyo.io.viewer.LiveViewer``."""

    state: Any  # its ViewerState
    past: History  # where pages look back (its ring, or another History)
    array: str
    scalars: tuple[str, ...]
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
    told: tuple[Any, ...] = ()  # the event whose 1-D arrays and scalars it was last sent
    view: tuple[int, int] | None = None  # (run, index) it looks at; None: live
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
        self.guard = DecodeGuard("viewer")  # frames that would not decode, on the pool

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
            if not isinstance(request, dict):
                continue
            if isinstance(request.get("settings"), dict):
                client.settings = _clean_settings(request["settings"])
            elif "view" in request:
                try:
                    client.view = _clean_view(request["view"], self.viewer.past)
                except ValueError:
                    continue
                client.drawn = client.told = ()  # whatever it shows now, send it whole
            else:
                continue
            client.last_update = -1  # send the current frame again, as asked for
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
        kept = {r.run: r for r in viewer.past.runs()}
        if client.view is None:
            shown, lines = state.frame, state.lines
            update["view"] = {"live": True}
        else:
            run, index = client.view
            shown = lines = viewer.past.slot(run, index)
            update["view"] = _view_info(run, index, kept.get(run), shown, viewer.past)
        if shown is not None:
            frame = await self._frame(client, shown, loop)
            if frame is not None:
                update["frame"] = frame
        told = _told(shown, lines)
        if told != client.told:
            client.told = told
            update.update(await loop.run_in_executor(self.pool, self._describe, shown, lines))
        update["series"] = {k: list(v) for k, v in dict(state.series).items()}
        update["runs"] = _runs(state.runs, kept, _recorded(viewer.past))
        update["stats"] = {
            **self.stats(),
            "frames": state.frames,
            "you": client.name,
            "events": state.events,
            "line_events": state.line_events,
            "scalar_events": state.scalar_events,
            "stops": state.stops,
        }
        update["title"] = viewer.title
        return update

    async def _frame(
        self, client: Client, slot: Slot, loop: asyncio.AbstractEventLoop
    ) -> dict[str, Any] | None:
        """The slot's frame drawn for this client, unless it has it already."""
        settings = {**self.defaults(), **client.settings}
        # slot.n: 0 until a part with a frame arrives (one may come after the others)
        key = (
            slot.run,
            slot.index,
            slot.seq,
            slot.n,
            *(settings[k] for k in ("colormap", "scale", "vmin", "vmax")),
        )
        if key == client.drawn:
            return None
        live = client.view is None
        drawn = await loop.run_in_executor(self.pool, self._draw, key, slot)
        client.drawn = key
        if live:
            client.took(slot.n)
        where = {"run": slot.run, "seq": slot.seq, "index": slot.index}
        if drawn is None or "error" in drawn:  # no frame in the event, or a broken one
            return {**where, "none": True, "why": drawn and drawn["error"]}
        return {**drawn, **where, "n": slot.n}

    def _describe(self, shown: Slot | None, lines: Slot | None) -> dict[str, Any]:
        """The 1-D arrays and the scalars of the events shown (on the pool: 1-D arrays
        may be compressed too)."""
        out: dict[str, Any] = {"lines": None, "event": None}  # None: nothing to show
        if lines is not None:
            found = _viewer_data.lines_of(lines)
            out["lines"] = {"run": lines.run, "seq": lines.seq, "index": lines.index}
            if found is not None:  # (else: an event without 1-D arrays, looked back at)
                x = found["x"]
                out["lines"].update(found)
                out["lines"]["x"] = _floats(x) if x is not None else None
                out["lines"]["y"] = {k: _floats(v) for k, v in found["y"].items()}
        slot = shown if shown is not None else lines
        if slot is not None:
            out["event"] = _viewer_data.event_scalars(slot, self.viewer.scalars)
        return out

    def defaults(self) -> dict[str, Any]:
        v = self.viewer
        return {"colormap": v.colormap, "scale": v.scale, "vmin": v.vmin, "vmax": v.vmax}

    def _draw(self, key: tuple[Any, ...], slot: Slot) -> dict[str, Any] | None:
        """The slot's frame decoded (if it travelled compressed) and drawn for the
        settings at the end of ``key``; None when the slot holds no frame, and
        ``{"error": ...}`` when it cannot be drawn (counted once per frame)."""
        drawn = self.cache.get(key) or self.cache.get(key[:4])
        if drawn is None:
            found = _viewer_data.find_frame(slot, self.viewer.array)
            if found is None:
                return None
            try:
                drawn = self._render(key, slot, *found)
            except Exception as e:  # a corrupt frame (foreign input) never ends a page
                self.guard.drop(reason_of(e), describe(e))
                drawn, key = {"error": f"cannot draw this frame ({describe(e)})"}, key[:4]
            self.cache[key] = drawn
            while len(self.cache) > 8:
                self.cache.popitem(last=False)
        return drawn

    def _render(self, key: tuple[Any, ...], slot: Slot, part: Part, name: str, held: Any) -> dict:
        array = _viewer_data.decoded(held)
        drawn = _render.render(array, self.viewer.max_side, *key[-4:])
        drawn["unit"] = _viewer_data.frame_unit(name, part, slot.start)
        drawn["emitted_ns"] = part.timestamp_ns
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


def _clean_view(raw: Any, history: History) -> tuple[int, int] | None:
    """A page's ``view`` request: None for ``"live"``, (run, index) for an event of
    the history (``index`` left out or beyond the run: its last event; below 0: its
    first). ValueError for anything else (the page's message is then ignored)."""
    if raw == "live":
        return None
    run, index = (raw.get("run"), raw.get("index")) if isinstance(raw, dict) else (None, None)
    if not isinstance(run, int) or not _is_int(run) or not (index is None or _is_int(index)):
        msg = f"not a view request: {raw!r:.80}"
        raise ValueError(msg)
    kept = next((r for r in history.runs() if r.run == run), None)
    last = kept.count - 1 if kept is not None else 0
    index = last if index is None else min(max(index, 0), max(last, 0))
    return run, index


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 63


def _view_info(run: int, index: int, kept: Any, slot: Slot | None, history: History) -> dict:
    """What a looking-back page is told besides the event: where it is, the run's
    range, and why there is nothing to show when there is not."""
    first, count = (kept.first, kept.count) if kept is not None else (0, 0)
    info: dict[str, Any] = {"live": False, "run": run, "index": index}
    info.update(first=first, count=count, kept=slot is not None)
    if slot is None:
        info["why"] = f"frame no longer kept ({history.describe()})"
    return info


def _told(shown: Slot | None, lines: Slot | None) -> tuple[Any, ...]:
    """What identifies the lines and scalars a page was sent (a late part counts)."""
    return tuple(
        (s.run, s.index, s.seq, len(s.parts)) if s is not None else None for s in (shown, lines)
    )


def _recorded(history: History) -> dict[int, dict[str, Any]]:
    """Run list entries of a recording folder's runs (``{}`` for the ring)."""
    recorded = getattr(history, "recorded", None)
    return recorded() if recorded is not None else {}


def _runs(
    runs: dict[int, dict[str, Any]], kept: dict[int, Any], recorded: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The run list, newest first, each with the range a page can step through: the
    runs seen live, and those of a recording folder from before the viewer started."""
    seen = dict(runs)
    older = [e for run, e in recorded.items() if run not in seen]
    out = []
    for entry in [*reversed(seen.values()), *sorted(older, key=lambda e: -e["run"])]:
        k = kept.get(entry["run"])
        first, count = (k.first, k.count) if k is not None else (0, 0)
        out.append({**entry, "first": first, "count": count})
    return out


MAX_POINTS = 4096  # a longer 1-D array is sent with a stride (the page is ~1000 px wide)


def _floats(a: Any) -> list[float | None]:
    """A 1-D array as JSON numbers (NaN and inf as null), at most about MAX_POINTS."""
    step = max(1, -(-len(a) // MAX_POINTS))
    return [None if not math.isfinite(v) else v for v in a[::step].astype(float).tolist()]


async def _no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204)
