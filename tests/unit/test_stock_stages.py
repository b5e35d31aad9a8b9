"""Stock stages (stages/): each against a hand-computed or numpy-reference result."""

from __future__ import annotations

import configparser
import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import stages.synthetic as synthetic
from arroyo import convert
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import PassThrough
from arroyo.testing import CollectingPublisher, ListListener, make_run, run_chain, run_operator
from arroyo.topology import class_options, convert_options, import_class, load
from stages.folder import FolderListener
from stages.reduce import (
    Bin,
    DarkFlatCorrection,
    FrameStats,
    RadialProfile,
    RoiSums,
    ThresholdFilter,
)
from stages.synthetic import POOL_SIZE, DetectorSimulator
from stages.writers import RunFolderWriter

ROOT = Path(__file__).resolve().parents[2]


def frozen(array: np.ndarray) -> np.ndarray:
    """Like a received payload: a read-only array."""
    array = np.array(array)
    array.setflags(write=False)
    return array


def event(payload, seq: int = 0, run: int = 1, **metadata) -> Event:
    return Event(metadata=dict(metadata), payload=payload, run=run, seq=seq)


def one(operator, payload, **metadata) -> Event:
    """Process one event; return the single event that comes out."""
    out = operator.process(event(payload, **metadata))
    assert isinstance(out, Event)
    return out


def events_of(messages: list[Message]) -> list[Event]:
    return [m for m in messages if isinstance(m, Event)]


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def radial_mean(frame: np.ndarray, center, bins: int, r_max: float) -> np.ndarray:
    """Reference azimuthal average: a mask per bin, no bincount."""
    y, x = np.indices(frame.shape)
    dist = np.hypot(y - center[0], x - center[1])
    out = np.full(bins, np.nan)
    width = r_max / bins
    for k in range(bins):
        upper = dist <= r_max if k == bins - 1 else dist < (k + 1) * width
        mask = (dist >= k * width) & upper
        if mask.any():
            out[k] = frame[mask].mean()
    return out


# -- DetectorSimulator ---------------------------------------------------------------


def simulate(**options) -> list[Message]:
    sink = CollectingPublisher()
    run_chain(DetectorSimulator(**options), PassThrough(), sink)
    return sink.messages


def test_simulator_messages_metadata_and_pool_reuse():
    messages = simulate(frames=10, shape=(32, 24), runs=2, seed=3)
    sim = DetectorSimulator(frames=1, shape=(32, 24), seed=3)
    assert [type(m).__name__ for m in messages] == (["Start"] + ["Event"] * 10 + ["Stop"]) * 2
    starts = [m for m in messages if isinstance(m, Start)]
    assert [s.data["index"] for s in starts] == [0, 1]
    assert starts[0].data["frames"] == 10 and starts[0].data["shape"] == [32, 24]
    assert starts[0].data["dark"] == 100.0 and starts[0].data["center"] == [15.5, 11.5]
    events = events_of(messages)
    assert [e.metadata["frame"] for e in events] == list(range(10)) * 2
    assert [e.metadata["pool"] for e in events] == [i % POOL_SIZE for i in range(10)] * 2
    for e in events:  # same seed, same pool: the values tests elsewhere rely on
        assert np.array_equal(e.payload, sim.pool[e.metadata["pool"]])
        assert e.payload.dtype == np.uint16 and not e.payload.flags.writeable
    assert events[0].payload is events[POOL_SIZE].payload  # the pool is reused
    assert len({id(f) for f in sim.pool}) == POOL_SIZE
    assert not np.array_equal(sim.pool[0], sim.pool[1])  # independent noise per frame


def test_simulator_makes_frames_only_once(monkeypatch):
    sim = DetectorSimulator(frames=20, shape=(16, 16))

    def fail(*args, **kwargs):
        raise AssertionError("frames generated in the send loop")

    monkeypatch.setattr(synthetic, "make_pool", fail)
    monkeypatch.setattr(synthetic, "_add_peaks", fail)
    sink = CollectingPublisher()
    run_chain(sim, PassThrough(), sink)
    assert len(sink.events) == 20


