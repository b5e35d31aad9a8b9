"""The Tiled listener's pure parts: which rows a stream update wrote, the dtype of a
stream schema, the websocket address, and its option errors."""

from __future__ import annotations

import numpy as np
import pytest

from arroyo.errors import ConfigError
from arroyo.io._tiled_stream import stream_url
from arroyo.io.tiled_listener import TiledListener, _dtype, _rows


def test_rows_of_an_append_a_block_write_and_a_whole_write() -> None:
    assert _rows({"shape": [3, 4, 4], "offset": [5, 0, 0], "block": None}, None) == (5, 8)
    assert _rows({"shape": [2, 4], "offset": None, "block": [2, 0]}, (4, 4, 4)) == (8, 10)
    assert _rows({"shape": [7, 4], "offset": None, "block": None}, None) == (0, 7)
    # a block write whose chunks are unknown, or a message without a shape: cannot tell
    assert _rows({"shape": [2, 4], "offset": None, "block": [1, 0]}, None) is None
    assert _rows({"offset": [1]}, None) is None


def test_dtype_of_a_stream_schema() -> None:
    assert _dtype({"endianness": "little", "kind": "f", "itemsize": 4}) == np.dtype("<f4")
    assert _dtype({"endianness": "big", "kind": "u", "itemsize": 2}) == np.dtype(">u2")
    assert _dtype({"endianness": "not_applicable", "kind": "u", "itemsize": 1}) == np.uint8
    assert _dtype({"kind": "", "itemsize": 4}) is None
    assert _dtype({"kind": "f", "itemsize": -4}) is None
    assert _dtype({"fields": []}) is None


def test_stream_url() -> None:
    url = "ws://h:8000/api/v1/stream/single/raw/run%201?envelope_format=msgpack"
    assert stream_url("http://h:8000", "raw/run 1") == url
    assert stream_url("https://h/tiled/", "").startswith("wss://h/tiled/api/v1/stream/single/")


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"url": "127.0.0.1:8000"}, "url '127.0.0.1:8000'"),
        ({"url": "http://h", "arrays": " , "}, "arrays"),
        ({"url": "http://h", "start": "newest"}, "start 'newest'"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        TiledListener(**options)  # type: ignore[arg-type]


def test_the_key_is_not_in_its_repr() -> None:
    assert "s3cret" not in repr(TiledListener(url="http://h", api_key="s3cret"))


@pytest.mark.parametrize(
    "message",
    [
        {"shape": "tall", "offset": None},
        {"shape": [2, 4], "offset": ["x"]},
        {"shape": [2, 4], "offset": [-5]},
        {"shape": [-3, 4], "offset": None},
        {"shape": [2], "offset": None, "block": [{}]},
    ],
)
def test_an_update_not_as_tiled_sends_it_is_a_value_error(message: dict) -> None:
    with pytest.raises(ValueError):
        _rows(message, (4, 4))


def test_malformed_stream_messages_are_counted_drops_and_the_run_goes_on() -> None:
    from arroyo.io.tiled_listener import _Array, _Run

    listener = TiledListener(url="http://h", node="raw")
    run = listener._run = _Run("run_1", {})
    array = run.arrays["data"] = _Array("data")
    array.dtype = np.dtype("<u2")
    listener._on_rows(run, array, {"shape": ["two"], "offset": [0]})
    # a metadata that is no map, a key that is no string: ignored, nothing raised
    listener._on_node(
        "container-child-created",
        {"structure_family": "container", "key": "run_2", "metadata": [1]},
    )
    listener._on_array(run, array, "array-schema", {"data_type": ["f", 4]})
    assert listener.drops() == {"malformed": 1}
    assert array.next == 0 and array.dtype is None
    assert [r.metadata for r in listener._waiting] == [{}]
