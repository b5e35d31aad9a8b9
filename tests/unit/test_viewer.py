"""The viewer's drawing and bookkeeping, without a server or a browser."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from arroyo.io import _render, _viewer_data
from arroyo.io._viewer_history import Ring, RunKept
from arroyo.io.viewer import LiveViewer
from arroyo.message import Encoded, Event, Start, Stop

pytest.importorskip("plotly")


def _png_size(png: bytes) -> tuple[int, int, int]:
    """(width, height, colour type) of a PNG, checking its chunks' CRCs."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        tag, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n : pos + 12 + n])
        assert zlib.crc32(tag + data) == crc
        chunks[tag] = data
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and len(chunks[b"PLTE"]) == 768
    assert len(zlib.decompress(chunks[b"IDAT"])) == h * (w + 1)
    return w, h, colour


@pytest.mark.parametrize("shape", [(2048, 2048), (1000, 3000), (7, 5), (3, 600, 500)])
def test_frames_are_downsampled_to_at_most_max_side(shape) -> None:
    frame = np.arange(int(np.prod(shape)), dtype=np.uint16).reshape(shape)
    drawn = _render.render(frame, max_side=1024)
    assert max(drawn["width"], drawn["height"]) <= 1024
    png = __import__("base64").b64decode(drawn["image"].split(",", 1)[1])
    assert _png_size(png) == (drawn["width"], drawn["height"], 3)
    assert drawn["shape"] == list(shape)


def test_downsampling_averages_blocks() -> None:
    frame = np.array([[0, 2, 4, 4], [2, 0, 4, 4]], dtype=np.uint8)
    assert _render.downsample(frame, 2).tolist() == [[1.0, 4.0]]


def test_limits_linear_and_log() -> None:
    image = np.array([[0.0, 9.0], [99.0, 999.0]], np.float32)
    idx, lo, hi = _render.to_indices(image.copy(), "linear", 0.0, 999.0)
    assert (lo, hi) == (0.0, 999.0) and idx[0, 0] == 0 and idx[1, 1] == 255
    idx, lo, hi = _render.to_indices(image.copy(), "log", 0.0, 999.0)
    assert (lo, hi) == (0.0, 3.0)
    assert idx.ravel().tolist() == [0, 85, 170, 255]


def test_every_colormap_has_256_colours() -> None:
    for name in _render.COLORMAPS:
        assert len(_render.colour_table(name)) == 768


def test_the_viewer_keeps_the_latest_frame_lines_scalars_and_runs() -> None:
    v = LiveViewer(port=0)  # no setup: nothing is served
    v.publish(Start(run=7))
    for i in range(3):
        v.publish(
            Event(metadata={"frame": i, "bright": i * 2}, payload=np.full((4, 4), i), run=7, seq=i)
        )
    r = np.linspace(0, 1, 5)
    v.publish(Event(payload={"r": r, "I": r * 2}, run=7, seq=3))
    v.publish(Event(metadata={"roi_sums": [1, 2]}, run=7, seq=4))
    v.publish(Stop(run=7, seq=5))
    v.publish(Start(run=8))
    v.publish(Event(payload=np.zeros((2, 2)), run=8, seq=0))
    v.publish(Stop(data={"incomplete": True}, run=8, seq=4))
    state = v.state
    slot = state.frame
    assert (slot.n, slot.run, slot.seq, slot.index) == (4, 8, 0, 0)
    assert _viewer_data.find_frame(slot)[2].shape == (2, 2)
    lines = _viewer_data.lines_of(state.lines)
    assert lines["x_name"] == "r" and list(lines["y"]) == ["I"]
    assert sorted(state.series) == ["bright", "roi_sums[0]", "roi_sums[1]"]
    assert [p[1] for p in state.series["bright"]] == [0.0, 2.0, 4.0]
    assert state.runs[7]["state"] == "complete" and state.runs[7]["events"] == 5
    assert state.runs[8]["state"] == "incomplete" and state.runs[8]["missing"] == 3


def test_bad_options_and_live_values_are_refused() -> None:
    with pytest.raises(ValueError, match="max_side"):
        LiveViewer(max_side=4)
    v = LiveViewer()
    with pytest.raises(ValueError, match="max_fps"):
        v.apply_live({"max_fps": 0.0})
    v.apply_live({"scale": "log", "vmax": 10.0})
    assert (v.scale, v.vmax) == ("log", 10.0)


# -- the ring a page steps back through ---------------------------------------------


def _frames(v: LiveViewer, run: int, n: int, size: int = 10, start: int = 0) -> None:
    for seq in range(start, start + n):
        v.publish(
            Event(
                metadata={"i": seq},
                payload=np.full(size, seq, np.uint8).reshape(1, -1),
                run=run,
                seq=seq,
            )
        )


def test_the_ring_keeps_the_last_keep_frames_events_by_run_and_index() -> None:
    v = LiveViewer(keep_frames=5)
    v.publish(Start(run=1))
    _frames(v, 1, 12)
    assert v.ring.runs() == [RunKept(1, 7, 12)]
    assert v.ring.slot(1, 6) is None and v.ring.slot(1, 12) is None
    assert [v.ring.slot(1, i).seq for i in range(7, 12)] == list(range(7, 12))
    assert (v.ring.events, v.ring.nbytes, v.ring.evicted) == (5, 50, 7)
    assert v.stats()["kept"] == 5