def test_simulator_rings_show_as_maxima_of_the_radial_profile():
    shape, rings = (160, 160), 3
    sim = DetectorSimulator(frames=1, shape=shape, rings=rings, peaks=0)
    flat = DetectorSimulator(frames=1, shape=shape, rings=0, peaks=0)
    profile = RadialProfile(bins=80, r_max=80.0)
    ring_free = one(profile, flat.pool[0]).payload["I"]
    intensity = one(profile, sim.pool[0]).payload["I"]
    # rings sit at k / (rings + 1) of half the short side: radii 20, 40, 60 pixels
    for radius in (20, 40, 60):
        window = intensity[radius - 6 : radius + 7]
        assert abs(int(np.argmax(window)) - 6) <= 1, window  # a local maximum at the ring
        assert intensity[radius] > ring_free[radius] + 150
        assert intensity[radius] > max(intensity[radius - 6], intensity[radius + 6])
    # away from the rings, the profile is the ring-free one (background falling off)
    assert intensity[70] == pytest.approx(ring_free[70], rel=0.15)
    assert np.all(np.diff(ring_free[2:42:4]) < 0)


def test_simulator_rings_follow_the_center():
    sim = DetectorSimulator(frames=1, shape=(100, 120), peaks=0, center=(40.0, 70.0))
    intensity = one(RadialProfile(center=(40.0, 70.0), bins=60, r_max=60.0), sim.pool[0])
    radius = round(50 * 1 / 4)  # half the short side is 50; first ring at a quarter of it
    window = intensity.payload["I"][radius - 5 : radius + 6]
    assert abs(int(np.argmax(window)) - 5) <= 1


def test_simulator_dark_offset_is_visible_in_the_minimum():
    low = DetectorSimulator(frames=1, shape=(64, 64), dark=100.0)
    high = DetectorSimulator(frames=1, shape=(64, 64), dark=1000.0)
    for a, b in zip(low.pool, high.pool, strict=True):
        assert 100 <= a.min() < 100 + 40  # the background floor is about 20 counts
        assert np.array_equal(b.astype(np.int64) - a, np.full(a.shape, 900))
    zero = DetectorSimulator(frames=1, shape=(64, 64), dark=0.0, dtype="float32")
    assert zero.pool[0].dtype == np.float32 and 0 <= zero.pool[0].min() < 40


def test_simulator_peaks_are_bright_spots():
    without = DetectorSimulator(frames=1, shape=(64, 64), rings=0, peaks=0)
    spotted = DetectorSimulator(frames=1, shape=(64, 64), rings=0, peaks=5)
    for plain, spots in zip(without.pool, spotted.pool, strict=True):
        assert plain.max() < 600
        assert spots.max() > 900
        assert np.count_nonzero(spots > 700) >= 5


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((50,), "uint16"), ((3, 20, 24), "uint16"), ((), "float64"), ((0, 4), "int32")],
)
def test_simulator_other_shapes(shape, dtype):
    sim = DetectorSimulator(frames=2, shape=shape, dtype=dtype)
    assert len(sim.pool) == POOL_SIZE
    for frame in sim.pool:
        assert frame.shape == shape and frame.dtype == np.dtype(dtype)
        if frame.size:
            assert frame.min() >= 100
    messages = simulate(frames=2, shape=shape, dtype=dtype)
    assert len(events_of(messages)) == 2


def test_simulator_clips_to_small_integer_types():
    frame = DetectorSimulator(frames=1, shape=(64, 64), dtype="uint8").pool[0]
    assert frame.max() == 255 and frame.min() >= 100


# -- DarkFlatCorrection --------------------------------------------------------------


def test_dark_value_subtraction_gives_float32():
    frame = frozen(np.array([[10, 20], [30, 5]], dtype=np.uint16))
    out = one(DarkFlatCorrection(dark_value=10.0), frame, frame_no=7)
    assert out.payload.dtype == np.float32
    assert out.payload.tolist() == [[0.0, 10.0], [20.0, -5.0]]
    assert out.metadata == {"frame_no": 7, "dark": "value"}


