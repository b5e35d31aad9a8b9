"""HDF5/NeXus files, one per run, that h5py + hdf5plugin read without Arroyo.

    [stage:nexus]
    role = publisher
    class = arroyo.io.hdf5:NexusWriter
    input = detector
    path = /data/beamtime/raw        ; a folder: run_00001.h5, run_00002.h5, ...
    compression = auto               ; auto | bslz4 | lz4 | gzip | none
    flush_every = 1                  ; frames between two SWMR flushes

The layout is in ``arroyo.io._nexus_layout`` and docs/storage.md. What a run's file
holds of each event is decided by the run's first event it can store:

- the frames: an array payload is ``/entry/data/data``; a dict of arrays is one
  dataset per name (or only the one the ``array`` option names, as ``data``). Each
  dataset is ``(n, *frame shape)``, one chunk per frame, growing as frames arrive.
- the scalars: ``seq``, ``timestamp_ns`` and every numeric metadata key of that first
  event, as 1-D datasets beside the frames, one row per frame.

Compressed frames (``arroyo.message.Encoded``) whose codec is the dataset's filter
are written as they came, with HDF5's direct chunk write: ``bslz4`` is exactly the
bitshuffle filter's chunk (id 32008, LZ4), ``bslz4-bare`` gets the filter's 12-byte
header put in front, ``lz4`` is the LZ4 filter's chunk (id 32004). Other frames are
written through HDF5's filter (``compression``; ``auto``: the first frame's codec
when it is one of those three, else bitshuffle-LZ4).

Dropped events (``drops()``, by reason; the run's file counts them too): a bytes
payload (``bytes_payload``: opaque bytes have no shape a reader could use), a frame
whose shape or dtype differs from the run's first (``shape_mismatch``,
``dtype_mismatch``), other array names (``layout``), an array that is not numbers
(``dtype_unsupported``), a compressed frame whose header disagrees with its shape
(``size``, ``undecodable``).

Files are written in SWMR mode from the first frame on, so a reader opening with
``swmr=True`` and calling ``refresh()`` follows a run while it is written. At Stop the
file is closed and reopened without SWMR to add the Stop's data and completeness
(HDF5 cannot create objects or attributes under SWMR).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from arroyo.compression import MissingExtra, compress
from arroyo.compression import require as require_codecs
from arroyo.convert import Bounds
from arroyo.errors import ConfigError, WireError
from arroyo.io import _nexus_layout as nx
from arroyo.io.retry import DropCount
from arroyo.message import LOST, Encoded, Event, Message, Start, Stop
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.io.hdf5")

EXTRA = "pip install 'arroyo[hdf5]'"
COMPRESSIONS = ("auto", "bslz4", "lz4", "gzip", "none")
# SWMR needs the 1.10 file format at least; a low bound of 1.10 also keeps the files
# readable by HDF5 1.10 and later tools (with "latest" as the low bound, HDF5 2.0
# writes filter messages 1.10's h5ls and h5dump cannot read).
LIBVER = ("v110", "latest")
_NUMBERS = (int, float, bool)  # a value of these types needs no further check
SCALAR_BATCH = 64  # scalar rows written at once, at the latest...
SCALAR_SECONDS = 0.25  # ...or with the first flush this long after the last batch


def require() -> tuple[Any, Any]:
    """h5py and hdf5plugin, or ``MissingExtra`` naming the extra to install."""
    try:
        import h5py
    except ImportError as e:
        msg = f"h5py is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    try:
        import hdf5plugin
    except ImportError as e:
        msg = f"hdf5plugin is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    return h5py, hdf5plugin


class _RunFile:
    """The file of one run being written."""

    def __init__(self, writer: NexusWriter, run: int, start: Start | None) -> None:
        self.writer, self.run = writer, run
        h5 = writer.h5
        self.path, self.file = _create(h5, writer.path, run)
        nx.set_class(self.file, "NXroot", default="entry", creator="arroyo.io.hdf5:NexusWriter")
        self.entry = nx.set_class(self.file.create_group("entry"), "NXentry", default="data")
        self.entry.attrs["arroyo_run"] = run
        if start is not None:
            self.entry.create_dataset("start_time", data=nx.iso_time(start.timestamp_ns))
            nx.write_start(self.entry, start.data, h5, writer.array_filter)
        self.data = nx.set_class(self.entry.create_group("data"), "NXdata", signal="data")
        self.frames: list[nx.Frames] | None = None  # decided by the first storable event
        self.columns: list[nx.Column] = []
        self.by_key: list[tuple[Any, nx.Column]] = []  # metadata key, its column
        self.first_keys: frozenset[Any] = frozenset()
        self.rows = self.flushed = self.received = 0
        self.scalar_rows = 0  # rows of the columns written so far
        self.scalars_at = time.monotonic()

    def add(self, event: Event) -> str | None:
        """Write one event; the reason it was dropped, or None."""
        self.received += 1
        items = nx.frame_items(event.raw_payload, self.writer.array)
        if isinstance(items, str):
            return items
        if self.frames is None:
            why = self._lay_out(items, event.metadata)
            if why:
                return why
        assert self.frames is not None
        if [f.name for f in self.frames] != [name for name, _ in items]:
            return "layout"
        for frames, (_, item) in zip(self.frames, items, strict=True):
            why = frames.misfit(item)
            if why:
                return why
        try:  # every chunk checked before any is written: the rows stay aligned
            chunks = [self._chunk(f, item) for f, (_, item) in zip(self.frames, items, strict=True)]
        except WireError as e:
            return e.reason
        for frames, chunk in zip(self.frames, chunks, strict=True):
            frames.write(self.rows, *chunk)
        self._scalars(event)
        self.rows += 1
        if self.rows - self.flushed >= self.writer.flush_every:
            self.flush()
        return None

    def _scalars_due(self) -> bool:
        # A slice write costs about as much as a frame's direct chunk write: the
        # columns go in batches, not row by row (docs/storage.md, SWMR).
        pending = self.rows - self.scalar_rows
        waited = time.monotonic() - self.scalars_at
        return pending >= SCALAR_BATCH or (pending > 0 and waited >= SCALAR_SECONDS)

    def _chunk(self, frames: nx.Frames, item: Any) -> tuple[Any, Any]:
        """(the frame's chunk as it goes in the file, or None; the array to write
        through the filter when there is no chunk). Raises ``WireError`` for a
        compressed frame that does not decode, before anything of the event is written."""
        if isinstance(item, Encoded):
            chunk = nx.direct_chunk(item, frames.filter)
            if chunk is not None:
                self.writer.counts["direct_chunks"] += 1
                return chunk, None
            item = item.decode()
        self.writer.counts["compressed_here"] += 1
        codec = frames.filter if self.writer.compress_here else ""
        if codec in nx.DIRECT:
            # the filter's own chunk format, made here: the same bytes HDF5's filter
            # would make, without a copy through HDF5's chunk cache (faster)
            return compress(codec, item), None
        return None, item

    def _lay_out(self, items: list[tuple[str, Any]], metadata: dict[str, Any]) -> str | None:
        """Create the datasets from the run's first storable event, then go SWMR."""
        for _, item in items:
            if not isinstance(item, np.ndarray | Encoded) or item.dtype.kind not in "biufc":
                return "dtype_unsupported"
            if 0 in item.shape:  # (an HDF5 chunk cannot have a side of 0)
                return "empty_frame"
        names = [name for name, _ in items]
        if len(set(names)) != len(names) or set(names) & set(nx.RESERVED):
            return "layout"
        plugin = self.writer.plugin
        self.frames = [nx.Frames(self.data, n, i, self._filter(i), plugin) for n, i in items]
        self.seq = nx.Column(self.data, "seq", np.dtype("<i8"))
        self.stamps = nx.Column(self.data, "timestamp_ns", np.dtype("<i8"))
        chosen = nx.scalar_columns(metadata, {*names, *nx.RESERVED})
        self.by_key = [(k, nx.Column(self.data, name, dt)) for k, (name, dt) in chosen.items()]
        self.first_keys = frozenset(metadata)
        self.columns = [self.seq, self.stamps] + [column for _, column in self.by_key]
        self.data.attrs["signal"] = names[0] if names else "seq"
        if len(names) > 1:
            self.data.attrs["auxiliary_signals"] = names[1:]
        self.file.swmr_mode = True
        return None

    def _filter(self, first: Any) -> str:
        chosen = self.writer.compression
        if chosen != "auto":
            return chosen
        if isinstance(first, Encoded) and first.codec in ("bslz4", "bslz4-bare"):
            return "bslz4"
        if isinstance(first, Encoded) and first.codec == "lz4":
            return "lz4"
        return "bslz4"

    def _scalars(self, event: Event) -> None:
        self.seq.pending.append(event.seq)
        self.stamps.pending.append(event.timestamp_ns)
        metadata = event.metadata
        for key, column in self.by_key:
            value = metadata.get(key)
            if type(value) not in _NUMBERS and nx.scalar_dtype(value) is None:
                self.writer.counts["scalars_missing"] += 1  # absent, or not a number now
                value = column.missing
            column.pending.append(value)
        if metadata.keys() != self.first_keys:  # (the same keys every time, mostly)
            extra = [v for k, v in metadata.items() if k not in self.first_keys]
            self.writer.counts["scalars_not_kept"] += sum(1 for v in extra if nx.scalar_dtype(v))

    def flush(self, everything: bool = False) -> None:
        """Make the frames written so far visible to SWMR readers, and the scalars
        when a batch of them is due (or ``everything``)."""
        if everything or self._scalars_due():
            for column in self.columns:
                column.write(self.scalar_rows)
                column.dset.flush()
            self.scalar_rows, self.scalars_at = self.rows, time.monotonic()
        for frames in self.frames or ():
            frames.dset.id.flush()  # (H5Dflush: this dataset; H5Fflush does the whole file)
        self.flushed = self.rows

    def finish(self, stop: Stop | None) -> None:
        """Close the run's file, with the Stop's data and completeness on /entry."""
        h5 = self.writer.h5
        if self.frames is not None:  # in SWMR mode: reopen to add what it forbids
            self.flush(everything=True)
            self.file.close()
            self.file = _reopen(h5, self.path)
        entry = self.file["entry"]
        if stop is not None:
            entry.create_dataset("end_time", data=nx.iso_time(stop.timestamp_ns))
            stop_group = nx.set_class(entry.create_group("stop"), "NXcollection")
            nx.write_tree(stop_group, stop.data, h5, self.writer.array_filter)
        losses = stop.routing.get(LOST) if stop is not None else None
        attrs = nx.stop_attrs(
            stop.data if stop is not None else None,
            losses if isinstance(losses, dict) else {},
            stop.seq if stop is not None else None,
            self.received,
            self.rows,
        )
        for name, value in attrs.items():
            entry.attrs[name] = value
        self.file.close()