def test_the_ring_keeps_at_most_keep_bytes() -> None:
    v = LiveViewer(keep_bytes=3500)
    _frames(v, 1, 10, size=1000)
    assert v.ring.runs() == [RunKept(1, 7, 10)] and v.ring.nbytes == 3000
    _frames(v, 1, 1, size=5000, start=10)  # larger than the ring: shown live, not kept
    assert v.ring.nbytes == 0 and v.state.frame.seq == 10 and v.ring.slot(1, 10) is None


def test_the_ring_keeps_at_most_keep_runs_whole_runs() -> None:
    v = LiveViewer(keep_runs=2)
    for run in (1, 2, 3):
        v.publish(Start(run=run, data={"units": {"q": "nm^-1"}}))
        _frames(v, run, 3)
        v.publish(Stop(run=run, seq=3))
    assert [r.run for r in v.ring.runs()] == [2, 3]
    assert v.ring.slot(1, 0) is None and v.ring.slot(2, 0).start["units"] == {"q": "nm^-1"}
    assert v.ring.events == 6 and v.ring.nbytes == 60
    assert [r["run"] for r in v.state.runs.values()] == [1, 2, 3]  # the run list goes on


def test_the_parts_of_one_event_are_one_slot_and_a_late_part_of_an_evicted_one_is_not_kept() -> (
    None
):
    v = LiveViewer(keep_frames=3)
    r = np.linspace(0.1, 1, 4)
    for seq in range(5):
        v.publish(Event(metadata={"sum": seq * 1.5}, payload=np.ones((2, 2)), run=1, seq=seq))
        v.publish(
            Event(
                metadata={"sum": seq * 1.5, "units": {"r": "mm"}, "I_unit": "counts"},
                payload={"r": r, "I": r * seq},
                run=1,
                seq=seq,
            )
        )
    slot = v.ring.slot(1, 4)
    assert len(slot.parts) == 2 and v.ring.runs() == [RunKept(1, 2, 5)]
    lines = _viewer_data.lines_of(slot)
    assert (lines["x_label"], lines["y_label"]) == ("r (mm)", "I (counts)")
    assert lines["y"]["I"].tolist() == (r * 4).tolist()
    assert _viewer_data.event_scalars(slot)["values"] == {"sum": 6.0}
    v.publish(Event(payload={"r": r, "I": r}, run=1, seq=0))  # seq 0 is gone already
    assert v.ring.runs() == [RunKept(1, 2, 5)] and v.state.lines.gone


def test_a_compressed_frame_stays_compressed_in_the_ring() -> None:
    from tests.conftest import need_detectors

    need_detectors()
    from arroyo.compression import compress

    frame = np.zeros((256, 256), np.uint16)
    frame[100:110, 50:60] = 7
    encoded = Encoded("bslz4", frame.dtype, frame.shape, compress("bslz4", frame))
    event = Event(payload=encoded, run=1, seq=0)
    v = LiveViewer()
    v.publish(event)
    held = v.ring.slot(1, 0).parts[0].payload
    assert held is encoded and isinstance(event.raw_payload, Encoded)  # nothing decoded
    assert v.ring.nbytes == encoded.nbytes < frame.nbytes // 4
    assert v.state.frame.n == 1  # it is the live frame all the same
    assert np.array_equal(_viewer_data.decoded(held), frame)  # when a page asks


@pytest.mark.parametrize(
    "raw",
    [
        "pause",
        None,
        7,
        [1, 2],
        {},
        {"run": "1"},
        {"run": True},
        {"run": 1.5},
        {"run": 1, "index": "2"},
        {"run": 1, "index": False},
        {"run": 1 << 70},
        {"run": 1, "index": -(1 << 64)},
        {"run": {"run": 1}},
    ],
)
def test_bad_view_requests_are_refused(raw) -> None:
    from arroyo.io._viewer_app import _clean_view

    with pytest.raises(ValueError, match="not a view request"):
        _clean_view(raw, Ring(5, 1000, 2))


def test_view_requests_are_clamped_to_the_run() -> None:
    from arroyo.io._viewer_app import _clean_view

    v = LiveViewer(keep_frames=4)
    _frames(v, 3, 10)
    assert _clean_view("live", v.ring) is None
    assert _clean_view({"run": 3}, v.ring) == (3, 9)  # no index: the run's last
    assert _clean_view({"run": 3, "index": 99}, v.ring) == (3, 9)
    assert _clean_view({"run": 3, "index": -4}, v.ring) == (3, 0)  # gone: the page says so
    assert _clean_view({"run": 5, "index": 2}, v.ring) == (5, 0)  # unknown run: nothing kept


def test_units_come_from_the_event_then_the_start() -> None:
    start = {"units": {"q": "nm^-1"}, "unit": "photons"}
    assert _viewer_data.unit_of("q", {}, start) == "nm^-1"
    assert _viewer_data.unit_of("q", {"q_unit": "A^-1"}, start) == "A^-1"
    assert _viewer_data.unit_of("r", {"units": "mm"}, start) == ""
    assert _viewer_data.label("q", "nm^-1") == "q (nm^-1)" and _viewer_data.label("r", "") == "r"