def test_dark_and_flat_files(tmp_path):
    rng = np.random.default_rng(1)
    frame = frozen(rng.integers(0, 5000, (6, 5)).astype(np.uint16))
    dark = rng.uniform(90, 110, (6, 5))
    flat = rng.uniform(0.5, 1.5, (6, 5))
    flat[0, 0] = 0.0  # dead
    flat[2, 3] = 1e-4  # below min_flat: dead too
    flat[4, 4] = np.nan
    np.save(tmp_path / "dark.npy", dark)
    np.save(tmp_path / "flat.npy", flat)
    op = DarkFlatCorrection(dark_file=tmp_path / "dark.npy", flat_file=tmp_path / "flat.npy")
    op.setup()
    out = one(op, frame).payload
    live = np.isfinite(flat) & (flat >= 1e-3)
    expected = np.where(live, (frame - dark.astype(np.float32)) / np.where(live, flat, 1), 0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out[0, 0] == 0 and out[2, 3] == 0 and out[4, 4] == 0


def test_dark_shape_mismatch_and_missing_file(tmp_path):
    np.save(tmp_path / "dark.npy", np.zeros((3, 3)))
    op = DarkFlatCorrection(dark_file=tmp_path / "dark.npy")
    with pytest.raises(ValueError, match=r"dark shape \(3, 3\) does not fit frame shape"):
        op.process(event(np.zeros((4, 4), np.uint16)))
    with pytest.raises(ValueError, match="cannot read the flat file"):
        DarkFlatCorrection(flat_file=tmp_path / "nope.npy").setup()


def test_dark_from_first_frames_of_each_run():
    runs = make_run(6, shape=(3, 4), run=1) + make_run(5, shape=(3, 4), run=2)
    out = run_operator(DarkFlatCorrection(dark_value=1e6, dark_from_first=3), runs)
    assert [type(m).__name__ for m in out] == (
        ["Start"] + ["Event"] * 3 + ["Stop"] + ["Start"] + ["Event"] * 2 + ["Stop"]
    )
    for run in (1, 2):
        source = [m for m in runs if isinstance(m, Event) and m.run == run]
        dark = np.mean([e.payload for e in source[:3]], axis=0)
        corrected = [e for e in events_of(out) if e.run == run]
        assert [e.seq for e in corrected] == [e.seq for e in source[3:]]
        for got, raw in zip(corrected, source[3:], strict=True):
            np.testing.assert_allclose(got.payload, raw.payload - dark, rtol=1e-5, atol=1e-3)
            assert got.metadata["dark"] == "first"


def test_correction_on_dict_payload_uses_the_named_array():
    image = frozen(np.full((2, 2), 7, np.uint16))
    extra = frozen(np.arange(3))
    out = one(DarkFlatCorrection(dark_value=2.0, array="image"), {"image": image, "t": extra})
    assert out.payload["image"].tolist() == [[5.0, 5.0], [5.0, 5.0]]
    assert out.payload["t"] is extra
    untouched = event({"other": image})
    assert DarkFlatCorrection(dark_value=2.0, array="image").process(untouched) is untouched
    assert DarkFlatCorrection(dark_value=2.0).process(untouched) is untouched
    raw = event(b"bytes")
    assert DarkFlatCorrection().process(raw) is raw


# -- RoiSums -------------------------------------------------------------------------


def test_roi_sums_match_slicing():
    frame = frozen(np.random.default_rng(2).integers(0, 60000, (20, 30)).astype(np.uint16))
    rois = (0, 5, 0, 10, 3, 20, 25, 30, 10, 11, 10, 11)
    out = one(RoiSums(rois=rois), frame, frame_no=1)
    expected = [
        int(frame[0:5, 0:10].sum(dtype=np.int64)),
        int(frame[3:20, 25:30].sum(dtype=np.int64)),
        int(frame[10, 10]),
    ]
    assert out.metadata == {"frame_no": 1, "roi_sums": expected}
    assert all(type(s) is int for s in out.metadata["roi_sums"])
    assert out.payload is None
    assert one(RoiSums(rois=rois, keep_payload=True), frame).payload is frame


def test_roi_sums_float_and_stacked_frames():
    frame = frozen(np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) / 3)
    out = one(RoiSums(rois=(1, 3, 0, 2)), frame)
    assert out.metadata["roi_sums"] == [pytest.approx(float(frame[:, 1:3, 0:2].sum()))]
    assert type(out.metadata["roi_sums"][0]) is float


def test_roi_sums_reject_bad_rois():
    with pytest.raises(ValueError, match="quadruples"):
        RoiSums(rois=(0, 1, 2))
    with pytest.raises(ValueError, match="y0 < y1"):
        RoiSums(rois=(5, 2, 0, 1))
    with pytest.raises(ValueError, match="outside a frame of shape"):
        RoiSums(rois=(0, 5, 0, 50)).process(event(np.zeros((10, 10))))


