"""The wire format: exact round trips, zero-copy receive, and every decoding limit."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arroyo import wire
from arroyo.errors import WireError
from arroyo.message import Event, Message, Start, Stop

# ---------------------------------------------------------------- helpers


@contextmanager
def frames_apart() -> Iterator[None]:
    """Every buffer in a frame of its own, as version 1 lays them out (by default a
    payload up to ``wire.INLINE_MAX`` bytes rides in the header: test_version_2)."""
    kept, wire.INLINE_MAX = wire.INLINE_MAX, -1
    try:
        yield
    finally:
        wire.INLINE_MAX = kept


def as_bytes(frames: list[Any]) -> list[bytes]:
    """What a peer in another process would hand us: independent byte strings."""
    return [bytes(memoryview(f).cast("B")) for f in frames]


def deep_equal(a: Any, b: Any) -> bool:
    """Equality that tells bool from int, and treats nan as equal to nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(deep_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_array_identical(original: np.ndarray, decoded: Any) -> None:
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == original.dtype
    assert decoded.dtype.str == original.dtype.str  # byte order included
    assert decoded.shape == original.shape
    assert decoded.flags.c_contiguous
    assert decoded.tobytes() == original.tobytes()  # bit-exact, nan payloads and -0.0 too


def assert_payload_identical(original: Any, decoded: Any) -> None:
    if isinstance(original, np.ndarray):
        assert_array_identical(original, decoded)
    elif isinstance(original, dict):
        assert isinstance(decoded, dict)
        assert list(decoded) == list(original)
        for name, array in original.items():
            assert_array_identical(array, decoded[name])
    elif original is None:
        assert decoded is None
    else:
        assert type(decoded) is bytes
        assert decoded == bytes(original)


def has_nat_or_nan(message: Message) -> bool:
    """Whether ``Message.__eq__`` cannot be used (NaT != NaT; nan in metadata)."""
    payload = getattr(message, "payload", None)
    arrays = list(payload.values()) if isinstance(payload, dict) else [payload]
    for a in arrays:
        if isinstance(a, np.ndarray) and a.dtype.kind in "mM" and np.isnat(a).any():
            return True
    meta = message.metadata if isinstance(message, Event) else message.data  # type: ignore[attr-defined]
    return _contains_nan(meta)


def _contains_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isnan(obj)
    if isinstance(obj, list):
        return any(_contains_nan(x) for x in obj)
    if isinstance(obj, dict):
        return any(_contains_nan(x) for x in obj.values())
    return False


def assert_round_trip(original: Message, frames: list[Any]) -> Message:
    decoded = wire.decode(frames)
    assert type(decoded) is type(original)
    assert decoded.run == original.run
    assert decoded.seq == original.seq
    assert decoded.timestamp_ns == original.timestamp_ns
    assert deep_equal(decoded.routing, original.routing)
    if isinstance(original, Event):
        assert isinstance(decoded, Event)
        assert deep_equal(decoded.metadata, original.metadata)
        assert_payload_identical(original.payload, decoded.payload)
    else:
        assert deep_equal(decoded.data, original.data)  # type: ignore[attr-defined]
    if not has_nat_or_nan(original):
        assert decoded == original
    return decoded


# ---------------------------------------------------------------- strategies

ENDIAN = st.sampled_from("<>")


def _endian(make: Any, **kwargs: Any) -> st.SearchStrategy[np.dtype[Any]]:
    return ENDIAN.flatmap(lambda e: make(endianness=e, **kwargs))


wire_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    _endian(hnp.integer_dtypes),
    _endian(hnp.unsigned_integer_dtypes),
    _endian(hnp.floating_dtypes, sizes=(16, 32, 64)),
    _endian(hnp.complex_number_dtypes),
    _endian(hnp.datetime64_dtypes),
    _endian(hnp.timedelta64_dtypes),
    st.sampled_from([np.dtype("<M8[ns]"), np.dtype(">M8[ns]"), np.dtype("<m8[ns]")]),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
    _endian(hnp.unicode_string_dtypes, min_len=1, max_len=6),
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
arrays = wire_dtypes.flatmap(lambda dt: hnp.arrays(dt, shapes))

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_nested = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)
metadata = st.dictionaries(st.text(max_size=8), _nested, max_size=5)
nan_metadata = st.dictionaries(
    st.text(max_size=4),
    st.recursive(
        st.floats() | st.integers(-5, 5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
        max_leaves=6,
    ),
    max_size=4,
)
stamps = {
    "run": st.integers(0, 2**63 - 1),
    "seq": st.integers(0, 2**63 - 1),
    "timestamp_ns": st.integers(0, 2**64 - 1),
    "routing": st.dictionaries(st.text(max_size=6), _nested, max_size=3),
}
payloads = st.one_of(
    st.none(),
    st.binary(max_size=64),
    arrays,
    st.dictionaries(st.text(max_size=6), arrays, min_size=1, max_size=4),
)
events = st.builds(Event, metadata=metadata, payload=payloads, **stamps)
starts = st.builds(Start, data=metadata, **stamps)
stops = st.builds(Stop, data=metadata, **stamps)

hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- round trips


@hyp
@given(events | starts | stops)
def test_any_message_round_trips(message: Message) -> None:
    frames = wire.encode(message)
    assert_round_trip(message, frames)
    assert_round_trip(message, as_bytes(frames))


@hyp
@given(arrays)
def test_array_payload_round_trips_with_dtype_and_shape(array: np.ndarray) -> None:
    message = Event(metadata={"i": 1}, payload=array, run=3, seq=4)
    decoded = assert_round_trip(message, as_bytes(wire.encode(message)))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.payload, np.ndarray)
    assert decoded.payload.dtype.str == array.dtype.str
    assert decoded.payload.shape == array.shape
    assert decoded.payload.ndim == array.ndim  # 0-d stays 0-d


