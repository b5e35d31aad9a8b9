"""The recorder's file format: one run per file, messages as their wire frames.

A run file (``run_00017.arec``) holds the messages of one run exactly as they travel
between stages (``arroyo.wire`` frames, compressed payloads still compressed), so a
reader needs no Arroyo to find its bytes, and Arroyo reads it back with the same
decoder as a link. All integers are little-endian (docs/storage.md gives the layout
for a C reader)::

    file header   32 bytes  magic b"\\x89AREC\\r\\n\\x1a", u32 version (1), u32 header
                            size (32), i64 created_ns, i64 run id (as recorded)
    record        ...       u32 n (frames, 1..257), u32 crc32 of the lengths and frame 0,
                            u64 length[n], then the n frames back to back
    ...                     one record per message, Start first, Stop last
    index         at Stop   u32 0xFFFFFFFF, u32 crc32 of the entries, u64 count,
                            count x 48-byte entries (offset, size, kind, seq, image, t)
    trailer       16 bytes  u64 offset of the index, b"AREC-END"

Only records are appended while a run is open; the index and trailer are written
after the Stop record. A file cut at any byte (a killed recorder) therefore reads back
to its last whole record: a reader without a trailer scans the records from the file
header, and stops at the first one that is cut short or fails its checksum. A file
without a Stop record is an incomplete run.

The checksum covers a record's lengths and its header frame only, never the payload:
crc32 of a 1 MiB frame costs about a fifth of writing it (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arroyo import wire
from arroyo.errors import WireError
from arroyo.message import LOST, Event, Message, Start, Stop

MAGIC = b"\x89AREC\r\n\x1a"
VERSION = 1
SUFFIX = ".arec"
FILE_HEADER = struct.Struct("<8sIIqq")  # magic, version, header size, created_ns, run
RECORD_HEAD = struct.Struct("<II")  # frames, crc32
INDEX_MARK = 0xFFFFFFFF
INDEX_HEAD = struct.Struct("<IIQ")  # INDEX_MARK, crc32 of the entries, count
ENTRY = struct.Struct("<QQc7xqqq")  # offset, size, kind, seq, image, timestamp_ns
TRAILER = struct.Struct("<Q8s")  # offset of the index block, TRAILER_MAGIC
TRAILER_MAGIC = b"AREC-END"
NO_IMAGE = -(2**63)  # an entry's image field when the event names no image
MAX_FRAMES = wire.MAX_BUFFERS + 1
IMAGE_KEYS = ("image_id", "frame", "image_number")  # metadata naming a frame's image
SMALL = 64 * 1024  # records below this are gathered and written together
FLUSH_BYTES = 1 << 20  # ...up to this much
FLUSH_SECONDS = 1.0  # ...or this long, checked at every write
WINDOW = 64 << 20  # a reader playing a file maps it this much at a time


class RecordingError(ValueError):
    """A file that is not a recording (wrong magic, unknown version, too short)."""


@dataclass(frozen=True)
class Entry:
    """One message of a run file: where its record is and what it is."""

    offset: int  # of the record, from the start of the file
    size: int  # of the whole record, its 8 + 8n byte head included
    kind: str  # "S" Start, "E" Event, "T" Stop (the wire format's tags)
    seq: int
    image: int | None  # the event's image id (metadata image_id / frame), if any
    timestamp_ns: int


def image_of(message: Message) -> int | None:
    """The image id an event's metadata names (``image_id``, ``frame``, ...), if any."""
    if isinstance(message, Event):
        for key in IMAGE_KEYS:
            value = message.metadata.get(key)
            if type(value) is int and NO_IMAGE < value < 2**63:
                return value
    return None


def kind_of(message: Message) -> str:
    return "S" if isinstance(message, Start) else "T" if isinstance(message, Stop) else "E"


def _nbytes(frame: Any) -> int:
    return frame.nbytes if type(frame) is memoryview else len(frame)


