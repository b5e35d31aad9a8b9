"""The recorder's file format (arroyo.io.recfile): what is written reads back, a file
cut at any byte reads back to its last whole message, the index matches a scan."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from arroyo import wire
from arroyo.io import recfile
from arroyo.message import Encoded, Event, Message, Start, Stop

pytestmark = pytest.mark.timeout(60)


def messages() -> list[Message]:
    frame = np.arange(12, dtype=">i4").reshape(3, 4)
    packed = Encoded("bslz4", "<u2", (8, 8), b"\x00compressed bytes as they came\xff")
    return [
        Start(data={"sample": "Si", "mask": np.ones((2, 2), np.uint8)}, run=7, seq=0),
        Event({"image_id": 0}, frame, run=7, seq=0),
        Event({"frame": 1, "x": 1.5}, b"raw bytes", run=7, seq=1),
        Event({"image_id": 2}, packed, run=7, seq=2),
        Event({}, {"a": np.zeros(3), "b": np.ones(2, np.uint16)}, run=7, seq=3),
        Event({"image_id": 4}, np.zeros(40_000, np.uint16), run=7, seq=4),  # a large record
        Stop(data={"frames": 5}, run=7, seq=5),
    ]


def write(path: Path, msgs: list[Message]) -> recfile.RunWriter:
    writer = recfile.RunWriter(path, run=7)
    for m in msgs:
        writer.write(m)
    writer.close()
    return writer


def same(a: Message, b: Message) -> bool:
    """Equal as sent: wire frames byte for byte (an Encoded payload is not decoded)."""
    fa, fb = wire.encode(a), wire.encode(b)
    return len(fa) == len(fb) and all(bytes(x) == bytes(y) for x, y in zip(fa, fb, strict=True))


def test_a_run_reads_back_equal_with_its_index(tmp_path):
    path = tmp_path / "run_00007.arec"
    sent = messages()
    writer = write(path, sent)
    assert writer.size == path.stat().st_size
    run = recfile.open_run(path)
    assert run.complete and run.damaged == "" and run.run == 7
    got = list(run.messages())
    assert len(got) == len(sent) and all(same(a, b) for a, b in zip(sent, got, strict=True))
    # the compressed payload stays compressed: its bytes are in the file as they came
    packed = got[3]
    assert isinstance(packed, Event) and type(packed.raw_payload) is Encoded
    assert bytes(packed.raw_payload.data) == b"\x00compressed bytes as they came\xff"
    assert path.read_bytes().count(b"\x00compressed bytes as they came\xff") == 1
    assert [e.kind for e in run.entries] == list("SEEEEET")
    assert [e.image for e in run.event_entries()] == [0, 1, 2, None, 4]
    assert [e.timestamp_ns for e in run.entries] == [m.timestamp_ns for m in sent]
    # the index at the file's end is what a scan of the records finds
    entries, _end, why = recfile.scan(run._map, run.size)
    assert entries == run.entries and why == ""
    summary = run.summary()
    assert summary["events"] == 5 and summary["complete"] and summary["bytes"] == run.size


def test_event_k_is_found_without_reading_the_others(tmp_path):
    path = tmp_path / "r.arec"
    write(path, messages())
    run = recfile.open_run(path)
    third = run.message(run.event_entries()[2])
    assert isinstance(third, Event) and third.metadata == {"image_id": 2}


def test_a_file_cut_at_every_byte_reads_back_a_prefix_of_whole_messages(tmp_path):
    full = tmp_path / "full.arec"
    sent = [*messages()[:5], messages()[6]]  # small records only: every byte is cheap to try
    write(full, sent)
    data = full.read_bytes()
    cut = tmp_path / "cut.arec"
    ends = set()
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        if n < recfile.FILE_HEADER.size:
            with pytest.raises(recfile.RecordingError):
                recfile.open_run(cut)
            continue
        run = recfile.open_run(cut)
        got = list(run.messages())
        assert all(same(a, b) for a, b in zip(sent, got, strict=False)), n
        # complete from the Stop record on: an index cut short is rebuilt by a scan
        assert run.complete == (len(got) == len(sent))
        whole = sum(e.size for e in run.entries) + recfile.FILE_HEADER.size
        lost = 0 if run.complete else n - whole
        assert run.damaged_bytes == lost
        assert run.damaged == ("truncated" if lost else "")
        ends.add(len(got))
    assert ends == set(range(len(sent) + 1))


def test_a_corrupt_record_ends_the_run_there_and_is_reported(tmp_path):
    path = tmp_path / "r.arec"
    writer = recfile.RunWriter(path, run=1)
    for m in [messages()[i] for i in (0, 5, 2)]:  # the large event's payload is a frame
        writer.write(m)
    writer.close()
    data = bytearray(path.read_bytes())
    first = recfile.open_run(path).entries[1]
    data[first.offset + first.size - 3] ^= 0xFF  # in a payload frame: not checked, still read
    second_header = first.offset + first.size + recfile.RECORD_HEAD.size + 8 * 1 + 2
    data[second_header] ^= 0xFF  # in the second event's header frame: caught by its crc
    path.write_bytes(bytes(data))
    run = recfile.open_run(path)
    assert [e.kind for e in run.entries] == ["S", "E"]
    assert run.damaged == "corrupt" and not run.complete
    # zeros where a record should be (a tail a crash left unwritten) are corrupt too
    path.write_bytes(bytes(data[: first.offset + first.size]) + bytes(64))
    assert recfile.open_run(path).damaged == "corrupt"


def test_not_a_recording_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.arec"
    bad.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(recfile.RecordingError, match="not an Arroyo recording"):
        recfile.open_run(bad)
    future = recfile.FILE_HEADER.pack(recfile.MAGIC, 99, 32, 0, 1)
    bad.write_bytes(future)
    with pytest.raises(recfile.RecordingError, match="version 99"):
        recfile.open_run(bad)


def test_nothing_is_written_after_the_stop_and_names_never_collide(tmp_path):
    path = recfile.unique_path(tmp_path, 3)
    assert path.name == "run_00003.arec"
    writer = recfile.RunWriter(path, run=3)
    writer.write(Stop(run=3))
    with pytest.raises(ValueError, match="nothing may follow"):
        writer.write(Event({}, b"x", run=3))
    writer.close()
    assert recfile.unique_path(tmp_path, 3).name == "run_00003-2.arec"
    with pytest.raises(FileExistsError):
        recfile.RunWriter(path, run=3)


def test_the_layout_is_what_the_docs_say(tmp_path):
    """A C reader's view: fixed offsets, little-endian, the trailer pointing at the index."""
    path = tmp_path / "r.arec"
    write(path, [Start(run=2), Event({"image_id": 9}, b"abc", run=2), Stop(run=2, seq=1)])
    data = path.read_bytes()
    assert data[:8] == b"\x89AREC\r\n\x1a"
    assert struct.unpack_from("<II", data, 8) == (1, 32)
    index_at, magic = struct.unpack_from("<Q8s", data, len(data) - 16)
    assert magic == b"AREC-END"
    mark, _crc, count = struct.unpack_from("<IIQ", data, index_at)
    assert (mark, count) == (0xFFFFFFFF, 3)
    offset, size, kind, _, _, _, _ = struct.unpack_from("<QQc7sqqq", data, index_at + 16 + 48)
    assert kind == b"E" and offset == 32 + recfile.open_run(path).entries[0].size
    (n,) = struct.unpack_from("<I", data, offset)
    (header_len,) = struct.unpack_from("<Q", data, offset + 8)
    assert n == 1 and size == 8 + 8 * n + header_len
    image = struct.unpack_from("<q", data, index_at + 16 + 48 + 32)[0]
    assert image == 9


def test_playing_a_file_window_by_window_reads_the_same_messages(tmp_path, monkeypatch):
    path = tmp_path / "r.arec"
    sent = [Start(run=1)] + [
        Event({"image_id": i}, np.full(3000 + i, i, np.uint16), run=1, seq=i) for i in range(40)
    ]
    write(path, [*sent, Stop(run=1, seq=40)])
    monkeypatch.setattr(recfile, "WINDOW", 16384)  # records straddle many windows
    run = recfile.open_run(path)
    played = [run.play(e) for e in run.entries]
    assert all(same(a, b) for a, b in zip(run.messages(), played, strict=True))
    run.close()