@hyp
@given(st.dictionaries(st.text(max_size=6), arrays, min_size=2, max_size=5))
def test_dict_of_named_arrays_round_trips(payload: dict[str, np.ndarray]) -> None:
    message = Event(payload=payload, run=1, seq=0)
    with frames_apart():
        frames = wire.encode(message)
    assert len(frames) == 1 + len(payload)
    decoded = assert_round_trip(message, as_bytes(frames))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.payload, dict)
    for name, array in payload.items():
        assert decoded.payload[name].dtype == array.dtype
        assert decoded.payload[name].shape == array.shape


_VIEWS = {
    "step": lambda a: a[::2],
    "reverse": lambda a: a[::-1],
    "transpose": lambda a: a.T,
    "step-both": lambda a: a[1::2, ::3],
    "column": lambda a: a[:, 1],
    "swap-last": lambda a: np.swapaxes(a, -1, -2),
}


@hyp
@given(
    wire_dtypes.flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=6))
    ),
    st.sampled_from(sorted(_VIEWS)),
)
def test_non_contiguous_input_round_trips(base: np.ndarray, view: str) -> None:
    array = _VIEWS[view](base)
    message = Event(payload={"v": array}, run=1)
    decoded = assert_round_trip(message, as_bytes(wire.encode(message)))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.payload, dict)
    assert decoded.payload["v"].shape == array.shape


@pytest.mark.parametrize("view", sorted(_VIEWS))
@pytest.mark.parametrize("dtype", ["<i4", ">f8", "<c16", "<U3", ">M8[ns]"])
def test_non_contiguous_views_are_sent_in_logical_order(dtype: str, view: str) -> None:
    base = np.arange(7 * 6 * 4).reshape(7, 6, 4).astype(dtype)
    array = _VIEWS[view](base)
    assert not array.flags.c_contiguous
    with frames_apart():
        frames = wire.encode(Event(payload=array))
    assert bytes(memoryview(frames[1]).cast("B")) == np.ascontiguousarray(array).tobytes()
    decoded = wire.decode(as_bytes(frames))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.payload, np.ndarray)
    assert_array_identical(array, decoded.payload)
    assert np.array_equal(decoded.payload, array)


