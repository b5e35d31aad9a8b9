"""The detector stream codecs (dectris-stream2, dectris-stream1, htype), in-process:
messages built here from the formats' specifications (Stream V2 encoded with cbor2,
V1 and htype with json and bytes, frames compressed with arroyo.compression) are
decoded through the listener's DecodeGuard, then carried by the wire format as a
stage downstream receives them, and compared with the original arrays."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np
import pytest

from arroyo import wire
from arroyo.compression import compress
from arroyo.errors import WireError
from arroyo.io.codecs import Codec, CodecName, get_codec
from arroyo.io.guard import DecodeGuard
from arroyo.io.series import LOST_REASON, SeriesTracker
from arroyo.message import LOST, Encoded, Event, Message, Start, Stop
from tests.conftest import need_detectors

need_detectors()

import cbor2  # noqa: E402
from cbor2 import CBORTag  # noqa: E402

pytestmark = pytest.mark.timeout(120)

DTYPES = ["uint8", "uint16", "uint32"]
TYPED_TAG = {"uint8": 64, "uint16": 69, "uint32": 70, "float32": 85}
SHAPE = (37, 53)  # rows, columns: not square, so a transposed shape cannot pass


def frame(dtype: str, seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    top = min(np.iinfo(dtype).max, 70000) if np.dtype(dtype).kind in "ui" else 1000
    rng = np.random.default_rng(seed)
    return rng.integers(0, top, size=shape).astype(np.dtype(dtype).newbyteorder("<"))


class Listener:
    """A detector codec behind the guard, as ZMQListener runs it; every message it
    emits goes through the wire format, as the next stage receives it."""

    def __init__(self, name: str, **options: Any) -> None:
        self.codec: Codec = get_codec(name, **options)
        self.guard = DecodeGuard(f"test {name}")

    def feed(self, *messages: list[Any]) -> list[Message]:
        out = []
        for frames in messages:
            for message in self.guard.decode(self.codec.decode, frames):
                out.append(wire.decode(wire.encode(message)))
        return out

    def tick(self, now: float) -> list[Message]:
        assert self.codec.tick is not None
        return self.guard.decode(self.codec.tick, now)


# -- Stream V2, from its specification ------------------------------------------------


def v2_array(array: np.ndarray, codec: str) -> CBORTag:
    """A MultiDimArray: tag 40 [dims, typed array (of tag 56500 when compressed)]."""
    if codec == "none":
        inner: Any = array.tobytes()
    else:
        elem = array.dtype.itemsize if codec.startswith("bs") else 0
        inner = CBORTag(56500, [codec, elem, compress(codec, array)])
    return CBORTag(40, [list(array.shape), CBORTag(TYPED_TAG[array.dtype.name], inner)])


def v2(message: dict[str, Any]) -> list[bytes]:
    return [cbor2.dumps(CBORTag(55799, message))]  # DECTRIS self-describes each message


def v2_start(uid: str = "u1", sid: int = 1, n: int = 3, **fields: Any) -> list[bytes]:
    start = {
        "type": "start",
        "series_id": sid,
        "series_unique_id": uid,
        "number_of_images": n,
        "channels": ["threshold_1"],
        "arm_date": CBORTag(0, "2024-05-01T10:00:00Z"),
        "beam_center_x": 512.5,
        "beam_center_y": 480.25,
        "count_time": 0.001,
        "frame_time": 0.0011,
        "detector_distance": 0.12,
        "incident_energy": 12400.0,
        "incident_wavelength": 0.99987,
        "pixel_size_x": 75e-6,
        "pixel_size_y": 75e-6,
        "detector_description": "Dectris EIGER2 Si 500K",
        "threshold_energy": {"threshold_1": 6200.0},
        "goniometer": {"omega": {"start": 0.0, "increment": 0.1}},
        "user_data": {"sample": "lysozyme"},
    }
    return v2({**start, **fields})


def v2_image(i: int, arrays: dict[str, CBORTag], uid: str = "u1", sid: int = 1) -> list[bytes]:
    return v2(
        {
            "type": "image",
            "series_id": sid,
            "series_unique_id": uid,
            "image_id": i,
            "series_date": CBORTag(0, "2024-05-01T10:00:01Z"),
            "start_time": [i * 11, 10000],
            "stop_time": [i * 11 + 10, 10000],
            "real_time": [10, 10000],
            "user_data": {"i": i},
            "data": arrays,
        }
    )


def v2_end(uid: str = "u1", sid: int = 1) -> list[bytes]:
    return v2({"type": "end", "series_id": sid, "series_unique_id": uid})


def kinds(messages: list[Message]) -> list[str]:
    return [type(m).__name__ for m in messages]


@pytest.mark.parametrize("codec", ["none", "lz4", "bslz4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_stream_v2_images_decode_exactly(codec: str, dtype: str, channels: int) -> None:
    names = ["threshold_1", "threshold_2", "difference"][:channels]
    listener = Listener("dectris-stream2")
    frames = {i: {c: frame(dtype, 10 * i + k) for k, c in enumerate(names)} for i in range(3)}
    # the data map in another order than the start's channels: the start's order counts
    images = [
        v2_image(i, {c: v2_array(frames[i][c], codec) for c in reversed(names)}) for i in range(3)
    ]
    out = listener.feed(v2_start(channels=names), *images, v2_end())
    assert kinds(out) == ["Start", "Event", "Event", "Event", "Stop"]
    for i, event in enumerate(out[1:4]):
        assert isinstance(event, Event)
        held = event.raw_payload if channels == 1 else next(iter(event.raw_payload.values()))
        assert isinstance(held, Encoded if codec != "none" else np.ndarray)  # not decoded yet
        if channels == 1:
            assert np.array_equal(event.payload, frames[i]["threshold_1"])
            assert event.payload.dtype == np.dtype(dtype)
        else:
            assert list(event.payload) == names
            for c in names:
                assert np.array_equal(event.payload[c], frames[i][c])
        assert event.metadata["image_id"] == i
        assert event.metadata["series_unique_id"] == "u1"
        assert event.metadata["start_time"] == pytest.approx(i * 11 / 10000)
        assert event.metadata["stop_time"] == pytest.approx((i * 11 + 10) / 10000)
        assert event.metadata["real_time"] == pytest.approx(0.001)
        assert event.metadata["user_data"] == {"i": i}
        assert event.metadata["channels"] == names
    assert listener.guard.drops() == {}


def test_stream_v2_channel_option_picks_one_channel() -> None:
    names = ["threshold_1", "threshold_2"]
    listener = Listener("dectris-stream2", channel="threshold_2")
    one, two = frame("uint16", 1), frame("uint16", 2)
    image = v2_image(
        0, {"threshold_1": v2_array(one, "bslz4"), "threshold_2": v2_array(two, "bslz4")}
    )
    out = listener.feed(v2_start(channels=names), image)
    event = out[1]
    assert isinstance(event, Event)
    assert isinstance(event.payload, np.ndarray) and np.array_equal(event.payload, two)
    assert event.metadata["channels"] == ["threshold_2"]
    missing = Listener("dectris-stream2", channel="threshold_9")
    assert kinds(missing.feed(v2_start(channels=names), image)) == ["Start"]
    assert missing.guard.drops() == {"no_channel": 1}


def test_stream_v2_start_carries_the_header_and_its_arrays() -> None:
    names = ["threshold_1", "threshold_2"]
    flat = {c: np.random.default_rng(k).random(SHAPE).astype("<f4") for k, c in enumerate(names)}
    mask = {
        c: (np.arange(np.prod(SHAPE)).reshape(SHAPE) % (7 + k)).astype("<u4")
        for k, c in enumerate(names)
    }
    table = np.arange(1000, dtype="<u4") * 3
    start = v2_start(
        channels=names,
        flatfield={c: v2_array(flat[c], "none") for c in names},
        pixel_mask={c: v2_array(mask[c], "bslz4") for c in names},  # compressed: decoded at once
        countrate_correction_lookup_table=CBORTag(70, table.tobytes()),
    )
    (both,) = Listener("dectris-stream2").feed(start)
    assert isinstance(both, Start)
    data = both.data
    for c in names:
        assert isinstance(data[f"flatfield_{c}"], np.ndarray)
        assert np.array_equal(data[f"flatfield_{c}"], flat[c])
        assert np.array_equal(data[f"pixel_mask_{c}"], mask[c])
    assert np.array_equal(data["countrate_correction_lookup_table"], table)
    assert data["incident_energy"] == 12400.0 and data["beam_center_y"] == 480.25
    assert data["number_of_images"] == 3 and data["channels"] == names
    assert data["detector_description"] == "Dectris EIGER2 Si 500K"
    assert data["threshold_energy"] == {"threshold_1": 6200.0}
    assert data["goniometer"] == {"omega": {"start": 0.0, "increment": 0.1}}
    assert data["arm_date"] == "2024-05-01T10:00:00Z"
    assert data["user_data"] == {"sample": "lysozyme"}
    (one,) = Listener("dectris-stream2", channel="threshold_2").feed(start)
    assert isinstance(one, Start)
    assert np.array_equal(one.data["flatfield"], flat["threshold_2"])
    assert np.array_equal(one.data["pixel_mask"], mask["threshold_2"])
    assert "flatfield_threshold_1" not in one.data


# -- Stream V1 ------------------------------------------------------------------------


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


V1_CONFIG = {
    "nimages": 2,
    "ntrigger": 2,
    "count_time": 0.5,
    "photon_energy": 8000.0,
    "x_pixel_size": 7.5e-5,
}


def v1_start(
    series: int = 1, detail: str = "basic", config: dict[str, Any] | None = None
) -> list[bytes]:
    parts = [js({"htype": "dheader-1.0", "series": series, "header_detail": detail})]
    if detail != "none":
        parts.append(js(config if config is not None else V1_CONFIG))
    return parts


def v1_image(
    series: int, i: int, array: np.ndarray, encoding: str, appendix: Any = None
) -> list[bytes]:
    if encoding == "<":
        blob = array.tobytes()
    elif encoding == "lz4<":
        blob = compress("lz4-block", array)
    else:
        blob = compress("bslz4", array)
    rows, cols = array.shape
    parts = [
        js({"htype": "dimage-1.0", "series": series, "frame": i, "hash": "0" * 32}),
        js(
            {
                "htype": "dimage_d-1.0",
                "shape": [cols, rows],
                "type": array.dtype.name,
                "encoding": encoding,
                "size": len(blob),
            }
        ),
        blob,
        js(
            {
                "htype": "dconfig-1.0",
                "start_time": i * 1_000_000,
                "stop_time": i * 1_000_000 + 500_000,
                "real_time": 500_000,
            }
        ),
    ]
    if appendix is not None:
        parts.append(js(appendix))
    return parts


def v1_end(series: int = 1) -> list[bytes]:
    return [js({"htype": "dseries_end-1.0", "series": series})]


def v1_encoding(kind: str, dtype: str) -> str:
    return {"none": "<", "lz4": "lz4<", "bslz4": f"bs{8 * np.dtype(dtype).itemsize}-lz4<"}[kind]


@pytest.mark.parametrize("kind", ["none", "lz4", "bslz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stream_v1_images_decode_exactly(kind: str, dtype: str) -> None:
    listener = Listener("dectris-stream1")
    frames = [frame(dtype, i) for i in range(4)]
    images = [
        v1_image(7, i, f, v1_encoding(kind, dtype), {"i": i} if i == 1 else None)
        for i, f in enumerate(frames)
    ]
    out = listener.feed(v1_start(7), *images, v1_end(7))
    assert kinds(out) == ["Start", "Event", "Event", "Event", "Event", "Stop"]
    for i, event in enumerate(out[1:5]):
        assert isinstance(event, Event)
        assert isinstance(event.raw_payload, Encoded if kind != "none" else np.ndarray)
        assert event.payload.shape == SHAPE
        assert np.array_equal(event.payload, frames[i])
        assert event.metadata["image_id"] == i and event.metadata["series_id"] == 7
        assert event.metadata["start_time"] == pytest.approx(i * 1e-3)
        assert event.metadata["real_time"] == pytest.approx(5e-4)
    assert out[2].metadata["appendix"] == {"i": 1}  # type: ignore[attr-defined]
    stop = out[-1]
    assert isinstance(stop, Stop) and stop.data["missing_images"] == 0 and LOST not in stop.routing
    assert listener.guard.drops() == {}


def test_stream_v1_header_detail_all_carries_its_arrays_and_appendix() -> None:
    flat = np.random.default_rng(3).random(SHAPE).astype("<f4")
    mask = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 5).astype("<u4")
    table = np.arange(2 * 100, dtype="<f4").reshape(2, 100)
    parts = v1_start(2, "all")
    for htype, array in (
        ("dflatfield-1.0", flat),
        ("dpixelmask-1.0", mask),
        ("dcountrate_table-1.0", table),
    ):
        parts += [
            js({"htype": htype, "shape": list(array.shape[::-1]), "type": array.dtype.name}),
            array.tobytes(),
        ]
    parts.append(js({"filename": "/data/x.h5", "rotate": 0}))
    (start,) = Listener("dectris-stream1").feed(parts)
    assert isinstance(start, Start)
    assert np.array_equal(start.data["flatfield"], flat)
    assert np.array_equal(start.data["pixel_mask"], mask)
    assert np.array_equal(start.data["countrate_correction_lookup_table"], table)
    assert start.data["appendix"] == {"filename": "/data/x.h5", "rotate": 0}
    assert start.data["photon_energy"] == 8000.0 and start.data["series_id"] == 2


# -- htype: ADZMQ array-1.0 and MAX IV's secondary stream --------------------------------


def adzmq(i: int, array: np.ndarray, encoding: str) -> list[bytes]:
    """areaDetector's NDPluginZMQ: shape in NDArray order (fastest first), ndattr."""
    if encoding == "":
        blob = array.tobytes()
    elif encoding == "lz4":
        blob = compress("lz4-block", array)
    else:  # ADCore's bslz4 codec: a bare bitshuffle stream, no HDF5 header
        blob = compress("bslz4", array)[12:]
    header = {
        "htype": ["array-1.0"],
        "type": array.dtype.name,
        "shape": list(array.shape[::-1]),
        "frame": i,
        "timeStamp": 1000.5 + i,
        "encoding": encoding,
        "ndattr": {"Temperature": 21.5},
    }
    return [js(header), blob]


