"""A live viewer in the browser: the latest frame, 1-D plots, scalars and the run list.

``LiveViewer`` is a Publisher: put it at the end of any link (typically a ``pub`` tap)
and open ``http://HOST:PORT/``. It keeps only the newest of everything; each browser
takes the newest frame when it has drawn the previous one, so a slow or stalled
browser skips frames (counted, ``skipped`` in ``arroyo status``) and never slows the
stage: ``publish`` stores a reference and returns, and the drawing (downsampling,
colour, PNG) happens on the server's own thread for frames a browser asked for.
See docs/web.md.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Annotated, Any, ClassVar

import numpy as np

from arroyo.convert import Bounds
from arroyo.io import _render
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.viewer")

X_AXES = ("q", "r", "x")  # a 1-D array by one of these names is the x of the others
IGNORED = ("frame", "pool", "center")  # not measurements: no series unless asked for


class ViewerState:
    """What the main thread publishes and the server thread reads.

    The main thread replaces whole tuples and appends to deques; the server thread
    copies them (each a single C-level operation under the GIL), so neither waits."""

    def __init__(self, history: int, max_series: int = 8) -> None:
        self.frames = 0  # 2-D frames published (the ``n`` of the latest)
        self.frame: tuple[int, int, int, int, np.ndarray] | None = None  # n, run, seq, ns, a
        self.updates = 0  # anything new: frame, line, scalar, run
        self.lines: tuple[int, int, str, np.ndarray | None, dict[str, np.ndarray]] | None = None
        self.series: dict[str, collections.deque[tuple[float, float]]] = {}
        self.history = history
        self.max_series = max_series
        self.runs: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()

    def add_scalar(self, name: str, value: float, when: float) -> None:
        series = self.series.get(name)
        if series is None:
            if len(self.series) >= self.max_series:
                return
            series = self.series[name] = collections.deque(maxlen=self.history)
        series.append((when, value))

    def run_entry(self, run: int) -> dict[str, Any]:
        entry = self.runs.get(run)
        if entry is None:
            entry = {"run": run, "events": 0, "frames": 0, "state": "open", "missing": 0}
            self.runs[run] = entry
            while len(self.runs) > 50:
                self.runs.popitem(last=False)
        return entry


class LiveViewer(Publisher):
    """Serves the latest frame, 1-D arrays, scalars and runs to browsers.

    Options: ``host``/``port`` to listen on (``port = 0``: any free port; the URL is in
    the log and in ``arroyo status --json``); ``max_side``: frames are downsampled on
    the server to at most this many pixels a side; ``colormap``, ``scale`` (linear or
    log), ``vmin``/``vmax`` (contrast limits; unset: the 1st and 99.5th percentiles):
    the defaults a page starts with, which each page can change for itself;
    ``max_fps``: updates per second per browser at most; ``array``: which array of a
    dict payload is the frame (default: the first 2-D one); ``scalars``: metadata keys
    plotted as rolling series (default: every numeric key but ``frame`` and ``pool``);
    ``history``: points kept per series. ``colormap``, ``scale``, ``vmin``, ``vmax`` and
    ``max_fps`` are live (``arroyo set``).
    """

    live_options: ClassVar[tuple[str, ...]] = ("colormap", "scale", "vmin", "vmax", "max_fps")

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: Annotated[int, Bounds(ge=0, le=65535)] = 8765,
        max_side: Annotated[int, Bounds(ge=16)] = 1024,
        colormap: _render.Colormap = "viridis",
        scale: _render.Scale = "linear",
        vmin: float | None = None,
        vmax: float | None = None,
        max_fps: Annotated[float, Bounds(gt=0)] = 10.0,
        array: str = "",
        scalars: tuple[str, ...] = (),
        history: Annotated[int, Bounds(ge=1)] = 600,
        title: str = "",
    ) -> None:
        if max_side < 16:
            msg = f"max_side must be >= 16, got {max_side}"
            raise ValueError(msg)
        if not max_fps > 0:
            msg = f"max_fps must be > 0, got {max_fps}"
            raise ValueError(msg)
        self.host = host
        self.port = port
        self.max_side = max_side
        self.colormap = colormap
        self.scale = scale
        self.vmin = vmin
        self.vmax = vmax
        self.max_fps = max_fps
        self.array = array
        self.scalars = tuple(scalars)
        self.title = title
        self.state = ViewerState(history)
        self.server: Any = None
        self.fanout: Any = None
        self.t0 = time.time()
        self._lock = threading.Lock()

    # -- Publisher -------------------------------------------------------------------

    def setup(self) -> None:
        from arroyo.io import _webserve

        _webserve.require_web()  # before the module that imports aiohttp
        from arroyo.io import _viewer_app

        self.fanout = _viewer_app.Fanout(self)
        self.server = _webserve.BackgroundServer(
            self.fanout.make_app, self.host, self.port, "arroyo-viewer"
        )
        self.server.start()
        self.fanout.bind(self.server)
        log.info("viewer at %s", self.server.url)

    def publish(self, message: Message) -> None:
        state = self.state
        if isinstance(message, Event):
            state.run_entry(message.run)["events"] += 1
            self._take_payload(message)
            self._take_scalars(message)
        elif isinstance(message, Start):
            state.run_entry(message.run)
        elif isinstance(message, Stop):
            self._end_run(message)
        state.updates += 1
        if self.fanout is not None:
            self.fanout.wake()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def stats(self) -> dict[str, Any]:
        fanout = self.fanout
        out: dict[str, Any] = {"frames": self.state.frames}
        if fanout is not None:
            out.update(fanout.stats())
        if self.server is not None:
            out["url"] = self.server.url
        return out

    def apply_live(self, changes: dict[str, Any]) -> None:
        fps = changes.get("max_fps", self.max_fps)
        if not fps > 0:
            msg = f"max_fps must be > 0, got {fps}"
            raise ValueError(msg)
        for key, value in changes.items():
            setattr(self, key, value)
        self.state.updates += 1  # pages hear of the new defaults with the next update
        if self.fanout is not None:
            self.fanout.wake()

    # -- what a message holds ---------------------------------------------------------

    def _take_payload(self, event: Event) -> None:
        payload = event.payload
        arrays: dict[str, np.ndarray] = {}
        if isinstance(payload, np.ndarray):
            arrays = {"payload": payload}
        elif isinstance(payload, dict):
            arrays = {k: v for k, v in payload.items() if isinstance(v, np.ndarray)}
        frame = self._frame_of(arrays)
        state = self.state
        if frame is not None:
            state.run_entry(event.run)["frames"] += 1
            state.frames += 1
            state.frame = (state.frames, event.run, event.seq, event.timestamp_ns, frame)
        lines = {k: v for k, v in arrays.items() if v.ndim == 1 and v.size}
        if lines:
            x_name = next((n for n in X_AXES if n in lines), "")
            x = lines.pop(x_name) if x_name else None
            if x is None and isinstance(event.metadata.get("q"), list | tuple):
                x, x_name = np.asarray(event.metadata["q"], dtype=np.float64), "q"
            if lines:
                state.lines = (event.run, event.seq, x_name or "index", x, lines)

    def _frame_of(self, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.array:
            found = arrays.get(self.array)
            return found if found is not None and found.ndim >= 2 else None
        return next((a for a in arrays.values() if a.ndim >= 2 and a.size), None)

    def _take_scalars(self, event: Event) -> None:
        when = time.time() - self.t0
        for key, value in event.metadata.items():
            if self.scalars and key not in self.scalars:
                continue
            if not self.scalars and key in IGNORED:
                continue
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                self.state.add_scalar(key, float(value), when)
            elif isinstance(value, list | tuple) and 0 < len(value) <= 8:
                for i, v in enumerate(value):
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        self.state.add_scalar(f"{key}[{i}]", float(v), when)

    def _end_run(self, stop: Stop) -> None:
        entry = self.state.run_entry(stop.run)
        if stop.data.get("incomplete") or stop.data.get("interrupted"):
            seen = max(entry["frames"], entry["events"] - entry["frames"])
            entry["missing"] = max(0, stop.seq - seen)
            entry["state"] = "incomplete"
        else:
            entry["state"] = "complete"
        entry["emitted"] = stop.seq
