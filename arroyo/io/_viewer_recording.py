"""The viewer looking back into a recording folder (``LiveViewer``'s ``recording``).

A second ``History`` beside the in-memory ring: the runs a ``Recorder`` wrote to a
folder (``arroyo.io.recfile``), every event of them and not only the last ones the
ring keeps, including runs from before the viewer started and the run the recorder
is still writing. A run with a file is shown from its file; a run without one (a
recorder on another branch of the graph that has not written it, or not at all)
from the ring, so pointing the viewer at a folder never hides what it saw live.

The server's thread asks many times a second, so the folder is listed at most once a
``rescan`` seconds, a file is read again only when it has grown, and reading a slot
decodes one record of a file mapped into memory (no copy, no decompression: a
compressed frame stays compressed until drawn).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arroyo.errors import WireError
from arroyo.io import recfile
from arroyo.io._viewer_history import Part, Ring, RunKept, Slot
from arroyo.message import Event, Start

log = logging.getLogger("arroyo.viewer")

MAX_FILES = 50  # the newest run files listed (the page's run list holds 50 runs)
OPEN_FILES = 4  # run files kept mapped for reading slots


@dataclass
class _Known:
    """A run file as last read: enough to list it and to find its events."""

    path: Path
    size: int
    mtime_ns: int
    run: int
    events: list[recfile.Entry]
    start: dict[str, Any]
    complete: bool


class Recorded:
    """Runs from a recording folder first, the viewer's ring for the others.

    Implements ``_viewer_history.History``. Runs are keyed by the run id the recorder
    saw, which is the viewer's own when both are downstream of the same listener; when
    two files hold the same run id (a source restarted), the newer one is shown."""

    def __init__(self, folder: Path, ring: Ring, rescan: float = 1.0) -> None:
        self.folder = Path(folder)
        self.ring = ring
        self.rescan = rescan
        self.unreadable = 0  # records or files that would not read (counted once each)
        self._known: dict[Path, _Known] = {}
        self._by_run: dict[int, _Known] = {}
        self._open: collections.OrderedDict[Path, tuple[int, recfile.RunFile]] = (
            collections.OrderedDict()
        )
        self._bad: set[tuple[Path, int]] = set()
        self._listed_at = -float("inf")
        self._lock = threading.Lock()

    # -- History -----------------------------------------------------------------------

    def runs(self) -> list[RunKept]:
        with self._lock:
            self._refresh()
            from_files = {run: RunKept(run, 0, len(k.events)) for run, k in self._by_run.items()}
        others = [r for r in self.ring.runs() if r.run not in from_files]
        return sorted([*from_files.values(), *others], key=lambda r: r.run)

    def slot(self, run: int, index: int) -> Slot | None:
        with self._lock:
            self._refresh()
            known = self._by_run.get(run)
            if known is None:
                return self.ring.slot(run, index)
            if not 0 <= index < len(known.events):
                return None
            return self._read_slot(known, index)

    def describe(self) -> str:
        return f"the recording folder {self.folder} holds it no longer"

    def recorded(self) -> dict[int, dict[str, Any]]:
        """Run list entries of the runs in the folder (for runs the viewer did not see
        live): ``{"run", "events", "frames", "state", "missing"}`` by run."""
        with self._lock:
            self._refresh()
            return {
                run: {"run": run, "events": len(k.events), "frames": len(k.events),
                      "state": "recorded" if k.complete else "recording", "missing": 0}
                for run, k in self._by_run.items()
            }  # fmt: skip

    # -- the folder ----------------------------------------------------------------------

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._listed_at < self.rescan:
            return
        self._listed_at = now
        try:
            paths = recfile.run_files(self.folder)[-MAX_FILES:] if self.folder.exists() else []
        except OSError as e:
            log.warning("cannot list the recording folder %s: %s", self.folder, e)
            return
        known = {}
        for path in paths:
            found = self._read(path, self._known.get(path))
            if found is not None:
                known[path] = found
        self._known = known
        self._by_run = {k.run: k for k in known.values()}  # (oldest first: newest wins)
        for path in [p for p in self._open if p not in known]:
            self._close(path)

    def _read(self, path: Path, before: _Known | None) -> _Known | None:
        """The file's listing, read again only when it changed since ``before``."""
        try:
            st = path.stat()
        except OSError:  # deleted meanwhile (a disk budget)
            return None
        if before is not None and (before.size, before.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return before
        try:
            rf = recfile.open_run(path)
        except (recfile.RecordingError, OSError) as e:
            self._count_bad(path, 0, f"cannot read {path.name}: {e}")
            return None
        try:
            start = _start_data(rf)
            return _Known(path, st.st_size, st.st_mtime_ns, rf.run, rf.event_entries(), start,
                          rf.complete)  # fmt: skip
        finally:
            rf.close()

    def _read_slot(self, known: _Known, index: int) -> Slot | None:
        rf = self._file(known)
        if rf is None:
            return None
        try:
            event = rf.message(known.events[index])
        except (WireError, ValueError, IndexError) as e:
            self._count_bad(known.path, known.events[index].offset, f"{known.path.name}: {e}")
            return None
        if not isinstance(event, Event):
            return None
        part = Part(event.metadata, event.raw_payload, event.timestamp_ns, None, event.nbytes)
        # n: a number of its own per event, so the server's drawing cache tells them apart
        return Slot(run=known.run, seq=event.seq, index=index, start=known.start,
                    parts=[part], n=index + 1)  # fmt: skip

    def _file(self, known: _Known) -> recfile.RunFile | None:
        """The file mapped at (at least) the size listed, from the few kept open."""
        held = self._open.get(known.path)
        if held is not None and held[0] >= known.size:
            self._open.move_to_end(known.path)
            return held[1]
        self._close(known.path)
        try:
            rf = recfile.open_run(known.path)
        except (recfile.RecordingError, OSError):
            return None  # deleted or rewritten since it was listed; the next listing says
        self._open[known.path] = (rf.size, rf)
        while len(self._open) > OPEN_FILES:
            self._close(next(iter(self._open)))
        return rf

    def _close(self, path: Path) -> None:
        held = self._open.pop(path, None)
        if held is not None:
            held[1].close()  # (a slot still drawn keeps its pages mapped until it goes)

    def _count_bad(self, path: Path, offset: int, why: str) -> None:
        if (path, offset) not in self._bad:
            self._bad.add((path, offset))
            self.unreadable += 1
            log.warning("viewer: %s", why)


def _start_data(rf: recfile.RunFile) -> dict[str, Any]:
    """The run's Start data without arrays (units, geometry), as the ring keeps it."""
    if not rf.entries or rf.entries[0].kind != "S":
        return {}
    try:
        start = rf.message(rf.entries[0])
    except (WireError, ValueError):
        return {}
    if not isinstance(start, Start):
        return {}
    return {k: v for k, v in start.data.items() if not hasattr(v, "__array_interface__")}