@pytest.mark.parametrize(
    "array",
    [
        np.array(5, dtype="<i8"),
        np.array(2.5, dtype=">f4"),
        np.array(b"xy", dtype="S2"),
        np.zeros((0,), dtype="<u2"),
        np.zeros((3, 0, 2), dtype=">c8"),
        np.zeros((0, 0), dtype="<U4"),
        np.array([np.datetime64("NaT"), np.datetime64(1, "ns")], dtype="<M8[ns]"),
    ],
    ids=["0d-int", "0d-float-be", "0d-bytes", "empty", "empty-3d", "empty-2d-str", "nat"],
)
def test_edge_shapes_round_trip(array: np.ndarray) -> None:
    message = Event(payload=array, run=2, seq=9)
    with frames_apart():
        frames = wire.encode(message)
    assert len(memoryview(frames[1]).cast("B")) == array.nbytes
    decoded = assert_round_trip(message, as_bytes(frames))
    assert isinstance(decoded, Event)
    assert isinstance(decoded.payload, np.ndarray)
    assert decoded.payload.shape == array.shape


@hyp
@given(nan_metadata)
def test_metadata_floats_including_nan_round_trip(meta: dict[str, Any]) -> None:
    message = Event(metadata=meta)
    decoded = wire.decode(wire.encode(message))
    assert isinstance(decoded, Event)
    assert deep_equal(decoded.metadata, meta)


def test_metadata_value_types_survive() -> None:
    meta = {
        "int": -(2**63),
        "big": 2**64 - 1,
        "float": 1.5,
        "nan": float("nan"),
        "inf": float("-inf"),
        "str": "é λ",
        "bytes": b"\x00\xff",
        "bool": True,
        "none": None,
        "nested": {"list": [1, [2.0, {"x": False}]], "empty": {}},
        "tuple": (1, 2),  # msgpack has no tuple: it comes back as a list
    }
    decoded = wire.decode(as_bytes(wire.encode(Start(data=meta, run=7))))
    assert isinstance(decoded, Start)
    got = decoded.data
    assert got["tuple"] == [1, 2]
    assert type(got["bool"]) is bool
    assert type(got["bytes"]) is bytes
    assert math.isnan(got["nan"])
    assert deep_equal(
        {k: v for k, v in got.items() if k != "tuple"},
        {k: v for k, v in meta.items() if k != "tuple"},
    )


def test_numpy_scalars_in_metadata_become_plain_values() -> None:
    meta = {"a": np.int16(3), "b": np.float32(0.5), "c": np.arange(3), "d": {2, 1}}
    decoded = wire.decode(wire.encode(Event(metadata=meta)))
    assert isinstance(decoded, Event)
    assert decoded.metadata == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": [1, 2]}
    assert type(decoded.metadata["a"]) is int


def test_bytes_and_none_payloads() -> None:
    cases: list[tuple[Any, int]] = [(b"", 1), (b"\x00a", 1), (bytearray(b"xy"), 1), (None, 0)]
    for payload, kind in cases:
        message = Event(payload=payload, run=1, seq=2)
        with frames_apart():
            frames = wire.encode(message)
        header = msgpack.unpackb(frames[0])
        assert header["p"] == kind
        assert len(frames) == (1 if payload is None else 2)
        decoded = assert_round_trip(message, as_bytes(frames))
        assert decoded == message


def test_header_keys_are_the_documented_ones() -> None:
    array = np.arange(6, dtype=">i2").reshape(2, 3)
    message = Event(metadata={"a": 1}, payload=array, run=5, seq=6, timestamp_ns=7)
    message.routing = {"origin": "src"}
    with frames_apart():
        header = msgpack.unpackb(wire.encode(message)[0])
    assert header == {
        "v": 1,
        "k": "E",
        "r": 5,
        "q": 6,
        "t": 7,
        "m": {"a": 1},
        "p": 2,
        "b": [[None, ">i2", [2, 3]]],
        "x": {"origin": "src"},
    }
    start = msgpack.unpackb(wire.encode(Start(data={"s": 1}, run=5, timestamp_ns=1))[0])
    assert start == {"v": 1, "k": "S", "r": 5, "q": 0, "t": 1, "m": {"s": 1}}
    stop = msgpack.unpackb(wire.encode(Stop(run=5, seq=3, timestamp_ns=2))[0])
    assert stop == {"v": 1, "k": "T", "r": 5, "q": 3, "t": 2, "m": {}}