# -- Bin -----------------------------------------------------------------------------


def test_bin_arange_by_hand():
    frame = frozen(np.arange(16, dtype=np.uint16).reshape(4, 4))
    summed = one(Bin(factor=2, mode="sum"), frame)
    assert summed.payload.tolist() == [[10, 18], [42, 50]]
    assert summed.payload.dtype == np.int64 and summed.metadata == {"bin": 2}
    mean = one(Bin(factor=2), frame).payload
    assert mean.dtype == np.float32 and mean.tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_bin_crops_edges_and_matches_reshape_reference():
    frame = frozen(np.random.default_rng(3).random((11, 14)))
    out = one(Bin(factor=3, mode="sum"), frame).payload
    expected = frame[:9, :12].reshape(3, 3, 4, 3).sum(axis=(1, 3))
    assert out.shape == (3, 4) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected)
    one_d = one(Bin(factor=3, mode="sum"), frozen(np.arange(7))).payload
    assert one_d.tolist() == [3, 12]
    stack = frozen(np.arange(2 * 4 * 6).reshape(2, 4, 6))
    binned = one(Bin(factor=2, mode="mean"), stack).payload
    assert binned.shape == (2, 2, 3)
    np.testing.assert_allclose(binned, stack.reshape(2, 2, 2, 3, 2).mean(axis=(2, 4)))


def test_bin_rejects_small_frames_and_bad_factor():
    with pytest.raises(ValueError, match="cannot bin"):
        Bin(factor=4).process(event(np.zeros((3, 8))))
    with pytest.raises(ValueError, match="factor"):
        Bin(factor=0)


# -- FrameStats ----------------------------------------------------------------------


def test_frame_stats_match_numpy():
    frame = frozen(np.random.default_rng(4).integers(0, 4000, (30, 40)).astype(np.uint16))
    out = one(FrameStats(), frame, frame_no=3)
    assert out.payload is frame
    f64 = frame.astype(np.float64)
    assert out.metadata["frame_no"] == 3
    assert out.metadata["min"] == f64.min() and out.metadata["max"] == f64.max()
    assert out.metadata["sum"] == f64.sum()
    assert out.metadata["mean"] == pytest.approx(f64.mean(), rel=1e-12)
    assert out.metadata["std"] == pytest.approx(f64.std(), rel=1e-12)
    prefixed = one(FrameStats(prefix="raw_"), frame).metadata
    assert set(prefixed) == {"raw_min", "raw_max", "raw_mean", "raw_std", "raw_sum"}


# -- RadialProfile -------------------------------------------------------------------


def test_radial_profile_of_integer_radius_frame():
    # Half-pixel centre: no pixel lies exactly on an integer radius (a bin edge).
    center = (20.5, 30.5)
    y, x = np.indices((42, 62))
    frame = frozen(np.floor(np.hypot(y - center[0], x - center[1])).astype(np.int32))
    out = one(RadialProfile(center=center, bins=20, r_max=20.0), frame, frame_no=5)
    assert set(out.payload) == {"r", "I"}
    assert out.payload["r"].tolist() == [k + 0.5 for k in range(20)]
    assert out.payload["I"].tolist() == [float(k) for k in range(20)]
    assert out.metadata == {"frame_no": 5, "center": [20.5, 30.5]}


def test_radial_profile_matches_mask_reference_with_default_center():
    frame = frozen(np.random.default_rng(5).random((33, 48)))
    op = RadialProfile(bins=25)
    out = one(op, frame)
    center = (16.0, 23.5)
    r_max = float(np.hypot(16.0, 23.5))
    np.testing.assert_allclose(out.payload["I"], radial_mean(frame, center, 25, r_max))
    again = one(op, frozen(frame * 2))  # the cached bin map serves the next frame
    np.testing.assert_allclose(again.payload["I"], 2 * out.payload["I"])


def test_radial_profile_empty_bins_are_nan_and_dict_payload():
    frame = frozen(np.ones((5, 5)))
    out = one(RadialProfile(center=(2.0, 2.0), bins=40, r_max=4.0, array="img"), {"img": frame})
    intensity = out.payload["I"]
    assert np.isnan(intensity[1])  # no pixel lies between 0.1 and 0.2 pixels from the centre
    assert np.nanmax(intensity) == 1.0 and intensity[0] == 1.0
    assert set(out.payload) == {"r", "I"}
    with pytest.raises(ValueError, match="2-D"):
        RadialProfile().process(event(np.zeros(5)))


