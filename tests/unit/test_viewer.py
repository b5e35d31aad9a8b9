"""The viewer's drawing and bookkeeping, without a server or a browser."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from arroyo.io import _render, _viewer_data
from arroyo.io.viewer import LiveViewer
from arroyo.message import Event, Start, Stop

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