def test_encode_does_not_copy_contiguous_arrays() -> None:
    array = np.arange(1000, dtype="<f8")
    frames = wire.encode(Event(payload=array))
    assert np.shares_memory(np.asarray(frames[1]), array)


# ---------------------------------------------------------------- zero copy over ZMQ


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    # A leaked socket must fail the test, not hang it.
    term = threading.Thread(target=ctx.term, daemon=True)
    term.start()
    term.join(5)
    assert not term.is_alive(), "zmq context did not terminate: a socket was left open"


@pytest.mark.parametrize("transport", ["inproc", "ipc"])
def test_zc(transport: str, zmq_context: zmq.Context[Any], tmp_path: Path) -> None:
    """A 4 MB array is decoded as a view over the received zmq.Frame, not a copy."""
    endpoint = "inproc://wire-zc" if transport == "inproc" else f"ipc://{tmp_path}/zc"
    pull = zmq_context.socket(zmq.PULL)
    push = zmq_context.socket(zmq.PUSH)
    try:
        pull.bind(endpoint)
        push.connect(endpoint)
        array = np.arange(1 << 20, dtype="<f4").reshape(1024, 1024)
        assert array.nbytes == 4 << 20
        push.send_multipart(wire.encode(Event(payload=array, run=1)), copy=False)
        assert pull.poll(5000), "nothing received within 5 s"
        frames = pull.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in frames)
        decoded = wire.decode(frames)
        assert isinstance(decoded, Event)
        got = decoded.payload
        assert isinstance(got, np.ndarray)
        assert np.array_equal(got, array)

        frame_bytes = np.frombuffer(frames[1].buffer, dtype=np.uint8)
        assert np.shares_memory(got, frame_bytes)
        assert got.__array_interface__["data"][0] == frame_bytes.__array_interface__["data"][0]
        base: Any = got
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview)
        assert base.obj is frames[1]
        del got, decoded, frame_bytes, base, frames
    finally:
        push.close(linger=0)
        pull.close(linger=0)


# ---------------------------------------------------------------- encode errors


class _Opaque:
    pass


@pytest.mark.parametrize(
    "message",
    [
        Event(payload=np.array([1, "a", None], dtype=object)),
        Event(payload=np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])),
        Event(payload=np.zeros(2, dtype="V8")),
        Event(payload={"ok": np.zeros(2), "bad": np.array([{}], dtype=object)}),
        Event(payload={1: np.zeros(2)}),  # type: ignore[dict-item]
        Event(payload={"x": [1, 2]}),  # type: ignore[dict-item]
        Event(payload=[1, 2, 3]),  # type: ignore[arg-type]
        Event(payload="text"),  # type: ignore[arg-type]
        Event(metadata={"obj": _Opaque()}),
        Event(metadata={"nested": [1, {"c": 1j}]}),
        Event(metadata={"too big": 2**64}),
        Event(metadata={"too small": -(2**63) - 1}),
        Start(data={"obj": object()}),
        Stop(data={"fn": print}),
        Event(run=2**64),
    ],
    ids=[
        "object-dtype",
        "structured-dtype",
        "void-dtype",
        "object-in-dict",
        "non-str-name",
        "list-in-dict",
        "list-payload",
        "str-payload",
        "opaque-metadata",
        "complex-metadata",
        "int-overflow",
        "int-underflow",
        "start-object",
        "stop-function",
        "run-overflow",
    ],
)
def test_encode_rejects_what_the_wire_cannot_carry(message: Message) -> None:
    with pytest.raises(WireError) as info:
        wire.encode(message)
    assert info.value.reason == "encode"


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(WireError, match="not an Arroyo message"):
        wire.encode({"k": "E"})  # type: ignore[arg-type]


# ---------------------------------------------------------------- decode limits


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_DROP = object()  # event_header(key=_DROP) leaves the key out
EIGHT = b"\x01\x00\x02\x00\x03\x00\x04\x00"


def event_header(**fields: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "v": 1,
        "k": "E",
        "r": 1,
        "q": 0,
        "t": 0,
        "m": {},
        "p": 2,
        "b": [[None, "<u2", [2, 2]]],
    }
    header.update(fields)
    return {k: v for k, v in header.items() if v is not _DROP}


