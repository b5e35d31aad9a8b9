"""NexusWriter in one process: real files, read back with h5py + hdf5plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.compression import HEADER, compress, default_block
from arroyo.errors import ConfigError
from arroyo.message import LOST, Encoded, Event, Start, Stop
from tests.conftest import need_detectors, need_hdf5

need_hdf5()
need_detectors()  # (compress() makes the detector-style frames)

import h5py  # noqa: E402
import hdf5plugin  # noqa: E402, F401  (registers the filters for reading)

from arroyo.io.hdf5 import NexusWriter  # noqa: E402

pytestmark = pytest.mark.timeout(30)
RNG = np.random.default_rng(3)


def frame(dtype: str = "<u2", shape: tuple[int, ...] = (24, 40)) -> np.ndarray:
    return RNG.poisson(4, shape).astype(dtype)


def write(tmp_path: Path, messages: list[Any], **options: Any) -> NexusWriter:
    writer = NexusWriter(tmp_path / "nx", **options)
    writer.setup()
    for m in messages:
        writer.publish(m)
    writer.close()
    return writer


def run_of(events: list[Event], run: int = 1, **start: Any) -> list[Any]:
    for i, e in enumerate(events):
        e.run, e.seq = run, i
    return [Start(data=start, run=run), *events, Stop(run=run, seq=len(events))]


@pytest.mark.parametrize("codec", ["bslz4", "bslz4-bare", "lz4"])
def test_compressed_frames_go_in_as_direct_chunks_byte_for_byte(tmp_path, codec):
    frames = [frame() for _ in range(5)]
    packed = [compress(codec, f) for f in frames]
    events = [
        Event({"i": i}, Encoded(codec, f.dtype, f.shape, p))
        for i, (f, p) in enumerate(zip(frames, packed, strict=True))
    ]
    writer = write(tmp_path, run_of(events))
    assert writer.stats()["direct_chunks"] == 5 and writer.stats()["compressed_here"] == 0
    with h5py.File(writer.files[0]) as f:
        dset = f["entry/data/data"]
        assert dset.shape == (5, 24, 40) and dset.chunks == (1, 24, 40)
        assert list(dset._filters) == (["32004"] if codec == "lz4" else ["32008"])
        for i, p in enumerate(packed):
            mask, raw = dset.id.read_direct_chunk((i, 0, 0))
            if codec == "bslz4-bare":  # the filter's header, then the stream as it came
                p = HEADER.pack(frames[i].nbytes, default_block(2) * 2) + p
            assert mask == 0 and raw == p
            np.testing.assert_array_equal(dset[i], frames[i])


def test_decoded_arrays_are_compressed_with_bitshuffle_lz4_by_default(tmp_path):
    frames = [frame("<u4") for _ in range(3)]
    writer = write(tmp_path, run_of([Event({}, f) for f in frames]))
    assert writer.stats()["compressed_here"] == 3
    with h5py.File(writer.files[0]) as f:
        dset = f["entry/data/data"]
        assert "32008" in dset._filters
        np.testing.assert_array_equal(dset[:], np.stack(frames))


@pytest.mark.parametrize("compression", ["none", "gzip", "lz4"])
def test_compression_option(tmp_path, compression):
    frames = [frame() for _ in range(2)]
    events = [Event({}, Encoded("bslz4", f.dtype, f.shape, compress("bslz4", f))) for f in frames]
    writer = write(tmp_path, run_of(events), compression=compression)
    assert writer.stats()["direct_chunks"] == 0  # decoded, then the dataset's filter
    with h5py.File(writer.files[0]) as f:
        np.testing.assert_array_equal(f["entry/data/data"][:], np.stack(frames))


def test_frames_that_do_not_fit_the_run_are_dropped_and_counted(tmp_path):
    good = [frame() for _ in range(3)]
    events = [
        Event({"k": 0}, good[0]),
        Event({"k": 1}, frame(shape=(24, 41))),
        Event({"k": 2}, frame(dtype="<u4")),
        Event({"k": 3}, b"opaque"),
        Event({"k": 4}, good[1]),
        Event({"k": 5}, {"a": good[2], "b": good[2]}),
        Event({"k": 6}, Encoded("bslz4", "<u2", (24, 40), b"\0" * 40)),  # header says 0 bytes
        Event({"k": 7}, good[2]),
    ]
    writer = write(tmp_path, run_of(events))
    assert writer.drops() == {
        "shape_mismatch": 1,
        "dtype_mismatch": 1,
        "bytes_payload": 1,
        "layout": 1,
        "size": 1,
    }
    with h5py.File(writer.files[0]) as f:
        np.testing.assert_array_equal(f["entry/data/data"][:], np.stack(good))
        assert list(f["entry/data/k"][:]) == [0, 4, 7]
        assert list(f["entry/data/seq"][:]) == [0, 4, 7]
        entry = dict(f["entry"].attrs)
    assert entry["events_received"] == 8 and entry["events_written"] == 3
    assert entry["complete"] and entry["events_emitted"] == 8


def test_dict_payloads_one_dataset_per_array_or_the_chosen_one(tmp_path):
    a, b = frame(), frame("<u4", (8, 8))
    writer = write(tmp_path, run_of([Event({}, {"t1": a, "t2": b})]))
    with h5py.File(writer.files[0]) as f:
        data = f["entry/data"]
        assert data.attrs["signal"] == "t1" and list(data.attrs["auxiliary_signals"]) == ["t2"]
        np.testing.assert_array_equal(data["t2"][0], b)
    writer = write(tmp_path, run_of([Event({}, {"t1": a, "t2": b})], run=2), array="t2")
    with h5py.File(writer.files[-1]) as f:
        assert f["entry/data"].attrs["signal"] == "data"
        np.testing.assert_array_equal(f["entry/data/data"][0], b)


def test_scalars_missing_later_are_filled_and_new_keys_not_kept(tmp_path):
    events = [
        Event({"x": 1.5, "n": 3, "flag": True, "name": "a"}, frame()),
        Event({"x": 2.5, "extra": 9}, frame()),
    ]
    writer = write(tmp_path, run_of(events))
    with h5py.File(writer.files[0]) as f:
        data = f["entry/data"]
        assert sorted(data) == ["data", "flag", "n", "seq", "timestamp_ns", "x"]
        assert list(data["x"][:]) == [1.5, 2.5]
        assert list(data["n"][:]) == [3, -1] and list(data["flag"][:]) == [True, False]
        assert data["timestamp_ns"][1] == events[1].timestamp_ns
    assert writer.counts["scalars_missing"] == 2 and writer.counts["scalars_not_kept"] == 1


def test_start_metadata_the_detector_arrays_and_nexus_classes(tmp_path):
    mask = (RNG.random((24, 40)) < 0.01).astype("<u4")
    start = {
        "pixel_mask": mask,
        "flatfield_threshold_2": np.ones((24, 40), "<f4"),
        "count_time": 0.001,
        "sensor_material": "Si",
        "incident_energy": 12398.4,
        "channels": ["threshold_1"],
        "translation": [0.0, 0.0, 0.12],
        "goniometer": {"omega": {"start": 0.0, "increment": 0.1}},
        "user_data": None,
        "mixed": [1, "a"],
        "a/b": 1,
    }
    writer = write(tmp_path, run_of([Event({}, frame())], **start))
    with h5py.File(writer.files[0]) as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "entry"
        assert f["entry"].attrs["NX_class"] == "NXentry"
        det = f["entry/instrument/detector"]
        assert det.attrs["NX_class"] == "NXdetector"
        np.testing.assert_array_equal(det["pixel_mask"][:], mask)
        assert det["flatfield_threshold_2"].shape == (24, 40)
        assert det["count_time"][()] == 0.001 and det["count_time"].attrs["units"] == "s"
        assert f["entry/instrument/beam/incident_energy"].attrs["units"] == "eV"
        s = f["entry/start"]
        assert s.attrs["NX_class"] == "NXcollection" and "pixel_mask" not in s
        assert s["sensor_material"][()] == b"Si" and list(s["translation"][:]) == [0, 0, 0.12]
        assert [c.decode() for c in s["channels"][:]] == ["threshold_1"]
        assert s["goniometer/omega/increment"][()] == 0.1
        assert s["mixed"][()] == b'[1, "a"]' and s["a_b"][()] == 1 and "user_data" not in s
        assert f["entry/start_time"][()].decode().startswith("20")


def test_stop_and_completeness_attributes(tmp_path):
    events = [Event({}, frame()) for _ in range(3)]
    messages = run_of(events)
    messages[-1] = Stop(
        data={"incomplete": True, "images_received": 3},
        run=1,
        seq=5,
        routing={LOST: {"images the detector stream lost": 2}},
    )
    writer = write(tmp_path, [*messages, Start(run=2), Event({}, frame(), run=2)])
    with h5py.File(writer.files[0]) as f:
        attrs = dict(f["entry"].attrs)
        assert f["entry/stop/images_received"][()] == 3
        assert "end_time" in f["entry"]
    assert attrs["incomplete"] and not attrs["complete"] and attrs["missing"] == 2
    assert attrs["missing_reason"] == "2 images the detector stream lost"
    assert (attrs["events_emitted"], attrs["events_written"]) == (5, 3)
    with h5py.File(writer.files[1]) as f:  # still open at close()
        attrs = dict(f["entry"].attrs)
    assert attrs["closed_without_stop"] and attrs["incomplete"] and attrs["events_written"] == 1
    assert writer.stats()["runs"] == 2


def test_a_run_id_seen_again_gets_a_new_file(tmp_path):
    writer = write(tmp_path, run_of([Event({}, frame())]) + run_of([Event({}, frame())]))
    assert [p.name for p in writer.files] == ["run_00001.h5", "run_00001-2.h5"]


def test_bad_options_name_the_option_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"compression must be one of .*'zstd'"):
        NexusWriter(tmp_path, compression="zstd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flush_every must be >= 1, got 0"):
        NexusWriter(tmp_path, flush_every=0)


def test_without_the_extra_setup_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    with pytest.raises(ConfigError, match=r"h5py is not installed: pip install 'arroyo\[hdf5\]'"):
        NexusWriter(tmp_path).setup()


def test_the_core_and_the_module_import_without_h5py():
    code = (
        "import sys; sys.modules['h5py'] = None; sys.modules['hdf5plugin'] = None\n"
        "import arroyo.io.hdf5, arroyo.stage\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_a_run_without_payloads_is_a_run_of_scalars(tmp_path):
    events = [Event({"sum": float(i)}) for i in range(3)] + [Event({"sum": 9.0}, frame())]
    writer = write(tmp_path, run_of(events))
    assert writer.drops() == {"layout": 1}
    with h5py.File(writer.files[0]) as f:
        data = f["entry/data"]
        assert sorted(data) == ["seq", "sum", "timestamp_ns"] and data.attrs["signal"] == "seq"
        assert list(data["sum"][:]) == [0.0, 1.0, 2.0]


def test_an_empty_frame_does_not_lay_out_the_run(tmp_path):
    events = [Event({}, np.zeros((0, 4), "<u2")), Event({}, frame())]
    writer = write(tmp_path, run_of(events))
    assert writer.drops() == {"empty_frame": 1}
    with h5py.File(writer.files[0]) as f:
        assert f["entry/data/data"].shape == (1, 24, 40)


def test_a_scalar_its_column_cannot_hold_is_written_as_missing(tmp_path):
    events = [Event({"n": 1}, frame()), Event({"n": 1 << 70}, frame()), Event({"n": 3}, frame())]
    writer = write(tmp_path, run_of(events))
    with h5py.File(writer.files[0]) as f:
        assert list(f["entry/data/n"][:]) == [1, -1, 3]