def _write_all(fd: int, buffers: list[Any]) -> None:
    """``os.writev`` until every byte is out (a write may take only part of them)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        done = os.writev(fd, views[:1024])
        while views and done >= views[0].nbytes:
            done -= views[0].nbytes
            views.pop(0)
        if done:
            views[0] = views[0][done:]


class RunWriter:
    """Appends one run's messages to a new file at ``path`` (never an existing one).

    Contract: ``write(message)`` appends one record and returns its size in bytes;
    small records are gathered and written in one call when 1 MiB is gathered, a
    second has passed, or the run ends; a large one goes out at once in one
    ``writev``. ``write`` of the Stop also writes the index and trailer and flushes;
    nothing may be written after it. ``close()`` flushes and closes (with ``fsync``,
    it syncs the file to disk first). Raises ``FileExistsError`` if ``path`` exists.
    """

    def __init__(self, path: Path, run: int, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.entries: list[Entry] = []
        self.pending = bytearray(FILE_HEADER.pack(MAGIC, VERSION, 32, time.time_ns(), run))
        self.size = len(self.pending)  # bytes written or pending
        self.flushed_at = time.monotonic()
        self.stopped = False
        self.flush()

    def write(self, message: Message) -> int:
        if self.stopped:
            msg = f"{self.path.name}: the run's Stop is written; nothing may follow it"
            raise ValueError(msg)
        frames = wire.encode(message)
        lengths = struct.pack(f"<{len(frames)}Q", *(_nbytes(f) for f in frames))
        crc = zlib.crc32(frames[0], zlib.crc32(lengths))
        head = RECORD_HEAD.pack(len(frames), crc) + lengths
        size = len(head) + sum(_nbytes(f) for f in frames[1:]) + len(frames[0])
        entry = Entry(self.size, size, kind_of(message), message.seq, image_of(message),
                      message.timestamp_ns)  # fmt: skip
        if size < SMALL:
            self.pending += head
            for frame in frames:
                self.pending += memoryview(frame).cast("B")  # (+= an array would add)
        else:
            _write_all(self.fd, [self.pending, head, *frames])
            self.pending.clear()
            self.flushed_at = time.monotonic()
        self.size += size
        self.entries.append(entry)
        if isinstance(message, Stop):
            self._write_index()
        elif len(self.pending) >= FLUSH_BYTES or time.monotonic() - self.flushed_at > FLUSH_SECONDS:
            self.flush()
        return size

    def _write_index(self) -> None:
        body = b"".join(
            ENTRY.pack(e.offset, e.size, e.kind.encode(), e.seq,
                       NO_IMAGE if e.image is None else e.image, e.timestamp_ns)
            for e in self.entries
        )  # fmt: skip
        at = self.size
        self.pending += INDEX_HEAD.pack(INDEX_MARK, zlib.crc32(body), len(self.entries))
        self.pending += body
        self.pending += TRAILER.pack(at, TRAILER_MAGIC)
        self.size += INDEX_HEAD.size + len(body) + TRAILER.size
        self.stopped = True
        self.flush()

    def flush(self) -> None:
        if self.pending:
            _write_all(self.fd, [self.pending])
            self.pending.clear()
        self.flushed_at = time.monotonic()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
            if self.fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1


# -- reading --------------------------------------------------------------------------


@dataclass
class RunFile:
    """A run file opened for reading: its index (read from the file's end, or rebuilt
    by scanning the records when the run has no trailer), and its messages.

    ``complete``: the file holds its run's Stop. ``damaged``: why the records end
    before the file does (``""``, ``"truncated"``, ``"corrupt"``), with
    ``damaged_bytes`` bytes after the last whole record. Messages are decoded with
    ``arroyo.wire``; their arrays are views of the file mapped into memory (no copy).
    """

    path: Path
    created_ns: int
    run: int
    entries: list[Entry]
    complete: bool
    size: int
    damaged: str
    damaged_bytes: int
    _map: Any
    _windows: _Windows | None = None

    @property
    def events(self) -> int:
        return sum(1 for e in self.entries if e.kind == "E")

    def frames(self, entry: Entry) -> list[memoryview]:
        """The wire frames of one record (views of the mapped file)."""
        return _record_frames(self._map, entry.offset, entry.size)

    def message(self, entry: Entry) -> Message:
        """The message of ``entry``; ``WireError`` if its frames do not decode."""
        return wire.decode(self.frames(entry))

    def messages(self) -> Iterator[Message]:
        for entry in self.entries:
            yield self.message(entry)

    def play(self, entry: Entry) -> Message:
        """``message(entry)``, read through windows of the file mapped with their pages
        populated at once: for reading a file from start to end, faulting its pages
        in one by one costs about as much again as copying them."""
        if self._windows is None:
            self._windows = _Windows(self.path, self.size)
        view = self._windows.view(entry.offset, entry.size)
        return wire.decode(_record_frames(view, 0, entry.size))

    def event_entries(self) -> list[Entry]:
        """The events' entries in file order: event k of the run is ``[k]``."""
        return [e for e in self.entries if e.kind == "E"]

    def summary(self) -> dict[str, Any]:
        """What ``arroyo runs`` shows of the file."""
        stamps = [e.timestamp_ns for e in self.entries]
        start = stamps[0] if stamps else self.created_ns
        return {
            "run": self.run,
            "file": self.path.name,
            "events": self.events,
            "bytes": self.size,
            "complete": self.complete and not self.marked_incomplete(),
            "stop": self.complete,
            "damaged": self.damaged,
            "start_ns": start,
            "duration_s": (max(stamps) - start) / 1e9 if stamps else 0.0,
        }

    def close(self) -> None:
        """Unmap the file, unless messages read from it are still in use (their arrays
        are views of it): then it is unmapped when the last of them goes."""
        with contextlib.suppress(BufferError):
            self._map.close()
        self._windows = None

    def marked_incomplete(self) -> bool:
        """Did the recorded Stop say the run was incomplete or interrupted upstream?"""
        if not self.complete:
            return False
        try:
            stop = self.message(self.entries[-1])
        except WireError:
            return True
        data = getattr(stop, "data", {})
        lost = stop.routing.get(LOST)  # what the run lost before the recorder, by reason
        return bool(data.get("incomplete") or data.get("interrupted") or lost)


