"""A source that turns files appearing in a folder into events."""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from arroyo.convert import Bounds
from arroyo.message import Event, Payload, Start, Stop
from arroyo.stage import Listener

log = logging.getLogger("arroyo.stages.folder")


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    failed: bool = False  # could not be read at this size and mtime


def read_file(path: Path) -> Payload:
    """``.npy`` as an array, ``.npz`` as a dict of arrays (no pickles), else raw bytes."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    return path.read_bytes()


class FolderListener(Listener):
    """Watches the folder ``path`` and emits one Event per new file matching ``pattern``.

    Contract:

    - ``pattern`` is a glob relative to ``path`` (``*.npy``, ``scan_*.bin``,
      ``*/*.npy`` for one level of subfolders). The folder is listed every ``poll_s``
      seconds; it need not exist yet.
    - A file is taken once it has stopped growing: its size and modification time are
      the same at two consecutive polls, so it goes out one to two ``poll_s`` after
      its last write. The safest writers write under a name the pattern does not
      match and rename into place (``x.npy.partial`` -> ``x.npy``).
    - Payload: ``.npy`` files are loaded with ``numpy.load(allow_pickle=False)``,
      ``.npz`` files become a dict of arrays, any other file is its raw bytes.
      Metadata: ``filename`` (relative to ``path``), ``size`` (bytes) and ``mtime``
      (seconds since the epoch). Files ready at the same poll go out oldest first.
    - Each file name is emitted once. A file that fails to load (say a truncated
      ``.npy``) is logged and skipped until its size or mtime changes. A name that
      disappears is forgotten, so a file deleted and written again is a new file.
    - ``existing = false`` ignores the files present when ``start()`` begins (they
      are never emitted, even if they change later); ``true`` emits them too.
    - ``run_per = start``: a Start (``data``: ``path``, ``pattern``) before the first
      file and a Stop (``data``: ``files`` = events emitted) when stopped; ``none``:
      events only, outside any run.
    - ``stop()`` makes ``start()`` return within a moment (it waits on the stop event,
      never a plain sleep), after at most the file being read.
    """

    def __init__(
        self,
        path: Path,
        pattern: str = "*.npy",
        poll_s: Annotated[float, Bounds(gt=0)] = 0.5,
        run_per: Literal["none", "start"] = "start",
        existing: bool = False,
    ) -> None:
        if not poll_s > 0:
            msg = f"poll_s must be > 0, got {poll_s}"
            raise ValueError(msg)
        if run_per not in ("none", "start"):
            msg = f"run_per must be 'none' or 'start', got {run_per!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.pattern = pattern
        self.poll_s = poll_s
        self.run_per = run_per
        self.existing = existing
        self.emitted = 0
        self._seen: dict[str, _Seen] = {}
        self._done: set[str] = set()

    def start(self) -> None:
        if not self.existing:
            self._done.update(self._listing())
        if self.run_per == "start":
            self.deliver(Start(data={"path": str(self.path), "pattern": self.pattern}))
        try:
            while not self.stopping:
                self.poll()
                self.stop_requested.wait(self.poll_s)
        finally:
            if self.run_per == "start":
                self.deliver(Stop(data={"files": self.emitted}))

    def poll(self) -> None:
        """One look at the folder: emit every file that has been stable since the last."""
        listing = self._listing()
        self._done &= listing.keys()  # forget names that disappeared
        for name in list(self._seen):
            if name not in listing:
                del self._seen[name]
        ready = []
        for name, (size, mtime_ns) in listing.items():
            if name in self._done:
                continue
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
                self._seen[name] = _Seen(size, mtime_ns)
            elif not seen.failed:
                ready.append((mtime_ns, name))
        for _, name in sorted(ready):
            if self.stopping:
                return
            self._take(name)

    def _take(self, name: str) -> None:
        seen = self._seen[name]
        try:
            payload = read_file(self.path / name)
        except FileNotFoundError:
            return  # removed between listing and reading; the next poll forgets it
        except (OSError, ValueError, EOFError) as e:
            log.warning("cannot read %s: %s (skipped until it changes)", self.path / name, e)
            seen.failed = True
            return
        metadata = {"filename": name, "size": seen.size, "mtime": seen.mtime_ns / 1e9}
        self.deliver(Event(metadata=metadata, payload=payload))
        del self._seen[name]
        self._done.add(name)
        self.emitted += 1

    def _listing(self) -> dict[str, tuple[int, int]]:
        """``{name relative to path: (size, mtime_ns)}`` of the regular files matching."""
        found: dict[str, tuple[int, int]] = {}
        try:
            candidates = list(self.path.glob(self.pattern))
        except OSError as e:
            log.warning("cannot list %s: %s", self.path, e)
            return found
        for file in candidates:
            try:
                st = file.stat()
            except OSError:
                continue  # vanished since the listing
            if stat.S_ISREG(st.st_mode):
                found[file.relative_to(self.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found