def _create(h5: Any, folder: Path, run: int) -> tuple[Path, Any]:
    """A new file for ``run`` in ``folder``: ``run_NNNNN.h5``, else the first free
    ``run_NNNNN-K.h5``. Created exclusively, so no other file is ever truncated (not
    even by a second writer on the same folder)."""
    k = 1
    while True:
        path = folder / (f"run_{run:05d}.h5" if k == 1 else f"run_{run:05d}-{k}.h5")
        k += 1
        if path.exists():
            continue
        try:
            return path, h5.File(path, "w-", libver=LIBVER)
        except FileExistsError:
            continue  # made meanwhile


def _reopen(h5: Any, path: Path) -> Any:
    """The closed SWMR file opened for writing. A reader still following it holds a
    lock that would refuse us; the writing we do now is only new objects, and
    waiting for readers would stall the chain, so then we open without the lock."""
    try:
        return h5.File(path, "r+")
    except OSError as e:
        if "lock" not in str(e):
            raise
        log.info("%s is open in a reader: adding the Stop without the file lock", path.name)
        return h5.File(path, "r+", locking=False)


class NexusWriter(Publisher):
    """Writes each run to its own NeXus file ``path/run_NNNNN.h5`` (the run id, 5
    digits; ``run_NNNNN-2.h5``, ``-3``... when that name exists: a restarted source
    numbers its runs from 1 again). Events without a Start go to the file of their
    run, made on first use; a run still open at ``close()`` is finished incomplete.

    Options: ``path`` (a folder, made if missing); ``compression`` of frames the writer
    compresses (``auto``, ``bslz4``, ``lz4``, ``gzip``, ``none``); ``array``: for dict
    payloads, the one array to store as ``data`` (empty: all of them, each by its
    name; a dict of one array is ``data``); ``flush_every``: frames between two
    flushes that make them visible to SWMR readers.
    """

    def __init__(
        self,
        path: Path,
        compression: Literal["auto", "bslz4", "lz4", "gzip", "none"] = "auto",
        array: str = "",
        flush_every: Annotated[int, Bounds(ge=1)] = 1,
    ) -> None:
        if compression not in COMPRESSIONS:
            msg = f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            raise ValueError(msg)
        if flush_every < 1:
            msg = f"flush_every must be >= 1, got {flush_every!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.compression = compression
        self.array = array
        self.flush_every = flush_every
        self.runs: dict[int, _RunFile] = {}
        self.files: list[Path] = []  # every file made, in order
        self.counts: Counter[str] = Counter()
        self.dropped = DropCount("NexusWriter")
        self.h5: Any = None
        self.compress_here = False
        self.plugin: Any = None
        self.array_filter: dict[str, Any] = {}

    def setup(self) -> None:
        try:
            self.h5, self.plugin = require()
        except MissingExtra as e:  # one line and exit 2 from arroyo-stage, no traceback
            msg = f"NexusWriter: {e}"
            raise ConfigError(msg) from e
        try:  # with the detectors extra, frames are compressed here, without
            require_codecs()  # HDF5's chunk cache; else by HDF5's filter
            self.compress_here = True
        except MissingExtra:
            self.compress_here = False
        chosen = "bslz4" if self.compression == "auto" else self.compression
        self.array_filter = nx.filter_keywords(chosen, self.plugin)
        self.path.mkdir(parents=True, exist_ok=True)

    def publish(self, message: Message) -> None:
        if self.h5 is None:
            self.setup()
        if isinstance(message, Start):
            self._finish(message.run, None)  # a second Start: close the first one's file
            self._open(message.run, message)
        elif isinstance(message, Event):
            run = self.runs.get(message.run) or self._open(message.run, None)
            self.counts["bytes"] += message.nbytes
            why = run.add(message)
            if why:
                self.dropped.add(1, why, f"run {message.run} event {message.seq}")
            else:
                self.counts["frames"] += 1
        elif isinstance(message, Stop):
            if message.run not in self.runs:
                self._open(message.run, None)
            self._finish(message.run, message)

    def close(self) -> None:
        for run in list(self.runs):
            log.warning("run %d still open at close: its file is marked incomplete", run)
            self._finish(run, None)

    def drops(self) -> dict[str, int]:
        return dict(self.dropped.by_reason)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": len(self.files) - len(self.runs)}
        for name in ("frames", "bytes", "direct_chunks", "compressed_here"):
            out[name] = self.counts[name]
        if self.runs:
            out["file"] = self.runs[next(reversed(self.runs))].path.name
        return out

    def _open(self, run: int, start: Start | None) -> _RunFile:
        self.path.mkdir(parents=True, exist_ok=True)
        self.runs[run] = _RunFile(self, run, start)
        self.files.append(self.runs[run].path)
        return self.runs[run]

    def _finish(self, run: int, stop: Stop | None) -> None:
        file = self.runs.pop(run, None)
        if file is not None:
            file.finish(stop)
