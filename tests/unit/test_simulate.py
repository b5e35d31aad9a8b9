"""The simulated DCU (arroyo.io.simulate): its messages, read back with cbor2's own
decoder and plain JSON, follow the public specifications, and carry the frames the
simulator says it sent, for every format x compression x dtype x channel count."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from arroyo.compression import decompress
from arroyo.errors import ConfigError
from arroyo.io import simframes
from arroyo.io.simulate import Settings, Simulator, parse_ids, unique_id
from tests.conftest import arroyo_bin, need_detectors

need_detectors()

import cbor2  # noqa: E402  (the detectors extra: checked just above)

TYPED = {64: "|u1", 69: "<u2", 70: "<u4", 85: "<f4"}
V1_CODECS = {"<": "none", "lz4<": "lz4-block"}


def cbor_tags(tag: cbor2.CBORTag, immutable: bool) -> object:
    return tag  # keep every tag to check it by hand


def loads(frame: bytes) -> dict:
    assert frame[:3] == b"\xd9\xd9\xf7"  # self-described CBOR (tag 55799), as the DCU sends
    return cbor2.loads(frame, tag_hook=cbor_tags)


def v2_array(item: cbor2.CBORTag) -> np.ndarray:
    """Decode #6.40([dims, #6.TYPED(bytes | #6.56500([codec, elem, bytes]))])."""
    assert item.tag == 40
    dims, typed = item.value
    dtype = np.dtype(TYPED[typed.tag])
    content = typed.value
    if isinstance(content, cbor2.CBORTag):
        assert content.tag == 56500
        codec, elem, data = content.value
        assert elem == (dtype.itemsize if codec == "bslz4" else 0)
        return decompress(codec, data, dtype, tuple(dims))
    return np.frombuffer(content, dtype).reshape(dims)


def images_of(sim: Simulator) -> list[tuple[str, list[bytes]]]:
    return list(sim.messages())


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("compression", ["none", "lz4", "bslz4"])
@pytest.mark.parametrize("channels", [1, 3])
def test_stream2_messages_carry_the_frames(dtype, compression, channels):
    s = Settings(
        dtype=dtype,
        compression=compression,
        channels=channels,
        shape=(40, 56),
        images=5,
        seed=3,
        header_detail="all",
        user_data={"sample": "Si"},
    )
    sim = Simulator(s)
    messages = images_of(sim)
    assert [k for k, _ in messages] == ["start"] + ["image"] * 5 + ["end"]
    start = loads(messages[0][1][0])
    assert next(iter(start)) == "type" and start["type"] == "start"
    assert start["number_of_images"] == 5 and list(start["channels"]) == s.channel_names
    assert (start["image_size_x"], start["image_size_y"]) == (56, 40)
    assert start["user_data"] == {"sample": "Si"}
    assert len(start["series_unique_id"]) == 26
    mask = v2_array(start["pixel_mask"]["threshold_1"])
    np.testing.assert_array_equal(mask, simframes.pixel_mask((40, 56), 3))
    assert v2_array(start["flatfield"][s.channel_names[-1]]).dtype == np.float32
    for image_id, (_, frames) in enumerate(messages[1:-1]):
        (frame,) = frames
        msg = loads(frame)
        assert next(iter(msg)) == "type" and msg["type"] == "image"
        assert msg["image_id"] == image_id
        assert msg["series_unique_id"] == start["series_unique_id"]
        assert msg["start_time"][1] == msg["stop_time"][1] == 50_000_000
        assert list(msg["data"]) == s.channel_names  # in the start's order
        for name, want in zip(s.channel_names, sim.frame(image_id), strict=True):
            got = v2_array(msg["data"][name])
            assert got.dtype == np.dtype(dtype) and got.shape == (40, 56)
            np.testing.assert_array_equal(got, want)
    end = loads(messages[-1][1][0])
    assert end == {"type": "end", "series_id": 1, "series_unique_id": start["series_unique_id"]}


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
@pytest.mark.parametrize("compression", ["none", "lz4", "bslz4"])
@pytest.mark.parametrize("detail", ["none", "basic", "all"])
def test_stream1_messages_carry_the_frames(dtype, compression, detail):
    s = Settings(
        format="dectris-stream1",
        dtype=dtype,
        compression=compression,
        shape=(24, 32),
        images=3,
        header_detail=detail,
    )
    sim = Simulator(s)
    messages = images_of(sim)
    header = messages[0][1]
    assert len(header) == {"none": 1, "basic": 2, "all": 8}[detail]
    assert json.loads(header[0]) == {"htype": "dheader-1.0", "series": 1, "header_detail": detail}
    if detail == "all":
        assert json.loads(header[4])["htype"] == "dpixelmask-1.0"
        mask = np.frombuffer(header[5], np.uint32).reshape(24, 32)
        np.testing.assert_array_equal(mask, simframes.pixel_mask((24, 32), 0))
    for image_id, (_, parts) in enumerate(messages[1:-1]):
        assert len(parts) == 4
        head, info, blob, config = parts
        assert json.loads(head)["frame"] == image_id
        info = json.loads(info)
        assert info["shape"] == [32, 24]  # [x, y]
        assert info["size"] == len(blob) and info["type"] == dtype
        bits = np.dtype(dtype).itemsize * 8
        codec = "bslz4" if info["encoding"] == f"bs{bits}-lz4<" else V1_CODECS[info["encoding"]]
        got = decompress(codec, blob, np.dtype(dtype).newbyteorder("<"), (24, 32))
        np.testing.assert_array_equal(got, sim.frame(image_id)[0])
        assert json.loads(config)["htype"] == "dconfig-1.0"
    assert json.loads(messages[-1][1][0]) == {"htype": "dseries_end-1.0", "series": 1}