class _Windows:
    """A file mapped ``WINDOW`` bytes at a time, each window's pages populated in one
    call (``MAP_POPULATE``); a window is unmapped when no view of it is left."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.start = self.end = 0
        self.map: Any = None

    def view(self, offset: int, size: int) -> memoryview:
        if not (self.start <= offset and offset + size <= self.end):
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = min(max(WINDOW, offset + size - start), self.size - start)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            with self.path.open("rb") as f:
                self.map = mmap.mmap(f.fileno(), length, flags=flags, prot=mmap.PROT_READ,
                                     offset=start)  # fmt: skip
            self.start, self.end = start, start + length
        return memoryview(self.map)[offset - self.start : offset - self.start + size]


def read_header(buf: Any, name: str) -> tuple[int, int]:
    """``(created_ns, run)`` of a run file's first bytes, or ``RecordingError``."""
    if len(buf) < FILE_HEADER.size:
        msg = f"{name}: {len(buf)} bytes is too short for a recording"
        raise RecordingError(msg)
    magic, version, header_size, created, run = FILE_HEADER.unpack_from(buf)
    if magic != MAGIC:
        msg = f"{name}: not an Arroyo recording (magic {bytes(magic)!r})"
        raise RecordingError(msg)
    if version != VERSION or header_size < FILE_HEADER.size:
        msg = f"{name}: recording format version {version} (this Arroyo reads {VERSION})"
        raise RecordingError(msg)
    return created, run


def open_run(path: Path) -> RunFile:
    """Open one run file; ``RecordingError`` if it is not one, ``OSError`` if unreadable."""
    path = Path(path)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < FILE_HEADER.size:
            read_header(f.read(), path.name)  # raises
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    created, run = read_header(mapped, path.name)
    entries = _read_index(mapped, size)
    damaged, damaged_bytes, complete = "", 0, entries is not None
    if entries is None:
        entries, end, damaged = scan(mapped, size)
        damaged_bytes = size - end
        complete = bool(entries) and entries[-1].kind == "T"
    if not run and entries:
        run = _first_run(mapped, entries[0])
    return RunFile(path, created, run, entries, complete, size, damaged, damaged_bytes, mapped)


def _first_run(mapped: Any, entry: Entry) -> int:
    try:
        return wire.decode(_record_frames(mapped, entry.offset, entry.size)).run
    except WireError:
        return 0


