"""arroyo.io.cbor against CBOR written by an independent encoder (cbor2) and against
hostile input: every value type, the RFC 8746 typed-array tags, tag 40, DECTRIS tag
56500, rationals, and the reasons malformed input is refused under."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from arroyo.compression import compress
from arroyo.errors import WireError
from arroyo.io import cbor
from arroyo.message import Encoded
from tests.conftest import need_detectors

need_detectors()

import bitshuffle  # noqa: E402
import cbor2  # noqa: E402
from cbor2 import CBORTag  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def reason(data: bytes) -> str:
    with pytest.raises(WireError) as caught:
        cbor.loads(data)
    return caught.value.reason


@pytest.mark.parametrize(
    "value",
    [
        0,
        23,
        24,
        255,
        256,
        65535,
        2**32,
        2**64 - 1,
        -1,
        -(2**63),
        -(2**64),
        1.5,
        -0.0,
        1e300,
        float("inf"),
        True,
        False,
        None,
        "",
        "série ✓",
        [],
        [1, [2, [3, "x"]], {"a": None}],
        {"type": "start", "n": 3, "nested": {"list": [1.25, "y"]}},
        {1: "int key", "s": 2},
    ],
)
def test_plain_values_read_as_cbor2_wrote_them(value: object) -> None:
    assert cbor.loads(cbor2.dumps(value)) == value


def test_half_single_and_double_floats() -> None:
    assert cbor.loads(b"\xf9\x3e\x00") == 1.5  # half
    assert cbor.loads(b"\xfa" + struct.pack(">f", 0.25)) == 0.25
    assert cbor.loads(b"\xfb" + struct.pack(">d", 0.1)) == 0.1
    assert math.isnan(cbor.loads(b"\xf9\x7e\x00"))


def test_byte_strings_are_views_of_the_input_not_copies() -> None:
    payload = bytes(range(256)) * 100
    data = bytearray(cbor2.dumps({"blob": payload}))
    blob = cbor.loads(data)["blob"]
    assert isinstance(blob, memoryview) and bytes(blob) == payload
    data[-1] ^= 0xFF  # the view sees the buffer it was cut from
    assert blob[-1] == payload[-1] ^ 0xFF


def test_indefinite_length_items() -> None:
    # [_ 1, 2], {_ "a": 1}, (_ h'01', h'02'), (_ "a", "b")
    assert cbor.loads(b"\x9f\x01\x02\xff") == [1, 2]
    assert cbor.loads(b"\xbf\x61a\x01\xff") == {"a": 1}
    assert bytes(cbor.loads(b"\x5f\x41\x01\x41\x02\xff")) == b"\x01\x02"
    assert cbor.loads(b"\x7f\x61a\x61b\xff") == "ab"


TYPED = [
    (64, "|u1"),
    (65, ">u2"),
    (66, ">u4"),
    (67, ">u8"),
    (68, "|u1"),
    (69, "<u2"),
    (70, "<u4"),
    (71, "<u8"),
    (72, "|i1"),
    (73, ">i2"),
    (74, ">i4"),
    (75, ">i8"),
    (77, "<i2"),
    (78, "<i4"),
    (79, "<i8"),
    (80, ">f2"),
    (81, ">f4"),
    (82, ">f8"),
    (84, "<f2"),
    (85, "<f4"),
    (86, "<f8"),
]


@pytest.mark.parametrize(("tag", "dtype"), TYPED)
def test_typed_arrays_take_the_tags_dtype_and_byte_order(tag: int, dtype: str) -> None:
    array = (np.arange(24) * 3).astype(dtype)
    value = cbor.loads(cbor2.dumps(CBORTag(tag, array.tobytes())))
    assert value.dtype == np.dtype(dtype)
    assert np.array_equal(value, array)
    assert not value.flags.writeable


@pytest.mark.parametrize("tag", [76, 83, 87])
def test_typed_arrays_numpy_cannot_hold_are_unknown_type(tag: int) -> None:
    assert reason(cbor2.dumps(CBORTag(tag, b"\x00" * 16))) == "unknown_type"


def test_tag_40_shapes_a_typed_array_row_major() -> None:
    array = np.arange(6 * 5, dtype="<u4").reshape(6, 5)
    value = cbor.loads(cbor2.dumps(CBORTag(40, [[6, 5], CBORTag(70, array.tobytes())])))
    assert value.shape == (6, 5)
    assert np.array_equal(value, array)


@pytest.mark.parametrize("codec", ["bslz4", "lz4"])
@pytest.mark.parametrize("dtype", ["<u2", "<u4", "|u1"])
def test_tag_56500_inside_a_typed_array_is_encoded_and_decodes_exactly(
    codec: str, dtype: str
) -> None:
    array = np.random.default_rng(1).integers(0, 200, size=(33, 47)).astype(dtype)
    tag = {"|u1": 64, "<u2": 69, "<u4": 70}[dtype]
    elem = array.dtype.itemsize if codec == "bslz4" else 0
    packed = CBORTag(56500, [codec, elem, compress(codec, array)])
    value = cbor.loads(cbor2.dumps(CBORTag(40, [[33, 47], CBORTag(tag, packed)])))
    assert isinstance(value, Encoded)
    assert (value.codec, value.dtype, value.shape) == (codec, np.dtype(dtype), (33, 47))
    assert np.array_equal(value.decode(), array)


def test_jungfraujoch_bitshuffle_zstd_decodes_exactly() -> None:
    if not hasattr(bitshuffle, "decompress_zstd"):
        pytest.skip("this bitshuffle was built without zstd")
    array = np.random.default_rng(2).integers(0, 3000, size=(16, 24)).astype("<u2")
    packed = CBORTag(56500, ["bszstd", 2, compress("bszstd", array)])
    value = cbor.loads(cbor2.dumps(CBORTag(40, [[16, 24], CBORTag(69, packed)])))
    assert isinstance(value, Encoded) and value.codec == "bszstd"
    assert np.array_equal(value.decode(), array)


def test_tag_56500_alone_is_a_byte_string_of_its_element_size() -> None:
    array = np.arange(100, dtype="<u2")
    value = cbor.loads(cbor2.dumps(CBORTag(56500, ["bslz4", 2, compress("bslz4", array)])))
    assert isinstance(value, Encoded) and value.shape == (100,)
    assert np.array_equal(value.decode().view("<u2"), array)


def test_rationals_self_description_and_unknown_tags() -> None:
    assert cbor.loads(cbor2.dumps(CBORTag(30, [1, 4]))) == 0.25
    assert cbor.loads(cbor2.dumps(CBORTag(55799, {"type": "end"}))) == {"type": "end"}
    assert cbor.loads(cbor2.dumps(CBORTag(0, "2023-02-10T15:49:05Z"))) == "2023-02-10T15:49:05Z"
    assert cbor.loads(cbor2.dumps(CBORTag(12345, [1, 2]))) == [1, 2]


def test_every_truncation_of_a_message_is_refused_as_truncated() -> None:
    array = np.arange(64, dtype="<u2").reshape(8, 8)
    whole = cbor2.dumps(
        {
            "type": "image",
            "image_id": 7,
            "start_time": [1, 10],
            "data": {"a": CBORTag(40, [[8, 8], CBORTag(69, array.tobytes())])},
        }
    )
    assert cbor.loads(whole)["image_id"] == 7
    reasons = {reason(whole[:cut]) for cut in range(len(whole))}
    assert reasons == {"truncated"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x81" * 200 + b"\x00", "too_deep"),  # arrays in arrays
        (b"\xa1\x00" * 200 + b"\x00", "too_deep"),  # maps in maps
        (b"\xc6" * 200 + b"\x00", "too_deep"),  # tags on tags
        (b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),  # 2**64 items, no bytes
        (b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00", "truncated"),  # 2**32 pairs
        (b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", "truncated"),  # a huge byte string
        (b"\x1c", "bad_cbor"),  # reserved additional information
        (b"\x3f", "bad_cbor"),  # an indefinite negative integer
        (b"\x01\x02", "bad_cbor"),  # bytes after the item
        (b"\xff", "bad_cbor"),  # a break with nothing to end
        (b"\x82\x01\xff", "bad_cbor"),  # a break in a definite array
        (b"\x62\xff\xfe", "bad_cbor"),  # text that is not UTF-8
        (b"\xf0", "bad_cbor"),  # an unassigned simple value
        (b"\xa1\x80\x00", "bad_cbor"),  # an array as a map key
        (b"\x7f\x41\x00\xff", "bad_cbor"),  # a byte chunk in a text string
    ],
)
def test_malformed_cbor_is_refused_by_reason(data: bytes, expected: str) -> None:
    assert reason(data) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (CBORTag(30, [1, 0]), "bad_cbor"),  # a zero denominator
        (CBORTag(30, "1/2"), "bad_cbor"),
        (CBORTag(40, [[2, 2], CBORTag(69, b"\x00" * 6)]), "size"),  # dims != elements
        (CBORTag(40, [[2, -2], CBORTag(69, b"\x00" * 8)]), "bad_cbor"),
        (CBORTag(40, [[2, 2], b"\x00" * 4]), "bad_cbor"),  # not a typed array
        (CBORTag(69, b"\x00" * 5), "size"),  # not whole uint16s
        (CBORTag(69, [1, 2]), "bad_cbor"),
        (CBORTag(56500, ["zip", 2, b"\x00" * 20]), "unknown_encoding"),
        (CBORTag(56500, ["bslz4", 2]), "bad_cbor"),
        (CBORTag(56500, ["bslz4", 2, b"\x00" * 5]), "truncated"),
        (CBORTag(56500, ["bslz4", 3, struct.pack(">QI", 12, 8192)]), "bad_cbor"),
        (CBORTag(56500, ["bslz4", 2, struct.pack(">QI", 2**40, 8192) + b"\x00" * 8]), "size"),
        (
            CBORTag(70, CBORTag(56500, ["bslz4", 2, compress("bslz4", np.zeros(4, "<u2"))])),
            "bad_cbor",
        ),
    ],
)
def test_malformed_tags_are_refused_by_reason(value: object, expected: str) -> None:
    assert reason(cbor2.dumps(value)) == expected
