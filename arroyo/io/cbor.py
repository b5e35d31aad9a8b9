"""A small CBOR reader (RFC 8949) for untrusted detector messages (DECTRIS Stream V2).

Why our own and not ``cbor2``: a Stream V2 image is one CBOR message of a few MB, and
the listener must keep up with the detector. This reader returns every byte string
as a ``memoryview`` slice of the received frame (never a copy), and turns the tags
Stream V2 uses into what Arroyo carries:

* RFC 8746 typed arrays, tags 64..87 (the tag number gives the element type and byte
  order): a read-only numpy view of the bytes, in that dtype;
* RFC 8746 tag 40 ``[dims, typed array]`` (row-major): that view reshaped to ``dims``;
* DECTRIS tag 56500 ``[codec, elem_size, bytes]`` (a compressed byte string, allowed
  wherever a byte string is): an ``arroyo.message.Encoded``, typed and shaped by the
  tags around it and left compressed (decoded where user code reads it). Codecs
  ``bslz4``, ``lz4`` (HDF5 framings) and ``bszstd`` (Jungfraujoch);
* tag 30 rational ``[num, den]``: a float (``num / den``);
* tag 55799 (self-described CBOR, which DECTRIS puts around every message): its
  content; tag 0 and 1 (date/time) and any other tag: its content, untouched.

Nothing in the input is trusted: every length is checked against the bytes left
(``truncated``), nesting of arrays, maps and tags is bounded (``too_deep``, at
``arroyo.io.guard.MAX_DEPTH``), a declared decompressed size must be within what the
codec can produce from the bytes sent (``size``). Errors are ``WireError`` with
reasons ``truncated``, ``too_deep``, ``bad_cbor`` (malformed CBOR or a tag whose
content is of the wrong form), ``unknown_type`` (a typed array of a type numpy cannot
hold: float128, reserved tag 76), ``unknown_encoding`` (a 56500 codec we cannot
decode), ``size``.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Any

import numpy as np

from arroyo.compression import check_size, declared_size
from arroyo.errors import WireError
from arroyo.io.guard import MAX_DEPTH
from arroyo.message import Encoded

SELF_DESCRIBED = 55799
RATIONAL = 30
MULTI_DIM = 40
COMPRESSED = 56500
#: Tag 56500 codecs, by the names DECTRIS and Jungfraujoch use (the same as
#: ``arroyo.compression``'s): all three start with the HDF5 filters' 12-byte header.
CODECS = ("bslz4", "lz4", "bszstd")

_BREAK = object()  # the "break" stop code of an indefinite-length item
_HALF, _FLOAT, _DOUBLE = struct.Struct(">e"), struct.Struct(">f"), struct.Struct(">d")
_UINT = (struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q"))


def typed_array_dtype(tag: int) -> np.dtype[Any]:
    """The numpy dtype of RFC 8746 typed-array tag ``tag`` (64..87).

    The tag is ``0b010_f_s_e_ll``: f float, s signed, e little-endian, ll the size
    (1, 2, 4, 8 bytes; for floats 2, 4, 8, 16). Tag 68 is uint8 "clamped" (same bytes).
    """
    bits = tag - 64
    floating, signed, little, size = bits >> 4 & 1, bits >> 3 & 1, bits >> 2 & 1, bits & 3
    order = "<" if little else ">"
    if floating:
        if signed or size == 3:
            msg = f"typed array tag {tag} (float128 or reserved) is not supported"
            raise WireError(msg, reason="unknown_type")
        return np.dtype(f"{order}f{2 << size}")
    if signed and size == 0 and little:
        msg = f"typed array tag {tag} is reserved"
        raise WireError(msg, reason="unknown_type")
    kind = "i" if signed else "u"
    return np.dtype(f"{order if size else '|'}{kind}{1 << size}")


def loads(data: Any, max_depth: int = MAX_DEPTH) -> Any:
    """The one CBOR data item in ``data`` (any buffer: bytes, a zmq Frame's buffer).
    Byte strings and arrays returned are views of ``data``, valid as long as it is.
    Raises ``WireError`` (reasons in the module docstring)."""
    buf = getattr(data, "buffer", None)  # a zmq.Frame
    view = memoryview(buf if buf is not None else data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    reader = _Reader(view, max_depth)
    value = reader.item(0)
    if value is _BREAK:
        msg = "a break code outside an indefinite-length item"
        raise WireError(msg, reason="bad_cbor")
    if reader.pos != len(view):
        msg = f"{len(view) - reader.pos} bytes after the CBOR item"
        raise WireError(msg, reason="bad_cbor")
    return value


class _Reader:
    def __init__(self, view: memoryview, max_depth: int) -> None:
        self.view, self.pos, self.max_depth = view, 0, max_depth

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.view):
            msg = f"{n} bytes wanted at byte {self.pos}, {len(self.view) - self.pos} left"
            raise WireError(msg, reason="truncated")
        chunk = self.view[self.pos : end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int, int | None]:
        """(major type, additional info, argument or None for indefinite length)."""
        (initial,) = self.take(1)
        major, info = initial >> 5, initial & 31
        if info < 24:
            return major, info, info
        if info < 28:
            return major, info, _UINT[info - 24].unpack(self.take(1 << (info - 24)))[0]
        if info == 31 and major in (2, 3, 4, 5, 7):
            return major, info, None
        msg = f"reserved additional information {info} (major type {major})"
        raise WireError(msg, reason="bad_cbor")

    def item(self, depth: int) -> Any:
        major, info, arg = self.head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg  # type: ignore[operator]  # never indefinite: head() refuses
        if major in (2, 3):
            return self.string(major, arg, depth)
        if major == 7:
            return self.simple(info, arg)
        if depth >= self.max_depth:
            msg = f"CBOR nested deeper than {self.max_depth} levels"
            raise WireError(msg, reason="too_deep")
        if major == 4:
            return self.array(arg, depth + 1)
        if major == 5:
            return self.map(arg, depth + 1)
        return self.tag(arg, depth + 1)  # type: ignore[arg-type]

    def string(self, major: int, arg: int | None, depth: int) -> Any:
        if arg is None:  # indefinite length: definite chunks of the same type, joined
            chunks: list[Any] = []
            while (chunk := self.item(depth)) is not _BREAK:
                if not isinstance(chunk, memoryview if major == 2 else str):
                    msg = "an indefinite-length string holds a chunk of another type"
                    raise WireError(msg, reason="bad_cbor")
                chunks.append(chunk)
            if major == 2:
                return memoryview(b"".join(chunks))
            return "".join(chunks)
        raw = self.take(arg)
        if major == 2:
            return raw
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            msg = f"text string is not UTF-8: {e}"
            raise WireError(msg, reason="bad_cbor") from e

    def simple(self, info: int, arg: int | None) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info in (22, 23):  # null, undefined
            return None
        if info in (25, 26, 27):
            size = 1 << (info - 24)
            self.pos -= size  # re-read the argument bytes as a float
            packer = {2: _HALF, 4: _FLOAT, 8: _DOUBLE}[size]
            return packer.unpack(self.take(size))[0]
        if arg is None:
            return _BREAK
        msg = f"unassigned simple value {arg}"
        raise WireError(msg, reason="bad_cbor")

    def array(self, arg: int | None, depth: int) -> list[Any]:
        if arg is None:
            out = []
            while (value := self.item(depth)) is not _BREAK:
                out.append(value)
            return out
        self.room(arg)
        return [self.value(depth) for _ in range(arg)]

    def map(self, arg: int | None, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        if arg is None:
            while (key := self.item(depth)) is not _BREAK:
                out[_key(key)] = self.value(depth)
            return out
        self.room(2 * arg)
        for _ in range(arg):
            key = _key(self.value(depth))
            out[key] = self.value(depth)
        return out

    def room(self, items: int) -> None:
        """Every item takes at least one byte: refuse a count the bytes left cannot
        hold before building anything for it."""
        if items > len(self.view) - self.pos:
            msg = (
                f"{items} items declared at byte {self.pos}, {len(self.view) - self.pos} bytes left"
            )
            raise WireError(msg, reason="truncated")

    def value(self, depth: int) -> Any:
        value = self.item(depth)
        if value is _BREAK:
            msg = "a break code inside a definite-length item"
            raise WireError(msg, reason="bad_cbor")
        return value

    def tag(self, number: int, depth: int) -> Any:
        content = self.value(depth)
        if number == RATIONAL:
            return rational(content)
        if number == MULTI_DIM:
            return _multi_dim(content)
        if 64 <= number <= 87:
            return _typed_array(number, content)
        if number == COMPRESSED:
            return _compressed(content)
        return content  # 55799 self-described, 0/1 date/time, and tags we do not know


def _key(key: Any) -> Any:
    if isinstance(key, memoryview):
        return bytes(key)
    if isinstance(key, str | int | float | bool) or key is None:
        return key
    msg = f"a map key of type {type(key).__name__}"
    raise WireError(msg, reason="bad_cbor")


def rational(value: Any) -> float:
    """``[numerator, denominator]`` as a float (Stream V2's times, in seconds)."""
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        or value[1] == 0
    ):
        msg = f"a rational is two integers, the second not 0: {value!r:.60}"
        raise WireError(msg, reason="bad_cbor")
    return value[0] / value[1]


def _compressed(content: Any) -> Encoded:
    """Tag 56500 on its own: an ``Encoded`` byte string (uint8, or the elements of
    ``elem_size`` bytes it declares); a typed-array tag around it retypes it."""
    if (
        not isinstance(content, list)
        or len(content) != 3
        or not isinstance(content[0], str)
        or not isinstance(content[1], int)
        or not isinstance(content[2], memoryview)
    ):
        msg = "tag 56500 holds [codec, elem_size, bytes]"
        raise WireError(msg, reason="bad_cbor")
    codec, elem_size, data = content
    if codec not in CODECS:
        msg = f"unknown compression {codec!r:.40} in tag 56500 (known: {', '.join(CODECS)})"
        raise WireError(msg, reason="unknown_encoding")
    if codec == "bszstd" and not _zstd_available():
        msg = "bszstd (Jungfraujoch) needs bitshuffle built with zstd; this one has none"
        raise WireError(msg, reason="unknown_encoding")
    size = _decoded_size(codec, data)
    if codec == "lz4":  # the modifier is unused (0)
        return Encoded(codec, np.uint8, (size,), data)
    if elem_size not in (1, 2, 4, 8) or size % elem_size:
        msg = f"{codec} element size {elem_size} for {size} bytes"
        raise WireError(msg, reason="bad_cbor")
    return Encoded(codec, f"u{elem_size}", (size // elem_size,), data)


@functools.cache
def _zstd_available() -> bool:
    try:
        import bitshuffle
    except ImportError:
        return True  # decoding will say which extra is missing
    return hasattr(bitshuffle, "decompress_zstd")


def _decoded_size(codec: str, data: memoryview) -> int:
    """The decoded size the HDF5-filter header of ``data`` declares, once it is known
    to be within what ``codec`` can make of ``len(data)`` bytes."""
    size = declared_size(data)
    if size is None:
        msg = f"{codec} data of {len(data)} bytes is shorter than its 12-byte header"
        raise WireError(msg, reason="truncated")
    check_size(codec, len(data), size)
    return size


def _typed_array(tag: int, content: Any) -> np.ndarray | Encoded:
    dtype = typed_array_dtype(tag)
    if isinstance(content, Encoded):
        size = content.decoded_nbytes
        if size % dtype.itemsize:
            msg = f"{size} compressed bytes are not whole {dtype.str} elements"
            raise WireError(msg, reason="size")
        if content.codec != "lz4" and content.dtype.itemsize != dtype.itemsize:
            msg = f"tag 56500 element size {content.dtype.itemsize} for a {dtype.str} array"
            raise WireError(msg, reason="bad_cbor")
        return Encoded(content.codec, dtype, (size // dtype.itemsize,), content.data)
    if not isinstance(content, memoryview):
        msg = f"typed array tag {tag} holds a {type(content).__name__}, not a byte string"
        raise WireError(msg, reason="bad_cbor")
    if len(content) % dtype.itemsize:
        msg = f"a typed array of {len(content)} bytes is not whole {dtype.str} elements"
        raise WireError(msg, reason="size")
    array = np.frombuffer(content, dtype=dtype)
    array.flags.writeable = False
    return array


def _multi_dim(content: Any) -> np.ndarray | Encoded:
    if (
        not isinstance(content, list)
        or len(content) != 2
        or not isinstance(content[0], list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in content[0])
        or not isinstance(content[1], np.ndarray | Encoded)
    ):
        msg = "tag 40 holds [[dims...], typed array]"
        raise WireError(msg, reason="bad_cbor")
    dims, array = tuple(content[0]), content[1]
    count = array.size if isinstance(array, np.ndarray) else math.prod(array.shape)
    if math.prod(dims) != count or len(dims) > 32:
        msg = f"tag 40 dims {list(dims)[:8]} do not hold the {count} elements given"
        raise WireError(msg, reason="size")
    if isinstance(array, Encoded):
        return Encoded(array.codec, array.dtype, dims, array.data)
    return array.reshape(dims)
