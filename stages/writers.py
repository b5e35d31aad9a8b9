"""Sinks that write runs to disk as numpy files, one folder per run."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from arroyo.message import Event, Message, Payload, Start, Stop
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.stages.writers")


def to_json(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, else ``str``."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=1, default=to_json) + "\n", encoding="utf-8")
    os.replace(partial, path)


def payload_arrays(payload: Payload, stem: str) -> list[tuple[str, np.ndarray | bytes]]:
    """The named buffers of a payload: ``stem`` for an array or bytes, ``stem_NAME`` for
    each array of a dict, nothing for ``None``."""
    if payload is None:
        return []
    if isinstance(payload, dict):
        return [(f"{stem}_{name}", array) for name, array in payload.items()]
    return [(stem, payload)]


class _RunFolder:
    """The files of one run being written."""

    def __init__(self, folder: Path, run: int, fmt: str) -> None:
        self.folder = folder
        self.run = run
        self.fmt = fmt
        self.written = 0
        self.names: set[str] = set()
        folder.mkdir(parents=True)
        self.log: IO[str] = (folder / "events.jsonl").open("w", encoding="utf-8")
        self.zip: zipfile.ZipFile | None = None
        if fmt == "npz":
            self.zip = zipfile.ZipFile(folder / "frames.npz.partial", "w", allowZip64=True)

    def write(self, event: Event) -> None:
        written = []
        for name, data in payload_arrays(event.payload, f"frame_{event.seq:06d}"):
            name = self._unique(name)
            if self.zip is not None:
                array = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
                with self.zip.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
            elif isinstance(data, bytes):
                self._replace(name + ".bin", lambda f, d=data: f.write(d))
            else:
                self._replace(name + ".npy", lambda f, a=data: np.save(f, a, allow_pickle=False))
            written.append(name)
        record = {"seq": event.seq, "metadata": event.metadata, "arrays": written}
        self.log.write(json.dumps(record, default=to_json) + "\n")
        self.written += 1

    def finish(self, stop: Stop | None) -> None:
        self.log.close()
        if self.zip is not None:
            self.zip.close()
            os.replace(self.folder / "frames.npz.partial", self.folder / "frames.npz")
        report: dict[str, Any]
        if stop is None:
            report = {"run": self.run, "events": None, "written": self.written}
            report |= {"complete": False, "data": {}, "closed_without_stop": True}
        else:
            report = {"run": self.run, "events": stop.seq, "written": self.written}
            report |= {"complete": stop.data.get("incomplete") is not True, "data": stop.data}
        write_json(self.folder / "stop.json", report)

    def _unique(self, name: str) -> str:
        # Only an operator emitting several events per sequence number gets here twice.
        base, k = name, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def _replace(self, filename: str, write: Any) -> None:
        partial = self.folder / (filename + ".partial")
        with partial.open("wb") as f:
            write(f)
        os.replace(partial, self.folder / filename)


class RunFolderWriter(Publisher):
    """Writes each run into its own folder ``path/run_NNNNN`` (the run id, 5 digits).

    Files of a run folder:

    - ``start.json``: ``{"run", "timestamp_ns", "data"}`` from the Start, written at Start.
    - ``format = npy``: ``frame_SSSSSS.npy`` per event (``SSSSSS`` the event's sequence
      number), written as it arrives. ``format = npz``: one ``frames.npz`` holding
      arrays ``frame_SSSSSS``, streamed to ``frames.npz.partial`` as events arrive and
      renamed to ``frames.npz`` at Stop, so a complete ``.npz`` is never half-written.
      A dict payload gives ``frame_SSSSSS_NAME`` per array; a bytes payload gives
      ``frame_SSSSSS.bin`` (npy) or a uint8 array (npz); an event without payload gives
      no array. ``np.load(..., allow_pickle=False)`` reads them all.
    - ``events.jsonl``: one line per event, ``{"seq", "metadata", "arrays"}`` (names
      written), so metadata-only events (RoiSums, FrameStats) are kept too.
    - ``stop.json``: ``{"run", "events", "written", "complete", "data"}`` at Stop:
      ``events`` is the Stop's sequence number (events the source emitted), ``written``
      the number this writer received, ``complete`` is false when the runtime marked
      the run ``incomplete`` (a worker died). A run still open at ``close()`` is
      finished with ``complete: false`` and ``closed_without_stop: true``.

    Files are written under a ``.partial`` name and renamed, so a reader polling the
    folder (FolderListener) never takes half a file. When ``run_NNNNN`` already exists
    (a source restarted and numbered its runs from 1 again), the run goes to
    ``run_NNNNN-2``, ``-3``, ..., never mixing two runs in one folder. Events that come
    without a Start go to the folder of their run id, created on first use.
    """

    def __init__(self, path: Path, format: Literal["npy", "npz"] = "npz") -> None:
        if format not in ("npy", "npz"):
            msg = f"format must be 'npy' or 'npz', got {format!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.format = format
        self.runs: dict[int, _RunFolder] = {}
        self.folders: list[Path] = []  # every run folder made, in order

    def setup(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def publish(self, message: Message) -> None:
        if isinstance(message, Start):
            self._finish(message.run, None)  # a second Start: end the first one's files
            folder = self._open(message.run)
            record = {"run": message.run, "timestamp_ns": message.timestamp_ns}
            write_json(folder.folder / "start.json", record | {"data": message.data})
        elif isinstance(message, Event):
            (self.runs.get(message.run) or self._open(message.run)).write(message)
        elif isinstance(message, Stop):
            if message.run not in self.runs:
                self._open(message.run)
            self._finish(message.run, message)

    def close(self) -> None:
        for run in list(self.runs):
            log.warning("run %d still open at close: its files are marked incomplete", run)
            self._finish(run, None)

    def _open(self, run: int) -> _RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        folder = self.path / f"run_{run:05d}"
        k = 2
        while folder.exists():
            folder = self.path / f"run_{run:05d}-{k}"
            k += 1
        self.runs[run] = _RunFolder(folder, run, self.format)
        self.folders.append(folder)
        return self.runs[run]

    def _finish(self, run: int, stop: Stop | None) -> None:
        folder = self.runs.pop(run, None)
        if folder is not None:
            folder.finish(stop)
