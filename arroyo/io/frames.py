"""One broker value per Arroyo message: a store that holds one value per entry (a
Redis stream entry, a message on a queue) carries the frames of a wire message packed
with ``pack_frames``; other codecs' frames are simply joined (docs/redis.md)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from arroyo import wire
from arroyo.errors import WireError
from arroyo.io.codecs import Codec, get_codec
from arroyo.message import Message

MAGIC = b"AYF1"
MAX_FRAMES = wire.MAX_BUFFERS + 1  # the header frame and one frame per buffer
_ALIGN = 8


def _aligned(pos: int) -> int:
    return (pos + _ALIGN - 1) // _ALIGN * _ALIGN


def _byte_view(frame: Any) -> memoryview:
    if isinstance(frame, np.ndarray):
        frame = np.ascontiguousarray(frame).reshape(-1).view(np.uint8)
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def pack_frames(frames: Sequence[Any]) -> bytearray:
    """Pack the frames of one Arroyo wire message into one broker value.

    Layout (little-endian): ``b"AYF1"``, frame count ``n`` (uint32), ``n`` frame
    lengths (uint64), then the frames, each starting at an offset that is a multiple
    of 8 (zero bytes in between, none after the last). The alignment lets numpy
    arrays decoded from the value be aligned views over it.
    """
    views = [_byte_view(f) for f in frames]
    if not 1 <= len(views) <= MAX_FRAMES:
        msg = f"a message has 1 to {MAX_FRAMES} frames, not {len(views)}"
        raise WireError(msg, reason="encode")
    starts = []
    pos = 8 + 8 * len(views)
    for v in views:
        pos = _aligned(pos)
        starts.append(pos)
        pos += v.nbytes
    out = bytearray(pos)
    struct.pack_into(f"<4sI{len(views)}Q", out, 0, MAGIC, len(views), *(v.nbytes for v in views))
    for start, v in zip(starts, views, strict=True):
        out[start : start + v.nbytes] = v
    return out


def unpack_frames(value: Any) -> list[memoryview]:
    """The frames packed by ``pack_frames``, as views over ``value`` (no copy).

    ``value`` is untrusted: anything that is not exactly such a layout raises
    ``WireError``.
    """
    buf = _byte_view(value)
    if len(buf) < 8 or bytes(buf[:4]) != MAGIC:
        msg = f"not an arroyo-framed broker value (expected it to start with {MAGIC!r})"
        raise WireError(msg)
    (n,) = struct.unpack_from("<I", buf, 4)
    if not 1 <= n <= MAX_FRAMES:
        msg = f"arroyo-framed value declares {n} frames (1 to {MAX_FRAMES} allowed)"
        raise WireError(msg)
    pos = 8 + 8 * n
    if len(buf) < pos:
        msg = f"arroyo-framed value of {len(buf)} bytes is shorter than its frame table"
        raise WireError(msg)
    frames = []
    for length in struct.unpack_from(f"<{n}Q", buf, 8):
        pos = _aligned(pos)
        if pos + length > len(buf):
            msg = f"arroyo-framed value of {len(buf)} bytes is shorter than its frames declare"
            raise WireError(msg)
        frames.append(buf[pos : pos + length])
        pos += length
    if pos != len(buf):
        msg = f"arroyo-framed value has {len(buf) - pos} bytes after its last frame"
        raise WireError(msg)
    return frames


def value_codec(codec: str, dtype: str = "", shape: tuple[int, ...] = ()) -> Codec:
    """The codec named by a broker end's options; ``ValueError`` naming it if it is
    not one (or ``array`` without a dtype and shape)."""
    try:
        return get_codec(codec, dtype=dtype, shape=shape)
    except ValueError as e:
        msg = f"codec {codec!r}: {e}"
        raise ValueError(msg) from e


def encode_value(codec: Codec, message: Message) -> bytes | bytearray | None:
    """One broker value for ``message`` (None: the codec sends nothing for it).

    The ``arroyo`` codec's frames are packed with ``pack_frames``; any other codec's
    frames are concatenated (``json`` and user codecs normally return one frame).
    """
    frames = codec.encode(message)
    if frames is None:
        return None
    if codec.name == "arroyo":
        return pack_frames(frames)
    return b"".join(_byte_view(f) for f in frames)


def decode_value(codec: Codec, value: Any) -> list[Message]:
    """The messages in one broker value. Raises whatever the codec raises on foreign
    input: call it through ``arroyo.io.guard.DecodeGuard``."""
    frames: list[Any] = unpack_frames(value) if codec.name == "arroyo" else [value]
    result = codec.decode(frames)
    if isinstance(result, Message):
        return [result]
    return list(result or [])