def test_the_base_case_of_the_limit_tests_is_valid() -> None:
    decoded = wire.decode([pack(event_header()), EIGHT])
    assert isinstance(decoded, Event)
    assert decoded.payload.tolist() == [[1, 2], [3, 4]]  # type: ignore[union-attr]


def raises_wire_error(frames: Any, reason: str | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode(frames)
    if reason is not None:
        assert info.value.reason == reason, str(info.value)
    return info.value


@pytest.mark.parametrize("version", [0, 3, 255, -1, "1", 1.0, 2.0, True, None, [1], _DROP])
def test_unknown_version_is_reported_as_such(version: Any) -> None:
    error = raises_wire_error([pack(event_header(v=version)), EIGHT], "version")
    assert "version" in str(error)


def test_header_size_limit() -> None:
    def padded(n: int) -> bytes:
        return pack(event_header(m={"pad": "x" * n}))

    n = wire.MAX_HEADER_BYTES - 200
    n += wire.MAX_HEADER_BYTES - len(padded(n))
    at_limit = padded(n)
    assert len(at_limit) == wire.MAX_HEADER_BYTES
    assert isinstance(wire.decode([at_limit, EIGHT]), Event)
    over = padded(n + 1)
    assert len(over) == wire.MAX_HEADER_BYTES + 1
    raises_wire_error([over, EIGHT], "oversized")
    raises_wire_error([b"\x80" * (wire.MAX_HEADER_BYTES + 1)], "oversized")


@pytest.mark.parametrize(
    "frames",
    [
        [],
        (),
        [pack(event_header())],
        [pack(event_header()), EIGHT, EIGHT],
        [pack(event_header(p=0, b=_DROP)), EIGHT],
        [pack(event_header(p=3, b=[["a", "<u2", [4]], ["b", "<u2", [4]]])), EIGHT],
        [pack(event_header()), *[EIGHT] * (wire.MAX_BUFFERS + 1)],
        [pack({"v": 1, "k": "S", "r": 1, "q": 0, "t": 0, "m": {}}), EIGHT],
        [pack({"v": 1, "k": "T", "r": 1, "q": 0, "t": 0, "m": {}}), b""],
        [pack({"v": 1, "k": "S", "r": 1, "q": 0, "t": 0, "m": {}, "b": []})],
        [pack({"v": 1, "k": "T", "m": {}, "b": [[None, "<u2", [4]]]}), EIGHT],
    ],
    ids=[
        "no-frames",
        "empty-tuple",
        "missing-buffer",
        "extra-buffer",
        "none-payload-with-frame",
        "dict-missing-frame",
        "too-many-frames",
        "start-with-buffer",
        "stop-with-empty-buffer",
        "start-with-descriptor-list",
        "stop-with-descriptor",
    ],
)
def test_wrong_frame_count(frames: list[Any]) -> None:
    raises_wire_error(frames, "frames")


@pytest.mark.parametrize(
    ("desc", "frame"),
    [
        ([None, "<u2", [2, 2]], EIGHT[:7]),
        ([None, "<u2", [2, 2]], EIGHT + b"\x00"),
        ([None, "<u2", [2, 2]], b""),
        ([None, "<f8", []], EIGHT[:4]),
        ([None, "<u2", [0]], EIGHT),
        ([None, "<U2", [1]], EIGHT[:4]),
        ([None, "<u2", [2**40]], EIGHT),
        ([None, "<u2", [2**32, 2**32]], EIGHT),
        ([None, "<c16", [2**64 - 1]], EIGHT),
        ([None, "|b1", [2**64 - 1, 2**64 - 1, 2**64 - 1]], EIGHT),
    ],
    ids=[
        "short",
        "long",
        "empty",
        "0d-short",
        "empty-shape",
        "unicode-short",
        "2**40",
        "2**64-elements",
        "max-uint64",
        "3x-max-uint64",
    ],
)
def test_declared_size_must_equal_frame_size(desc: list[Any], frame: bytes) -> None:
    error = raises_wire_error([pack(event_header(b=[desc])), frame], "size")
    assert "declares" in str(error)


@pytest.mark.parametrize(
    "shape",
    [
        [0, 2**63],
        [0, 2**64 - 1],
        [2**62, 0, 2**62],
        [0, *[2**40] * 5],
    ],
)
def test_empty_arrays_with_impossible_dims(shape: list[int]) -> None:
    """Zero elements match an empty frame, but numpy cannot build the shape."""
    raises_wire_error([pack(event_header(b=[[None, "<u2", shape]])), b""])


def test_empty_arrays_with_large_but_possible_dims_decode() -> None:
    decoded = wire.decode([pack(event_header(b=[[None, "<u2", [0, 2**40]]])), b""])
    assert isinstance(decoded, Event)
    assert decoded.payload.shape == (0, 2**40)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "shape",
    [
        [-2, -2],
        [-1, -4],
        [4, -1],
        [2.0, 2],
        ["2", 2],
        [True, 4],
        [[2], 2],
        [None],
        "22",
        4,
        None,
        {"a": 4},
        [1] * (wire.MAX_NDIM - 1) + [2, 2],
    ],
)
def test_bad_shapes(shape: Any) -> None:
    # Most of these multiply out to the frame's 8 bytes: only shape validation stops them.
    raises_wire_error([pack(event_header(b=[[None, "<u2", shape]])), EIGHT])


