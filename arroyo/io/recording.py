"""Keep runs as they travelled, and play them back: the ``Recorder`` publisher and the
``Replay`` listener (docs/storage.md). The file format is ``arroyo.io.recfile``.

    [stage:record]                       [stage:replay]
    role = publisher                     role = listener
    class = arroyo.io.recording:Recorder class = arroyo.io.recording:Replay
    input = detector (pub)               path = /data/recordings
    path = /data/recordings              runs = 3-5
    max_bytes = 500000000000             pace = 2x
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from arroyo.convert import Bounds
from arroyo.errors import WireError
from arroyo.io import recfile
from arroyo.message import LOST, Event, Message, Start, Stop
from arroyo.stage import Listener, Publisher

log = logging.getLogger("arroyo.io.recording")


def _kept_routing(message: Message) -> dict[str, Any]:
    """Of the runtime's bookkeeping, what a recording keeps: a Stop's losses by reason
    (``LOST``), which make the run incomplete at every stage after them."""
    lost = message.routing.get(LOST) if isinstance(message, Stop) else None
    return {LOST: lost} if isinstance(lost, dict) and lost else {}


class Recorder(Publisher):
    """Writes every run it receives into its own file ``path/run_NNNNN.arec`` (the run
    id, 5 digits; ``-2``, ``-3``... when the name exists), frames as they travelled.

    Contract:

    - Each message is appended as its wire frames (``arroyo.wire.encode``): a
      compressed payload (``Encoded``) is written as the compressed bytes it came in,
      never decoded. Of the runtime's bookkeeping (``routing``) only a Stop's losses
      by reason (``LOST``) are recorded, and replayed.
    - A run's Stop writes the file's index and trailer and flushes it (``fsync =
      true`` also syncs it to disk). A run still open at ``close()``, or whose Start
      is followed by another Start, is left without Stop: it reads back incomplete.
      Events of a run whose Start never came here open its file on first use. A
      write that fails (a full disk) raises, ends that run's file there, and the
      run's later messages are dropped and counted (``run file failed``).
    - Disk budget: when a run opens and after it closes, the oldest whole run files
      of ``path`` (by modification time) are deleted until the folder's ``.arec``
      files total at most ``max_bytes`` and number at most ``max_runs`` (0: no
      limit). A run being written (by this or another recorder) is never deleted.
      Deletions are logged and counted in ``stats()``.
    - ``publish`` blocks while the disk writes: on a PUSH link a slow disk is
      backpressure; on a PUB tap the link drops for it (counted), never slowing
      the chain.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: Annotated[int, Bounds(ge=0)] = 0,
        max_runs: Annotated[int, Bounds(ge=0)] = 0,
        fsync: bool = False,
    ) -> None:
        if max_bytes < 0 or max_runs < 0:
            msg = f"max_bytes and max_runs must be >= 0, got {max_bytes} and {max_runs}"
            raise ValueError(msg)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_runs = max_runs
        self.fsync = fsync
        self.open: dict[int, recfile.RunWriter] = {}
        self.counts: Counter[str] = Counter()
        self.failed: set[int] = set()  # runs whose file a failed write ended
        self.dropped: Counter[str] = Counter()

    def setup(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def publish(self, message: Message) -> None:
        if message.routing:  # (a shallow copy: the payload stays as is)
            message = message.with_routing(_kept_routing(message))
        run = message.run
        if isinstance(message, Start):  # runs do not interleave: any open one is over
            self.failed.discard(run)
            for other in list(self.open):
                self._finish(other, "a new Start came before its Stop")
        if run in self.failed:  # its file was cut by a failed write: the rest is lost
            self.dropped["run file failed"] += 1
            if isinstance(message, Stop):
                self.failed.discard(run)
            return
        writer = self.open.get(run) or self._open(run)
        try:
            writer.write(message)
        except OSError:
            # (a full disk) the file ends at the failed record; a reader stops there
            self.failed.add(run)
            self._finish(run, "a write failed")
            raise  # counted and logged by the runtime as a publish error
        if isinstance(message, Stop):
            self._finish(run, "")
            self._budget()

    def drops(self) -> dict[str, int]:
        return dict(self.dropped)

    def close(self) -> None:
        for run in list(self.open):
            self._finish(run, "the recorder stopped")

    def stats(self) -> dict[str, Any]:
        c = self.counts  # bytes: of the files, headers and indexes included
        written = c["bytes"] + sum(w.size for w in list(self.open.values()))
        return {"runs_written": c["runs"], "bytes_written": written,
                "runs_deleted": c["deleted_runs"], "bytes_deleted": c["deleted_bytes"]}  # fmt: skip

    def _open(self, run: int) -> recfile.RunWriter:
        self.path.mkdir(parents=True, exist_ok=True)
        while True:  # another recorder on the same folder may take a name first
            try:
                writer = recfile.RunWriter(recfile.unique_path(self.path, run), run, self.fsync)
                break
            except FileExistsError:
                continue
        # held while the run is written: the budget of any recorder skips locked files
        fcntl.flock(writer.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.open[run] = writer
        self.counts["runs"] += 1
        self._budget()
        return writer

    def _finish(self, run: int, why: str) -> None:
        writer = self.open.pop(run, None)
        if writer is None:
            return
        if why:
            log.warning("run %d left without its Stop in %s: %s", run, writer.path.name, why)
        try:
            writer.close()
        except OSError as e:  # what was still gathered could not be written
            log.warning("%s: closing it failed: %s", writer.path.name, e)
        self.counts["bytes"] += writer.size

    def _budget(self) -> None:
        """Delete the oldest closed run files until the folder is within budget."""
        if not self.max_bytes and not self.max_runs:
            return
        files = []
        for path in recfile.run_files(self.path):
            try:
                files.append((path, path.stat().st_size))
            except FileNotFoundError:
                continue
        total, count = sum(size for _, size in files), len(files)
        mine = {w.path for w in self.open.values()}
        for path, size in files:
            over = (self.max_bytes and total > self.max_bytes) or (
                self.max_runs and count > self.max_runs
            )
            if not over:
                break
            if path in mine or not _delete_unlocked(path):
                continue
            total, count = total - size, count - 1
            self.counts["deleted_runs"] += 1
            self.counts["deleted_bytes"] += size
            log.info("disk budget: deleted %s (%d bytes)", path.name, size)


def _delete_unlocked(path: Path) -> bool:
    """Delete ``path`` unless a recorder holds it open; True if deleted."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


# -- replay ---------------------------------------------------------------------------


def parse_runs(text: str) -> set[int] | None:
    """``all`` -> None; ``1-3,7`` -> {1, 2, 3, 7}; ``ValueError`` naming ``runs`` else."""
    text = text.strip()
    if text.lower() == "all":
        return None
    chosen: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            low, dash, high = part.partition("-")
            first, last = int(low), int(high) if dash else int(low)
            if first < 1 or last < first:
                raise ValueError(part)
            chosen.update(range(first, last + 1))
    except ValueError:
        msg = f"runs: expected 'all' or run ids and ranges like 1-3,7, got {text!r}"
        raise ValueError(msg) from None
    return chosen


def parse_pace(text: str) -> float:
    """``max`` -> 0 (no waiting); ``recorded`` -> 1; ``2x`` -> 2 (twice as fast)."""
    word = text.strip().lower()
    if word == "max":
        return 0.0
    if word == "recorded":
        return 1.0
    try:
        factor = float(word.removesuffix("x")) if word.endswith("x") else -1.0
    except ValueError:
        factor = -1.0
    if not 0 < factor < float("inf"):
        msg = f"pace: expected 'recorded', 'max' or a factor like 2x or 0.5x, got {text!r}"
        raise ValueError(msg)
    return factor


class Replay(Listener):
    """Plays recorded runs (a ``Recorder``'s folder, or one ``.arec`` file) into the
    topology: each run's Start, Events and Stop as recorded, payloads as they were
    (compressed ones still compressed), metadata and ``timestamp_ns`` kept.

    Contract:

    - ``runs``: ``all`` (every run file of the folder, oldest first), or recorded run
      ids and ranges (``1-3,7``); an id the folder does not hold is a ``ValueError``.
    - ``pace``: ``max`` (as fast as the chain takes them), ``recorded`` (each message
      at its recorded time after its run's first one), or a factor (``2x`` twice as
      fast, ``0.5x`` half as fast). Runs follow one another without a pause.
    - ``run_ids``: ``new`` (the runtime numbers the runs; the recorded id and file are
      in ``Start.data["replay"]``) or ``recorded`` (the recorded ids, which stages
      downstream may already have seen: a writer then names the run ``run_NNNNN-2``).
      Events are renumbered 0..n-1 in recorded order, as a source numbers them.
    - A run recorded without its Stop (the recorder was killed) is replayed as far
      as it goes and closed with a Stop marked ``interrupted``, as the runtime closes
      a source's open run. Records cut short or corrupt at a file's end, files that
      are not recordings and records that do not decode are counted in ``drops()``.
    - ``loop = true`` plays the selection again and again until stopped; ``stop()``
      is prompt at any pace.
    """

    def __init__(
        self,
        path: Path,
        runs: str = "all",
        pace: str = "max",
        loop: bool = False,
        run_ids: Literal["new", "recorded"] = "new",
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            msg = f"path: {str(self.path)!r} does not exist"
            raise ValueError(msg)
        if run_ids not in ("new", "recorded"):
            msg = f"run_ids: expected 'new' or 'recorded', got {run_ids!r}"
            raise ValueError(msg)
        self.chosen = parse_runs(runs)
        self.factor = parse_pace(pace)
        self.loop = loop
        self.run_ids = run_ids
        self._check_chosen()
        self.dropped: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def _check_chosen(self) -> None:
        if self.chosen is None:
            return
        held = {s["run"] for s in recfile.summaries(self.path) if "run" in s}
        missing = sorted(self.chosen - held)
        if missing:
            have = ", ".join(map(str, sorted(held))) or "none"
            msg = f"runs: no recorded run {missing[0]} in {self.path} (it holds: {have})"
            raise ValueError(msg)

    def start(self) -> None:
        while not self.stopping:
            played = 0
            for item in recfile.list_runs(self.path):
                if self.stopping:
                    return
                if not isinstance(item, recfile.RunFile):
                    self._drop("not a recording", "%s: %s", *item)
                    continue
                if self.chosen is None or item.run in self.chosen:
                    self._play(item)
                    played += 1
                item.close()
            if not self.loop or not played:
                return

    def drops(self) -> dict[str, int]:
        return dict(self.dropped)

    def stats(self) -> dict[str, Any]:
        return {"runs_replayed": self.counts["runs"], "events_replayed": self.counts["events"]}

    def _drop(self, reason: str, text: str, *args: Any) -> None:
        self.dropped[reason] += 1
        log.warning(text + " (counted as %s)", *args, reason)

    def _play(self, run: recfile.RunFile) -> None:
        info = {"run": run.run, "file": run.path.name}
        entries = run.entries
        if not entries or entries[0].kind != "S":  # recorded from mid-run on
            self._deliver(Start(data={"replay": info}, timestamp_ns=run.created_ns), info)
        base = entries[0].timestamp_ns if entries else 0
        t0 = time.monotonic()
        for entry in entries:
            if self.factor:
                delay = t0 + (entry.timestamp_ns - base) / 1e9 / self.factor - time.monotonic()
                if delay > 0 and self.stop_requested.wait(delay):
                    return  # the runtime closes the open run as interrupted
            if self.stopping:
                return
            try:
                message = run.play(entry)
            except WireError as e:
                self._drop("undecodable record", "%s at byte %d: %s", run.path, entry.offset, e)
                continue
            except OSError as e:  # deleted or cut meanwhile (a disk budget, a copy)
                self._drop("unreadable file", "%s at byte %d: %s", run.path, entry.offset, e)
                self._deliver(Stop(data={"interrupted": True}), info)
                return
            self._deliver(message, info)
        if run.damaged:
            self._drop(f"{run.damaged} record", "%s: %d bytes after the last whole message",
                       run.path, run.damaged_bytes)  # fmt: skip
        if not run.complete:
            self._deliver(Stop(data={"interrupted": True}), info)
        self.counts["runs"] += 1

    def _deliver(self, message: Message, info: dict[str, Any]) -> None:
        # what the run had lost when it was recorded goes downstream again, so the
        # replayed run is reported incomplete for the same reasons (LOST, as a listener
        # reports its outside source's losses)
        message.routing = _kept_routing(message)
        if isinstance(message, Start):
            message.data["replay"] = info
            message.run = info["run"] if self.run_ids == "recorded" else 0
        else:
            message.run = 0  # (the runtime stamps the run it delivers into)
            if isinstance(message, Event):
                self.counts["events"] += 1
        self.deliver(message)