@pytest.mark.parametrize("compression", ["none", "bslz4"])
def test_htype_messages_are_numbered_and_carry_the_frames(compression):
    s = Settings(
        format="htype",
        compression=compression,
        shape=(16, 24),
        images=4,
        series=2,
        drop=frozenset({2}),
    )
    sim = Simulator(s)
    heads = []
    for kind, parts in images_of(sim):
        head = json.loads(parts[0])
        heads.append(head)
        if kind == "image":
            assert head["compression"] == compression and head["shape"] == [16, 24]
            got = decompress(compression, parts[1], np.dtype("<u2"), (16, 24))
            np.testing.assert_array_equal(got, sim.frame(head["frame"])[0])
    assert [h["htype"] for h in heads] == ["header", *["image"] * 3, "series_end"] * 2
    # msg_number counts every message, the dropped image's too (a gap shows the loss)
    assert [h["msg_number"] for h in heads][:5] == [0, 1, 2, 4, 5]
    assert [h.get("frame") for h in heads[1:4]] == [0, 1, 3]


def test_hooks_drop_repeat_and_no_end():
    s = Settings(
        shape=(8, 8),
        images=6,
        series=3,
        drop=parse_ids("1,3-4"),
        repeat_series_id=True,
        no_end=True,
        first_series_id=7,
    )
    messages = [(k, loads(f[0])) for k, f in Simulator(s).messages()]
    assert [k for k, _ in messages] == (["start"] + ["image"] * 3) * 3
    starts = [m for k, m in messages if k == "start"]
    assert {m["series_id"] for m in starts} == {7}
    assert len({m["series_unique_id"] for m in starts}) == 3
    assert [m["image_id"] for k, m in messages[:4] if k == "image"] == [0, 2, 5]


def test_frames_look_like_a_detector_and_follow_the_seed():
    a = Simulator(Settings(shape=(128, 160), seed=5))
    b = Simulator(Settings(shape=(128, 160), seed=5))
    for i in range(simframes.POOL):
        np.testing.assert_array_equal(a.frame(i)[0], b.frame(i)[0])
    frame = a.frame(0)[0]
    mask = simframes.pixel_mask((128, 160), 5)
    assert (frame[mask & simframes.MASK_GAP > 0] == 65535).all()  # NODATA in the gaps
    assert (frame[mask == simframes.MASK_HOT] == 65535).all()  # and on hot pixels
    unmasked = Simulator(Settings(shape=(128, 160), seed=5, pixel_mask=False)).frame(0)[0]
    assert (unmasked[mask & simframes.MASK_GAP > 0] == 0).all()  # no sensor in the gaps
    assert (unmasked[mask == simframes.MASK_HOT] == 8 * 200).all()  # hot pixels count
    assert not (a.frame(0)[0] == a.frame(1)[0]).all()  # Poisson noise: frames differ
    ok = frame[mask == 0].astype(float)
    assert 0 < ok.mean() < 200 and ok.max() > 5 * ok.mean()  # rings above background
    assert len(a.blobs[0][0].data) < frame.nbytes / 2  # bslz4 shrinks it


def test_settings_refuse_what_the_format_cannot_carry():
    with pytest.raises(ConfigError, match="one channel"):
        Settings(format="dectris-stream1", channels=2)
    with pytest.raises(ConfigError, match="does not carry lz4"):
        Settings(format="htype", compression="lz4")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Settings(dtype="float64")
    assert unique_id() != unique_id()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "stream9"], "format must be one of"),
        (["--shape", "12"], "shape must be ROWS,COLUMNS"),
        (["--images", "ten"], "images must be a whole number"),
        (["--drop", "5-2"], "drop must be image ids"),
        (["--rate", "fast"], "rate must be images per second"),
        (["--user-data", "{"], "user data must be JSON"),
        (["--endpoint", "localhost"], "endpoint must be like"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, says):
    result = subprocess.run(
        [arroyo_bin("arroyo"), "simulate", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