# -- ThresholdFilter -----------------------------------------------------------------


def test_threshold_filter_keeps_hits_and_counts_at_stop():
    frames = []
    for bright in (0, 1, 2, 3, 0, 5):
        f = np.zeros((4, 4), np.uint16)
        f.flat[:bright] = 100
        f.flat[bright] = 50  # equal to the threshold: not above it
        frames.append(frozen(f))
    run = [Start(data={"sample": "x"}, run=4)]
    run += [event(f, seq=i, run=4) for i, f in enumerate(frames)]
    stop = Stop(data={"frames": 6}, run=4, seq=6, routing={"o": "det"})
    out = run_operator(ThresholdFilter(threshold=50, min_pixels=2), [*run, stop])
    kept = events_of(out)
    assert [e.seq for e in kept] == [2, 3, 5]
    assert [e.metadata["bright_pixels"] for e in kept] == [2, 3, 5]
    assert kept[0].payload is frames[2]
    last = out[-1]
    assert isinstance(last, Stop) and (last.run, last.seq) == (4, 6)
    assert last.data == {"frames": 6, "hits": 3, "misses": 3, "summed": ["hits", "misses"]}
    assert last.routing == {"o": "det"}
    assert stop.data == {"frames": 6}  # the input Stop is not modified


def test_threshold_filter_counts_reset_per_run():
    op = ThresholdFilter(threshold=-1.0)  # every pixel is above: every frame is a hit
    out = run_operator(op, make_run(3, run=1) + make_run(2, run=2))
    stops = [m for m in out if isinstance(m, Stop)]
    assert [(s.data["hits"], s.data["misses"]) for s in stops] == [(3, 0), (2, 0)]


# -- options convert from INI --------------------------------------------------------

STOCK = [
    "stages.synthetic:DetectorSimulator",
    "stages.folder:FolderListener",
    "stages.reduce:DarkFlatCorrection",
    "stages.reduce:RoiSums",
    "stages.reduce:Bin",
    "stages.reduce:FrameStats",
    "stages.reduce:RadialProfile",
    "stages.reduce:ThresholdFilter",
    "stages.writers:RunFolderWriter",
]


@pytest.mark.parametrize("path", STOCK)
def test_every_option_can_be_set_from_ini(path):
    params, hints, _ = class_options(import_class(path))
    for name in params:
        convert.converter_for(hints.get(name, str))  # TypeError if not settable


def test_docs_examples_convert(tmp_path):
    """Every [stage:] section of docs/stages.md names a stock class and valid options;
    the full example topology loads."""
    text = (ROOT / "docs" / "stages.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```", text, flags=re.S)
    seen = set()
    reserved = {"role", "class", "input", "workers", "scalable", "on_error"}
    for n, block in enumerate(blocks):
        parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
        parser.read_string(block)
        for section in parser.sections():
            if not section.startswith("stage:"):
                continue
            keys = dict(parser[section])
            problems: list[str] = []
            options = {k: v for k, v in keys.items() if k not in reserved}
            cls = import_class(keys["class"])
            convert_options(cls, options, lambda k, v, t, out=problems: out.append(f"{k}: {t}"))
            assert not problems, (section, problems)
            seen.add(keys["class"])
        if parser.has_section("topology"):
            (tmp_path / f"example{n}.ini").write_text(block)
            assert load(tmp_path / f"example{n}.ini").stages
    assert set(STOCK) <= seen


# -- FolderListener ------------------------------------------------------------------


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write under another name, then rename into place (what writers should do)."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.save(f, array)
    partial.rename(path)


class PollCounting(FolderListener):
    polls = 0

    def poll(self) -> None:
        super().poll()
        self.polls += 1


