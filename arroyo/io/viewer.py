"""A live viewer in the browser: the latest frame, 1-D plots, scalars and the run list,
and the last runs' events to step back through.

``LiveViewer`` is a Publisher: put it at the end of any link (typically a ``pub`` tap)
and open ``http://HOST:PORT/``. Live pages see the newest of everything; each browser
takes the newest frame when it has drawn the previous one, so a slow or stalled
browser skips frames (counted, ``skipped`` in ``arroyo status``) and never slows the
stage: ``publish`` stores a reference and returns, and the drawing (downsampling,
colour, PNG) happens on the server's own thread for frames a browser asked for.
The last events are kept in a bounded ring (``_viewer_history``) as they arrived, so
a page can pause and step back through them. See docs/web.md.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

from arroyo.convert import Bounds
from arroyo.io import _render
from arroyo.io._viewer_data import arrays_of, frame_in, has_lines, scalars_of
from arroyo.io._viewer_history import History, Ring, Slot
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.viewer")


class ViewerState:
    """What the main thread publishes and the server thread reads.

    The main thread replaces references and appends to deques; the server thread
    copies them (each a single C-level operation under the GIL), so neither waits.
    ``frame`` and ``lines`` are the slots (``_viewer_history.Slot``) of the newest
    event with a frame and the newest with 1-D arrays: what live pages show."""

    def __init__(self, history: int, max_series: int = 8) -> None:
        self.frames = 0  # 2-D frames published (the ``n`` of the latest)
        self.frame: Slot | None = None
        self.updates = 0  # anything new: frame, line, scalar, run
        self.lines: Slot | None = None
        self.events = 0  # events published, and how many had 1-D arrays or scalars:
        self.line_events = 0  # what the page's empty panels say depends on them
        self.scalar_events = 0
        self.stops = 0
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
    ``history``: points kept per series; ``keep_frames``, ``keep_bytes``, ``keep_runs``:
    the ring of past events a page can step through (payloads kept as they arrived,
    compressed frames compressed), the oldest evicted first; ``recording``: a folder a
    ``arroyo.io.recording:Recorder`` writes, whose runs pages step through instead,
    every event of them and runs from before the viewer started (docs/storage.md).
    ``colormap``, ``scale``,
    ``vmin``, ``vmax`` and ``max_fps`` are live (``arroyo set``).
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
        keep_frames: Annotated[int, Bounds(ge=1)] = 200,
        keep_bytes: Annotated[int, Bounds(ge=0)] = 256 << 20,
        keep_runs: Annotated[int, Bounds(ge=1)] = 10,
        recording: Path | None = None,
    ) -> None:
        if max_side < 16:
            msg = f"max_side must be >= 16, got {max_side}"
            raise ValueError(msg)
        if not max_fps > 0:
            msg = f"max_fps must be > 0, got {max_fps}"
            raise ValueError(msg)
        for key, value, least in (
            ("keep_frames", keep_frames, 1),
            ("keep_bytes", keep_bytes, 0),
            ("keep_runs", keep_runs, 1),
        ):
            if value < least:
                msg = f"{key} must be >= {least}, got {value}"
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
        # The past a page can step through; another History (a recording folder) can
        # stand in for it behind the same interface (``_viewer_history.History``).
        self.ring = Ring(keep_frames, keep_bytes, keep_runs)
        self.past: History = self.ring
        if recording is not None:  # a Recorder's folder: every event of its runs
            from arroyo.io._viewer_recording import Recorded

            self.past = Recorded(recording, self.ring)
        self.server: Any = None
        self.fanout: Any = None
        self.t0 = time.time()

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
            when = time.time() - self.t0
            state.run_entry(message.run)["events"] += 1
            state.events += 1
            self._take_event(message, when)
            self._take_scalars(message, when)
        elif isinstance(message, Start):
            state.run_entry(message.run)
            self.ring.start(message.run, message.data)
        elif isinstance(message, Stop):
            state.stops += 1
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
        ring = self.ring
        out: dict[str, Any] = {"frames": self.state.frames}
        if fanout is not None:
            out.update(fanout.stats())
        out.update(kept=ring.events, kept_bytes=ring.nbytes, evicted=ring.evicted)
        if self.server is not None:
            out["url"] = self.server.url
        return out

    def drops(self) -> dict[str, int]:
        """Frames a page asked for that would not decode (counted once per frame), and
        records or files of the ``recording`` folder that would not read."""
        out = self.fanout.guard.drops() if self.fanout is not None else {}
        unreadable = getattr(self.past, "unreadable", 0)
        if unreadable:
            out = {**out, "unreadable recording": unreadable}
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

    def _take_event(self, event: Event, when: float) -> None:
        """Keep the event in the ring and make it the live frame and/or lines. Only
        shapes are looked at: a compressed frame is decoded when a page draws it."""
        state = self.state
        slot = self.ring.add(event, when)  # before anything reads event.payload
        arrays = arrays_of(event.raw_payload)
        if frame_in(arrays, self.array) is not None:
            state.run_entry(event.run)["frames"] += 1
            state.frames += 1
            slot.n = state.frames
            state.frame = slot
        if has_lines(arrays) or isinstance(event.metadata.get("q"), list | tuple):
            state.line_events += 1
            state.lines = slot

    def _take_scalars(self, event: Event, when: float) -> None:
        values = scalars_of(event.metadata, self.scalars)
        if values:
            self.state.scalar_events += 1
        for key, value in values.items():
            self.state.add_scalar(key, value, when)

    def _end_run(self, stop: Stop) -> None:
        entry = self.state.run_entry(stop.run)
        if stop.data.get("incomplete") or stop.data.get("interrupted"):
            seen = max(entry["frames"], entry["events"] - entry["frames"])
            entry["missing"] = max(0, stop.seq - seen)
            entry["state"] = "incomplete"
        else:
            entry["state"] = "complete"
        entry["emitted"] = stop.seq