def test_max_ndim_is_allowed() -> None:
    shape = [1] * (wire.MAX_NDIM - 2) + [2, 2]
    decoded = wire.decode([pack(event_header(b=[[None, "<u2", shape]])), EIGHT])
    assert isinstance(decoded, Event)
    assert decoded.payload.ndim == wire.MAX_NDIM  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "dtype",
    [
        "O",
        "|O8",
        "<O",
        "V8",
        "|V2",
        "i2,i2",
        "(2,)i2",
        "[('a', '<i2')]",
        "xyz",
        "",
        "<u" + "2" * 40,
        "S0",
        "<U0",
        "<M8[parsec]",
        None,
        2,
        b"<u2",
        ["<u2"],
    ],
)
def test_bad_dtypes(dtype: Any) -> None:
    raises_wire_error([pack(event_header(b=[[None, dtype, [4]]])), EIGHT])


@pytest.mark.parametrize(("dtype", "shape"), [("S0", [4]), ("|S0", [0]), ("<U0", [2, 3])])
def test_zero_size_dtypes(dtype: str, shape: list[int]) -> None:
    """Their declared size is 0 = an empty frame, but numpy cannot view a buffer as them."""
    raises_wire_error([pack(event_header(b=[[None, dtype, shape]])), b""])


@pytest.mark.parametrize(
    "header",
    [
        pack(event_header(m={"e": msgpack.ExtType(5, b"xx")})),
        pack(event_header(k=msgpack.ExtType(0, b""))),
        pack(msgpack.ExtType(1, pack(event_header()))),
        pack(event_header(m=[msgpack.ExtType(127, b"")])),
        pack(event_header(m={})).replace(b"\xa1m\x80", b"\xa1m\xd4\xff\x00"),  # bad timestamp
    ],
    ids=["in-metadata", "as-kind", "whole-header", "in-list", "bad-timestamp"],
)
def test_ext_types_are_rejected(header: bytes) -> None:
    raises_wire_error([header, EIGHT])


def test_msgpack_timestamp_becomes_a_plain_integer() -> None:
    header = pack(event_header(m={"ts": msgpack.Timestamp(1, 5)}))
    decoded = wire.decode([header, EIGHT])
    assert isinstance(decoded, Event)
    assert decoded.metadata == {"ts": 1_000_000_005}


@pytest.mark.parametrize(
    "header",
    [
        pack([1, "E"]),
        pack(1),
        pack("v"),
        pack(None),
        pack(b"\x81\xa1v\x01"),
        b"",
        b"\xc1",
        pack(event_header())[:-3],
        pack(event_header()) + b"\x00",
    ],
    ids=["list", "int", "str", "nil", "bin", "empty", "reserved", "truncated", "trailing"],
)
def test_header_must_be_one_msgpack_map(header: bytes) -> None:
    raises_wire_error([header, EIGHT])


