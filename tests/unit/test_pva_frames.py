"""The PVA listener's NTNDArray reading and run rule, without pvapy (a dict stands in
for a PvObject: the listener copies a PvObject's fields into one anyway)."""

from __future__ import annotations

import io
import sys
from typing import Any

import numpy as np
import pytest

from arroyo.errors import ConfigError, WireError
from arroyo.io._pva_frames import (
    SKIPPED,
    UNDECODED,
    IdRuns,
    acquiring,
    payload_of,
    servable,
    shape_of,
)
from arroyo.message import LOST, Encoded, Start, Stop


def ntndarray(value: Any, shape: tuple[int, ...], codec: str = "", kind: int = 0) -> dict:
    return {
        "uniqueId": 1,
        "dimension": [{"size": n} for n in reversed(shape)],
        "codec": {"name": codec, "parameters": ({"value": kind}, {})},
        "value": (value, {}),
        "attribute": [],
        "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": 5},
    }


def test_a_raw_array_is_its_dimensions_reversed_without_a_copy():
    pixels = np.arange(12, dtype=np.uint16)
    frame = ntndarray({"ushortValue": pixels}, (3, 4))
    assert shape_of(frame) == (3, 4)
    payload, codec = payload_of(frame, (3, 4))
    assert codec == "" and payload.shape == (3, 4) and payload.dtype == np.uint16
    assert np.shares_memory(payload, pixels)


def test_pixels_that_do_not_fill_the_dimensions_are_refused():
    frame = ntndarray({"ushortValue": np.arange(10, dtype=np.uint16)}, (3, 4))
    with pytest.raises(WireError) as e:
        payload_of(frame, (3, 4))
    assert e.value.reason == "bad_ntndarray"


def test_an_unknown_codec_is_refused():
    frame = ntndarray({"ubyteValue": np.zeros(8, np.uint8)}, (2, 2), "zip", 6)
    with pytest.raises(WireError) as e:
        payload_of(frame, (2, 2))
    assert e.value.reason == "unknown_codec"


CODECS = [("lz4", "lz4-block", "lz4"), ("bslz4", "bslz4-bare", "bslz4")]


@pytest.mark.parametrize(("codec", "bare", "framed"), CODECS)
def test_lz4_and_bslz4_travel_compressed_bare_or_hdf5_framed(codec, bare, framed):
    pytest.importorskip("bitshuffle")
    pytest.importorskip("lz4")
    from arroyo.compression import compress

    image = np.random.default_rng(1).integers(0, 500, (16, 24)).astype(np.uint16)
    for ours in (bare, framed):
        raw = np.frombuffer(compress(ours, image), np.uint8)
        payload, name = payload_of(
            ntndarray({"ubyteValue": raw}, image.shape, codec, 6), image.shape
        )
        assert name == ours and isinstance(payload, Encoded)
        assert np.array_equal(payload.decode(), image)


def test_blosc_is_decoded_in_the_listener_when_installed():
    blosc2 = pytest.importorskip("blosc2")
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    raw = np.frombuffer(blosc2.compress(image.tobytes(), typesize=4), np.uint8)
    payload, name = payload_of(ntndarray({"ubyteValue": raw}, (8, 8), "blosc", 9), (8, 8))
    assert name == "" and np.array_equal(payload, image)


def test_blosc_without_its_library_is_a_clear_drop(monkeypatch):
    monkeypatch.setitem(sys.modules, "blosc2", None)
    monkeypatch.setitem(sys.modules, "blosc", None)
    frame = ntndarray({"ubyteValue": np.zeros(40, np.uint8)}, (2, 2), "blosc", 5)
    with pytest.raises(WireError) as e:
        payload_of(frame, (2, 2))
    assert e.value.reason == "no_decoder_blosc"


def test_jpeg_is_decoded_in_the_listener_when_pillow_is_installed():
    image_module = pytest.importorskip("PIL.Image")
    image = np.full((8, 12), 100, np.uint8)
    out = io.BytesIO()
    image_module.fromarray(image).save(out, format="JPEG")
    raw = np.frombuffer(out.getvalue(), np.uint8)
    payload, _ = payload_of(ntndarray({"ubyteValue": raw}, (8, 12), "jpeg", 5), (8, 12))
    assert payload.shape == (8, 12) and abs(int(payload.mean()) - 100) <= 2


def test_runs_follow_the_unique_ids():
    runs = IdRuns(max_gap=5)
    assert [type(m) for m in runs.admit(1, {})] == [Start]  # type: ignore[union-attr]
    assert runs.admit(2, {}) == []
    assert runs.admit(2, {}) == "repeat"
    assert runs.admit(5, {}) == []  # 3 and 4 skipped
    runs.events, runs.undecoded = 3, 1
    stop, start = runs.admit(20, {})  # type: ignore[misc]  # a jump past max_gap
    assert isinstance(stop, Stop) and isinstance(start, Start)
    assert stop.data["closed_by"] == "uniqueId jumped" and stop.data["skipped_uniqueIds"] == 2
    assert stop.routing[LOST] == {SKIPPED: 2, UNDECODED: 1}
    stop, _ = runs.admit(1, {})  # type: ignore[misc]  # the counter went back
    assert stop.data["closed_by"] == "uniqueId went back" and LOST not in stop.routing
    [stop] = runs.close("idle")
    assert stop.data["first_uniqueId"] == stop.data["last_uniqueId"] == 1
    assert runs.close("idle") == []


def test_the_core_imports_without_pvapy_and_a_stage_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pvaccess", None)
    from arroyo.io.epics import PvaListener, PvaPublisher

    with pytest.raises(ConfigError, match=r"pip install 'arroyo\[epics\]'"):
        PvaListener(pv="x:image").setup()
    with pytest.raises(ConfigError, match="image_pv"):
        PvaPublisher()


def test_what_the_publisher_serves_is_a_type_pv_access_has():
    assert servable(np.zeros(3, bool)).dtype == np.uint8
    assert servable(np.zeros(3, np.float16)).dtype == np.float32
    big = np.arange(6, dtype=">u2").reshape(2, 3)[:, ::2]
    out = servable(big)
    assert out.dtype == np.dtype("<u2") and out.flags.c_contiguous
    assert np.array_equal(out, big)
    with pytest.raises(WireError) as e:
        servable(np.zeros(3, np.complex64))
    assert e.value.reason == "unsupported_dtype"


def test_an_acquire_state_is_an_enum_or_a_number():
    assert acquiring({"index": 1, "choices": ["Done", "Acquire"]})
    assert not acquiring({"index": 0, "choices": ["Done", "Acquire"]})
    assert acquiring(1) and not acquiring(0.0) and acquiring("Acquire")