class Running:
    """A FolderListener's start() in a thread, feeding a CollectingPublisher."""

    def __init__(self, listener: FolderListener) -> None:
        self.listener = listener
        self.sink = CollectingPublisher()
        listener.set_operator(PassThrough())
        listener.operator.add_publisher(self.sink)
        self.thread = threading.Thread(target=listener.start, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()

    def names(self) -> list[str]:
        return [e.metadata["filename"] for e in self.sink.events]


def test_folder_listener_emits_new_files_while_running(tmp_path):
    old = np.arange(3)
    np.save(tmp_path / "old.npy", old)  # already there: not emitted (existing = false)
    listener = PollCounting(tmp_path, pattern="*", poll_s=0.01)
    with Running(listener) as running:
        wait_for(lambda: listener.polls >= 1)
        frame = np.random.default_rng(6).integers(0, 100, (8, 9)).astype(np.uint16)
        save_npy(tmp_path / "a.npy", frame)
        wait_for(lambda: running.names() == ["a.npy"])
        (tmp_path / "b.raw").write_bytes(b"\x00\x01raw")

        # A file still being written: a header and half the data, then a pause.
        big = np.arange(4096, dtype=np.float64).reshape(64, 64)
        buffer = io.BytesIO()
        np.save(buffer, big)
        content = buffer.getvalue()
        with (tmp_path / "c.npy").open("wb") as f:
            f.write(content[: len(content) // 2])
            f.flush()
            at = listener.polls
            wait_for(lambda: listener.polls >= at + 4)
            assert "c.npy" not in running.names()  # half a file is never emitted
            f.write(content[len(content) // 2 :])
        wait_for(lambda: "c.npy" in running.names())
    messages = running.sink.messages
    assert isinstance(messages[0], Start) and messages[0].data["path"] == str(tmp_path)
    assert isinstance(messages[-1], Stop) and messages[-1].data == {"files": 3}
    assert sorted(running.names()) == ["a.npy", "b.raw", "c.npy"]  # each once
    by_name = {e.metadata["filename"]: e for e in running.sink.events}
    assert np.array_equal(by_name["a.npy"].payload, frame)
    assert by_name["a.npy"].metadata["size"] == (tmp_path / "a.npy").stat().st_size
    assert by_name["a.npy"].metadata["mtime"] == pytest.approx(
        (tmp_path / "a.npy").stat().st_mtime, abs=1e-3
    )
    assert by_name["b.raw"].payload == b"\x00\x01raw"
    assert np.array_equal(by_name["c.npy"].payload, big)


def test_folder_listener_poll_by_poll(tmp_path):
    """Size stable across two polls; a stable but truncated file waits for a change."""
    listener = FolderListener(tmp_path, run_per="none", existing=True)
    sink = CollectingPublisher()
    listener.set_operator(PassThrough())
    listener.operator.add_publisher(sink)
    np.save(tmp_path / "x.npy", np.ones(3))
    listener.poll()
    assert sink.events == []  # first sight
    listener.poll()
    assert [e.metadata["filename"] for e in sink.events] == ["x.npy"]
    full = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "y.npy").write_bytes(full[:-8])  # a writer that paused
    listener.poll()
    listener.poll()  # stable now, but it does not load: skipped, not emitted
    listener.poll()
    assert len(sink.events) == 1
    (tmp_path / "y.npy").write_bytes(full)
    listener.poll()
    listener.poll()
    assert [e.metadata["filename"] for e in sink.events] == ["x.npy", "y.npy"]
    listener.poll()
    assert len(sink.events) == 2  # each file once
    (tmp_path / "x.npy").unlink()
    listener.poll()
    np.save(tmp_path / "x.npy", np.zeros(2))  # the same name again: a new file
    listener.poll()
    listener.poll()
    assert [e.metadata["filename"] for e in sink.events] == ["x.npy", "y.npy", "x.npy"]
    assert sink.events[-1].payload.tolist() == [0.0, 0.0]


def test_folder_listener_waits_for_a_growing_raw_file(tmp_path):
    listener = FolderListener(tmp_path, pattern="*.raw", run_per="none")
    sink = CollectingPublisher()
    listener.set_operator(PassThrough())
    listener.operator.add_publisher(sink)
    with (tmp_path / "scan.raw").open("wb") as f:
        for chunk in (b"aaaa", b"bbbb", b"cc"):
            f.write(chunk)
            f.flush()
            listener.poll()  # it grew since the last poll: not yet
        assert sink.events == []
        listener.poll()  # unchanged since the last poll: taken
    assert [e.payload for e in sink.events] == [b"aaaabbbbcc"]
    assert sink.events[0].metadata["size"] == 10


def test_folder_listener_existing_files_and_npz(tmp_path):
    np.savez(tmp_path / "pair.npz", a=np.arange(4), b=np.eye(2))
    (tmp_path / "skip.txt").write_text("not matched")
    listener = PollCounting(tmp_path, pattern="*.np[yz]", poll_s=0.01, existing=True)
    with Running(listener) as running:
        wait_for(lambda: running.names() == ["pair.npz"])
    payload = running.sink.events[0].payload
    assert set(payload) == {"a", "b"} and payload["b"].tolist() == [[1, 0], [0, 1]]


def test_folder_listener_stop_is_prompt(tmp_path):
    listener = PollCounting(tmp_path / "not-yet", poll_s=60.0, run_per="none")
    running = Running(listener)
    with running:
        wait_for(lambda: listener.polls >= 1)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    assert running.sink.messages == []


# -- RunFolderWriter -----------------------------------------------------------------


def write_runs(writer: RunFolderWriter, messages: list[Message]) -> None:
    run_chain(ListListener(messages), PassThrough(), writer)


def test_run_folder_writer_npz(tmp_path):
    run = make_run(5, shape=(3, 4), run=7, data={"sample": "LaB6"})
    writer = RunFolderWriter(tmp_path / "out")
    write_runs(writer, run)
    folder = tmp_path / "out" / "run_00007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "events.jsonl",
        "frames.npz",
        "start.json",
        "stop.json",
    ]
    with np.load(folder / "frames.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == [f"frame_{i:06d}" for i in range(5)]
        for e in events_of(run):
            assert np.array_equal(npz[f"frame_{e.seq:06d}"], e.payload)
            assert npz[f"frame_{e.seq:06d}"].dtype == np.uint16
    start = json.loads((folder / "start.json").read_text())
    assert start["run"] == 7 and start["data"] == {"sample": "LaB6"}
    stop = json.loads((folder / "stop.json").read_text())
    assert stop == {"run": 7, "events": 5, "written": 5, "complete": True, "data": {}}
    lines = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    assert [(x["seq"], x["metadata"]["frame"]) for x in lines] == [(i, i) for i in range(5)]


def test_run_folder_writer_npy_per_event_and_payload_kinds(tmp_path):
    writer = RunFolderWriter(tmp_path, format="npy")
    writer.setup()
    writer.publish(Start(data={}, run=2))
    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    writer.publish(event(image, seq=0, run=2))
    folder = tmp_path / "run_00002"
    assert np.array_equal(np.load(folder / "frame_000000.npy"), image)  # before the Stop
    profile = {"r": np.arange(3.0), "I": np.ones(3)}
    writer.publish(event(profile, seq=1, run=2))
    writer.publish(event(b"abc", seq=2, run=2))
    writer.publish(event(None, seq=3, run=2, roi_sums=[np.int64(5)]))
    writer.publish(Stop(data={"incomplete": True}, run=2, seq=4))
    writer.close()
    assert np.array_equal(np.load(folder / "frame_000001_I.npy"), profile["I"])
    assert np.array_equal(np.load(folder / "frame_000001_r.npy"), profile["r"])
    assert (folder / "frame_000002.bin").read_bytes() == b"abc"
    assert not list(folder.glob("*.partial"))
    stop = json.loads((folder / "stop.json").read_text())
    assert stop["complete"] is False and stop["written"] == 4
    last = json.loads((folder / "events.jsonl").read_text().splitlines()[-1])
    assert last == {"seq": 3, "metadata": {"roi_sums": [5]}, "arrays": []}


def test_run_folder_writer_never_mixes_runs_and_closes_open_ones(tmp_path):
    write_runs(RunFolderWriter(tmp_path), make_run(2, run=1))
    writer = RunFolderWriter(tmp_path)
    writer.setup()
    for m in make_run(3, run=1)[:-1]:  # a restarted source numbers runs from 1 again
        writer.publish(m)
    writer.close()  # no Stop came
    again = tmp_path / "run_00001-2"
    assert writer.folders == [again]
    with np.load(again / "frames.npz") as npz:
        assert len(npz.files) == 3
    stop = json.loads((again / "stop.json").read_text())
    assert stop["complete"] is False and stop["closed_without_stop"] is True
    with np.load(tmp_path / "run_00001" / "frames.npz") as npz:
        assert len(npz.files) == 2