def _read_index(buf: Any, size: int) -> list[Entry] | None:
    """The entries of a complete file's index, or None when it has none (or a bad one)."""
    if size < FILE_HEADER.size + INDEX_HEAD.size + TRAILER.size:
        return None
    at, magic = TRAILER.unpack_from(buf, size - TRAILER.size)
    if magic != TRAILER_MAGIC or not FILE_HEADER.size <= at <= size - TRAILER.size:
        return None
    mark, crc, count = INDEX_HEAD.unpack_from(buf, at)
    body = memoryview(buf)[at + INDEX_HEAD.size : size - TRAILER.size]
    if mark != INDEX_MARK or count * ENTRY.size != len(body) or zlib.crc32(body) != crc:
        return None
    return [
        Entry(o, s, k.decode("latin-1"), q, None if i == NO_IMAGE else i, t)
        for o, s, k, q, i, t in ENTRY.iter_unpack(body)
    ]


def _record_frames(buf: Any, offset: int, size: int) -> list[memoryview]:
    view = memoryview(buf)[offset : offset + size]
    n, _ = RECORD_HEAD.unpack_from(view)
    lengths = struct.unpack_from(f"<{n}Q", view, RECORD_HEAD.size)
    at, out = RECORD_HEAD.size + 8 * n, []
    for length in lengths:
        out.append(view[at : at + length])
        at += length
    return out


def scan(buf: Any, size: int) -> tuple[list[Entry], int, str]:
    """Rebuild the index of a file by reading its records from the file header on:
    ``(entries, end of the last whole record, why the records end early or "")``."""
    entries: list[Entry] = []
    at = FILE_HEADER.size
    while at < size:
        found = _scan_one(buf, at, size)
        if isinstance(found, str):
            return entries, at, found
        if found is None:  # the index block: what follows belongs to it
            return entries, size, ""
        entries.append(found)
        at += found.size
        if found.kind == "T":  # the last record: what follows is the index, whole or cut
            return entries, size, ""
    return entries, at, ""


def _scan_one(buf: Any, at: int, size: int) -> Entry | str | None:
    """The entry of the record at ``at``; None at the index block; else why not."""
    if at + RECORD_HEAD.size > size:
        return "truncated"
    n, crc = RECORD_HEAD.unpack_from(buf, at)
    if n == INDEX_MARK:
        return None
    if not 1 <= n <= MAX_FRAMES:
        return "corrupt"
    head = RECORD_HEAD.size + 8 * n
    if at + head > size:
        return "truncated"
    lengths = struct.unpack_from(f"<{n}Q", buf, at + RECORD_HEAD.size)
    total = head + sum(lengths)
    if at + total > size:
        return "truncated"
    view = memoryview(buf)
    header = view[at + head : at + head + lengths[0]]
    if zlib.crc32(header, zlib.crc32(view[at + RECORD_HEAD.size : at + head])) != crc:
        return "corrupt"
    try:
        message = wire.decode(_record_frames(buf, at, total))
    except WireError:
        return "corrupt"
    return Entry(at, total, kind_of(message), message.seq, image_of(message),
                 message.timestamp_ns)  # fmt: skip


# -- folders ---------------------------------------------------------------------------


def run_files(folder: Path) -> list[Path]:
    """The run files of ``folder`` (or ``[folder]`` when it is one), oldest first
    (by modification time, then name)."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    found = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except FileNotFoundError:  # deleted meanwhile (a disk budget)
            continue
    return [p for _, _, p in sorted(found)]


def list_runs(folder: Path) -> Iterator[RunFile | tuple[Path, str]]:
    """Every run file of ``folder`` opened in turn, oldest first (close each: an open
    one holds a file descriptor); one that cannot be read is ``(path, why)``."""
    for path in run_files(folder):
        try:
            yield open_run(path)
        except FileNotFoundError:  # deleted since it was listed (a disk budget)
            continue
        except (RecordingError, OSError) as e:
            yield path, str(e)


def summaries(folder: Path) -> list[dict[str, Any]]:
    """``RunFile.summary()`` of every run file of ``folder``, oldest first; a file
    that cannot be read gives ``{"file", "error"}``."""
    out = []
    for item in list_runs(folder):
        if isinstance(item, RunFile):
            out.append(item.summary())
            item.close()
        else:
            out.append({"file": item[0].name, "error": item[1]})
    return out


def unique_path(folder: Path, run: int) -> Path:
    """``folder/run_NNNNN.arec``, or ``-2``, ``-3``... when that name exists."""
    path, k = folder / f"run_{run:05d}{SUFFIX}", 2
    while path.exists():
        path, k = folder / f"run_{run:05d}-{k}{SUFFIX}", k + 1
    return path