@pytest.mark.parametrize("encoding", ["", "lz4", "bslz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adzmq_arrays_decode_exactly(encoding: str, dtype: str) -> None:
    listener = Listener("htype")
    frames = [frame(dtype, i) for i in range(3)]
    out = listener.feed(*(adzmq(i + 1, f, encoding) for i, f in enumerate(frames)))
    assert kinds(out) == ["Event"] * 3
    for i, event in enumerate(out):
        assert isinstance(event, Event)
        assert np.array_equal(event.payload, frames[i])
        assert event.metadata["image_id"] == i + 1
        assert event.metadata["ndattr"] == {"Temperature": 21.5}
    assert listener.guard.drops() == {}


def maxiv_image(
    n: int, i: int, array: np.ndarray, compression: str, framed: bool = True
) -> list[bytes]:
    blob = array.tobytes() if compression == "none" else compress("bslz4", array)
    if compression == "bslz4" and not framed:
        blob = blob[12:]  # bitshuffle.compress_lz4's own output (Pilatus pipeline)
    header = {
        "htype": "image",
        "msg_number": n,
        "frame": i,
        "shape": list(array.shape),
        "type": array.dtype.name,
        "compression": compression,
    }
    return [js(header), blob]


@pytest.mark.parametrize(
    ("compression", "framed"), [("none", True), ("bslz4", True), ("bslz4", False)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxiv_secondary_stream_series_decode_exactly(
    compression: str, framed: bool, dtype: str
) -> None:
    listener = Listener("htype")
    frames = [frame(dtype, i) for i in range(3)]
    header = [
        js({"htype": "header", "msg_number": 0, "filename": "/tmp/x.h5"}),
        js({"nimages": 3, "count_time": 0.1}),
    ]
    images = [maxiv_image(i + 1, i, f, compression, framed) for i, f in enumerate(frames)]
    out = listener.feed(header, *images, [js({"htype": "series_end", "msg_number": 4})])
    assert kinds(out) == ["Start", "Event", "Event", "Event", "Stop"]
    assert out[0].data == {
        "msg_number": 0,
        "filename": "/tmp/x.h5",
        "nimages": 3,
        "count_time": 0.1,
    }  # type: ignore[attr-defined]
    for i, event in enumerate(out[1:4]):
        assert isinstance(event, Event)
        assert np.array_equal(event.payload, frames[i])
        assert event.metadata["msg_number"] == i + 1
    assert out[-1].data["missing_images"] == 0  # type: ignore[attr-defined]


# -- runs and their losses ---------------------------------------------------------------


def v2_series(uid: str, ids: list[int], n: int, sid: int = 1) -> list[list[bytes]]:
    image = frame("uint16", 0)
    return [v2_start(uid, sid, n)] + [
        v2_image(i, {"threshold_1": v2_array(image, "bslz4")}, uid, sid) for i in ids
    ]


def lost(stop: Message) -> int:
    assert isinstance(stop, Stop)
    return int(stop.routing.get(LOST, {}).get(LOST_REASON, 0))


def test_stream_v2_lost_and_duplicate_images_make_the_run_incomplete_with_the_count() -> None:
    listener = Listener("dectris-stream2")
    ids = [0, 1, 2, 4, 5, 5, 6, 8, 9]  # 3 and 7 lost, 5 twice
    out = listener.feed(*v2_series("u1", ids, n=12), v2_end("u1"))
    assert kinds(out) == ["Start"] + ["Event"] * 8 + ["Stop"]
    stop = out[-1]
    assert isinstance(stop, Stop)
    # 3 and 7 in the gaps, 10 and 11 never came
    assert lost(stop) == 4
    assert stop.data["missing_images"] == 4 and stop.data["incomplete"] is True
    assert stop.data["images_received"] == 8 and stop.data["closed_by"] == "end"
    assert stop.data["series_unique_id"] == "u1"
    assert listener.guard.drops() == {"duplicate_image": 1}


def test_stream_v1_and_maxiv_lost_images_are_counted_too() -> None:
    v1 = Listener("dectris-stream1")
    image = frame("uint32", 0)
    out = v1.feed(v1_start(3), *(v1_image(3, i, image, "bs32-lz4<") for i in (0, 2)), v1_end(3))
    assert lost(out[-1]) == 2  # nimages 2 x ntrigger 2 = 4 expected, 2 received
    maxiv = Listener("htype")
    header = [js({"htype": "header", "msg_number": 0}), js({"nimages": 5})]
    images = [maxiv_image(i, i, image, "bslz4") for i in (0, 1, 4)]
    out = maxiv.feed(header, *images, [js({"htype": "series_end", "msg_number": 9})])
    assert lost(out[-1]) == 2


def test_same_series_id_with_another_unique_id_is_another_run() -> None:
    listener = Listener("dectris-stream2")
    first = listener.feed(*v2_series("u1", [0, 1], n=3, sid=5))
    # no end for u1: the start of u2 (same series_id 5) closes it, incomplete
    second = listener.feed(*v2_series("u2", [0, 1, 2], n=3, sid=5))
    assert kinds(first) == ["Start", "Event", "Event"]
    assert kinds(second) == ["Stop", "Start", "Event", "Event", "Event"]
    stop = second[0]
    assert isinstance(stop, Stop)
    assert stop.data["closed_by"] == "next start" and stop.data["incomplete"] is True
    assert lost(stop) == 1
    late = listener.feed(
        v2_image(2, {"threshold_1": v2_array(frame("uint16", 0), "none")}, "u1", 5)
    )
    assert late == []
    end = listener.feed(v2_end("u2", 5))
    assert kinds(end) == ["Stop"] and lost(end[0]) == 0 and end[0].data["incomplete"] is False  # type: ignore[attr-defined]
    assert listener.guard.drops() == {"other_series": 1}


def test_a_series_without_end_is_closed_by_the_timeout() -> None:
    listener = Listener("dectris-stream2", series_timeout=30)
    listener.feed(*v2_series("u1", [0, 1], n=5))
    now = time.monotonic()
    assert listener.tick(now + 20) == []
    (stop,) = listener.tick(now + 31)
    assert isinstance(stop, Stop)
    assert stop.data["closed_by"] == "timeout" and lost(stop) == 3
    assert listener.tick(now + 1000) == []  # closed once
    after = listener.feed(v2_image(2, {"threshold_1": v2_array(frame("uint16", 0), "none")}, "u1"))
    assert after == [] and listener.guard.drops() == {"no_series": 1}


def test_series_timeout_0_never_closes_and_a_message_restarts_the_clock() -> None:
    clock = [0.0]
    tracker = SeriesTracker(timeout=0, clock=lambda: clock[0])
    tracker.start("s", 2, {})
    assert tracker.tick(1e9) == []
    tracker = SeriesTracker(timeout=10, clock=lambda: clock[0])
    tracker.start("s", 2, {})
    clock[0] = 8.0
    tracker.image("s", 0)
    assert tracker.tick(15.0) == []  # 7 s after the image
    assert kinds(tracker.tick(18.0)) == ["Stop"]


def test_images_without_a_start_and_repeated_starts_are_dropped() -> None:
    listener = Listener("dectris-stream2")
    image = v2_image(0, {"threshold_1": v2_array(frame("uint16", 0), "none")})
    assert listener.feed(image, v2_end()) == []
    assert kinds(listener.feed(v2_start(), v2_start(), image)) == ["Start", "Event"]
    assert listener.guard.drops() == {"no_series": 2, "duplicate_start": 1}


def test_codec_names_and_tick() -> None:
    for name in ("dectris-stream2", "dectris-stream1", "htype"):
        CodecName().validate(name)
        first, second = get_codec(name), get_codec(name)
        assert first.tick is not None and first.decode != second.decode  # one per listener
        with pytest.raises(Exception, match="only receives"):
            first.encode(Start())
    assert get_codec("json").tick is None


# -- hostile input ------------------------------------------------------------------------


def _valid_messages() -> list[tuple[str, list[bytes]]]:
    image16 = frame("uint16", 5)
    return [
        ("dectris-stream2", v2_start()),
        ("dectris-stream2", v2_image(0, {"threshold_1": v2_array(image16, "bslz4")})),
        ("dectris-stream2", v2_image(1, {"threshold_1": v2_array(image16, "lz4")})),
        ("dectris-stream1", v1_image(1, 0, image16, "bs16-lz4<")),
        ("dectris-stream1", v1_image(1, 0, image16, "lz4<")),
        ("htype", adzmq(0, image16, "bslz4")),
        ("htype", maxiv_image(1, 0, image16, "bslz4")),
    ]


CRAFTED: list[tuple[str, list[bytes], str]] = [
    ("dectris-stream2", [b"\x81" * 500 + b"\x00"], "too_deep"),
    ("dectris-stream2", [b"\xc6" * 500 + b"\x00"], "too_deep"),
    ("dectris-stream2", [b"\x9b" + b"\xff" * 8], "truncated"),
    ("dectris-stream2", [b"\x1c"], "bad_cbor"),
    ("dectris-stream2", [cbor2.dumps({"type": "mystery"})], "bad_message"),
    ("dectris-stream2", [cbor2.dumps([1, 2])], "bad_message"),
    ("dectris-stream2", [b"\xa0", b"\xa0"], "frame_count"),
    (
        "dectris-stream2",
        [cbor2.dumps(CBORTag(56500, ["zip", 2, b"\x00" * 20]))],
        "unknown_encoding",
    ),
    ("dectris-stream2", [cbor2.dumps(CBORTag(83, b"\x00" * 16))], "unknown_type"),
    ("dectris-stream2", [cbor2.dumps(CBORTag(40, [[9, 9], CBORTag(69, b"\x00" * 4)]))], "size"),
    ("dectris-stream1", [b"{" * 100_000], "too_deep"),
    ("dectris-stream1", [b"not json"], "bad_header"),
    ("dectris-stream1", [js({"htype": "dimage-1.0", "series": 1, "frame": 0})], "frame_count"),
    ("dectris-stream1", [js({"htype": "dfoo-1.0"})], "bad_message"),
    (
        "htype",
        [js({"htype": "array-1.0", "type": "uint16", "shape": [4, 4], "frame": 0}), b"\x00" * 7],
        "size",
    ),
    (
        "htype",
        [js({"htype": "array-1.0", "type": "complex", "shape": [4, 4], "frame": 0}), b"\x00" * 32],
        "unknown_type",
    ),
    (
        "htype",
        [
            js(
                {
                    "htype": "array-1.0",
                    "type": "uint8",
                    "shape": [4, 4],
                    "frame": 0,
                    "encoding": "jpeg",
                }
            ),
            b"\x00",
        ],
        "unknown_encoding",
    ),
]


def _v1_bad(field: str, value: Any, reason: str) -> tuple[str, list[bytes], str]:
    parts = v1_image(1, 0, frame("uint16", 1), "bs16-lz4<")
    info = json.loads(parts[1])
    info[field] = value
    return ("dectris-stream1", [parts[0], js(info), *parts[2:]], reason)


CRAFTED += [
    _v1_bad("encoding", "bs16-lz4>", "unknown_encoding"),
    _v1_bad("encoding", "zstd<", "unknown_encoding"),
    _v1_bad("encoding", "bs32-lz4<", "bad_header"),
    _v1_bad("type", "float64", "unknown_type"),
    _v1_bad("size", 3, "size"),
    _v1_bad("shape", [53, 38], "size"),
    _v1_bad("shape", "big", "bad_header"),
]


def test_a_thousand_malformed_messages_are_counted_by_reason_and_never_raise() -> None:
    rng = random.Random(20)
    listeners = {name: Listener(name) for name in ("dectris-stream2", "dectris-stream1", "htype")}
    # an open series each, so that images get past no_series
    listeners["dectris-stream2"].feed(v2_start(n=10**6))
    listeners["dectris-stream1"].feed(v1_start(1))
    listeners["htype"].feed([js({"htype": "header", "msg_number": 0})])
    for name, frames, reason in CRAFTED:
        before = listeners[name].guard.drops().get(reason, 0)
        assert listeners[name].feed(frames) == [], reason
        assert listeners[name].guard.drops().get(reason, 0) == before + 1, (name, reason)
    valid = _valid_messages()
    sent = delivered = 0
    events: list[Event] = []
    while sent < 1000:
        name, frames = rng.choice(valid)
        frames = list(frames)
        k = rng.randrange(len(frames))
        data = bytearray(frames[k])
        how = rng.randrange(3)
        if how == 0:  # truncated
            data = data[: rng.randrange(len(data))]
        elif how == 1:  # bytes flipped
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # a slice of another message spliced in
            other = rng.choice(valid)[1][0]
            at = rng.randrange(len(data))
            data[at : at + 16] = other[:16]
        frames[k] = bytes(data)
        out = listeners[name].feed(frames)  # (raises nothing, or the test fails)
        sent += 1
        delivered += bool(out)
        events += [m for m in out if isinstance(m, Event)]
    dropped = sum(listener.guard.total for listener in listeners.values()) - len(CRAFTED)
    assert dropped + delivered == 1000 and dropped > 500
    # what got through decodes downstream to an array or is refused as a WireError
    for event in events:
        try:
            payload = event.payload
        except WireError:
            continue
        assert all(
            isinstance(a, np.ndarray)
            for a in (payload.values() if isinstance(payload, dict) else [payload])
        )


# -- the listener: options and its tick, over a real ZMQ socket ---------------------------


def test_zmq_listener_closes_a_series_that_never_ends_with_its_tick(tmp_path: Any) -> None:
    import threading

    import zmq

    from arroyo.io.zmq import ZMQListener
    from arroyo.testing import CollectingPublisher, compose
    from tests.conftest import wait_for

    endpoint = f"ipc://{tmp_path}/detector"
    listener = ZMQListener(
        endpoint, bind=True, codec="dectris-stream2", channel="threshold_1", series_timeout=0.5
    )
    sink = CollectingPublisher()
    compose(listener, None, sink)
    listener.setup()
    thread = threading.Thread(target=listener.start, daemon=True)
    thread.start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    try:
        push.connect(endpoint)
        image = frame("uint16", 9)
        for frames in v2_series("u1", [0, 1], n=4):  # no end: the timeout closes it
            push.send_multipart(frames)
        stop = wait_for(lambda: [m for m in sink.messages if isinstance(m, Stop)])[0]
        assert kinds(sink.messages) == ["Start", "Event", "Event", "Stop"]
        assert stop.data["closed_by"] == "timeout" and lost(stop) == 2
        assert np.array_equal(sink.messages[1].payload, frame("uint16", 0))
        push.send_multipart(v2_image(2, {"threshold_1": v2_array(image, "none")}))
        wait_for(lambda: listener.drops() == {"no_series": 1})
    finally:
        listener.stop()
        thread.join(10)
        listener.close()
        push.close(0)
    assert not thread.is_alive()