@pytest.mark.parametrize(
    "fields",
    [
        {"k": _DROP},
        {"k": "X"},
        {"k": "e"},
        {"k": []},
        {"k": {}},
        {"r": "1"},
        {"q": 1.5},
        {"t": None},
        {"r": True},
        {"m": []},
        {"m": "meta"},
        {"x": "a"},
        {"p": "2"},
        {"p": 7},
        {"p": 1},
        {"p": 0},
        {"p": 3, "b": [[None, "<u2", [2, 2]]]},
        {"p": 3, "b": [[5, "<u2", [2, 2]]]},
        {"b": {}},
        {"b": "abc"},
        {"b": [[None, "<u2"]]},
        {"b": ["<u2"]},
        {"b": [[None, "<u2", [2, 2], "extra"]]},
    ],
    # (no memory addresses in the ids: pytest-xdist's workers must collect the same names)
    ids=lambda f: re.sub(r" at 0x[0-9a-f]+", "", repr(f))[:30],
)
def test_bad_header_fields(fields: dict[str, Any]) -> None:
    raises_wire_error([pack(event_header(**fields)), EIGHT])


def test_too_many_descriptors() -> None:
    descs = [[f"a{i}", "|u1", [0]] for i in range(wire.MAX_BUFFERS + 1)]
    raises_wire_error([pack(event_header(p=3, b=descs)), *[b""] * len(descs)])


def test_repeated_dict_names() -> None:
    descs = [["a", "<u2", [2]], ["a", "<u2", [2]]]
    raises_wire_error([pack(event_header(p=3, b=descs)), EIGHT[:4], EIGHT[4:]])


@pytest.mark.parametrize("frames", [[123], ["text"], [None], [pack(event_header()), 5], None, 7])
def test_non_buffer_frames(frames: Any) -> None:
    raises_wire_error(frames)


def test_strided_buffer_frame_is_rejected() -> None:
    strided = np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2]
    raises_wire_error([pack(event_header()), strided])


# ---------------------------------------------------------------- the documented example

# The worked example of docs/wire-format.md, byte for byte: peers in other languages
# test against these bytes, so the encoder must keep producing them.
DOC_HEADER = bytes.fromhex(
    "88 a1 76 01 a1 6b a1 45 a1 72 01 a1 71 07 a1 74"
    "cf 17 97 9c fe 3d 85 cd 15 a1 6d 81 a5 66 72 61"
    "6d 65 07 a1 70 02 a1 62 91 93 c0 a3 3c 75 32 92"
    "02 02"
)
DOC_BUFFER = bytes.fromhex("01 00 02 00 03 00 04 00")
DOC_STOP = bytes.fromhex(
    "86 a1 76 01 a1 6b a1 54 a1 72 01 a1 71 08 a1 74 cf 17 97 9c fe 71 c4 ca 00 a1 6d 80"
)


def test_documented_example_bytes() -> None:
    event = Event(
        metadata={"frame": 7},
        payload=np.array([[1, 2], [3, 4]], dtype="<u2"),
        run=1,
        seq=7,
        timestamp_ns=1700000000123456789,
    )
    with frames_apart():
        assert as_bytes(wire.encode(event)) == [DOC_HEADER, DOC_BUFFER]
    assert wire.decode([DOC_HEADER, DOC_BUFFER]) == event
    stop = Stop(run=1, seq=8, timestamp_ns=1700000001000000000)
    assert as_bytes(wire.encode(stop)) == [DOC_STOP]
    assert wire.decode([DOC_STOP]) == stop


def test_control_frames_can_never_be_headers() -> None:
    """docs/wire-format.md: a first byte 0x00 marks link control, never a header."""
    raises_wire_error([b"\x00C", b"4"])
    raises_wire_error([b"\x00sub:x"])
    messages = [
        Start(),
        Stop(data={f"k{i}": i for i in range(20)}),
        Event(metadata={"m": 1}, payload=np.zeros(3)),
        Event(payload={"a": np.zeros(3)}),
    ]
    messages[-1].routing = {"origin": "x"}
    for message in messages:
        first = as_bytes(wire.encode(message))[0][0]
        assert first in {*range(0x80, 0x90), 0xDE, 0xDF}
