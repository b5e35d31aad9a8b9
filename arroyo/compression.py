"""The compressions detectors stream their frames in, decoded where the work is.

A detector's frame reaches Arroyo compressed and travels on as it came
(``arroyo.message.Encoded``): the listener has to keep up with the detector, so it
does not decode. ``decompress`` runs the first time user code reads the payload, in
whichever worker that is. Codecs, by the names the DECTRIS streams use:

* ``bslz4``: bitshuffle + LZ4 in the HDF5 filter's framing (filter 32008): a 12-byte
  header (uint64 big-endian decoded size, uint32 big-endian block size in bytes),
  then the blocks, each a uint32 big-endian compressed size and its LZ4 data;
* ``bszstd``: the same framing with zstd blocks (PSI's Jungfraujoch);
* ``bslz4-bare``: the bitshuffle-LZ4 blocks without that header, as bitshuffle's own
  ``compress_lz4`` writes them (areaDetector and MAX IV senders may), in blocks of
  bitshuffle's default size (``default_block``);
* ``lz4``: the HDF5 LZ4 filter's framing (filter 32004): uint64 big-endian decoded
  size, uint32 big-endian block size, then per block a uint32 big-endian compressed
  size and an LZ4 block (stored raw when it would not shrink);
* ``lz4-block``: one bare LZ4 block with no header (Stream V1's ``lz4<``);
* ``none``: the raw bytes.

bitshuffle and lz4 are the optional extra ``arroyo[detectors]``; the core imports
this module without them, and the first use without them raises ``MissingExtra``.

A decoder of foreign bytes checks sizes before it allocates: the decoded size the
header declares must equal what the message's dtype and shape say (``size``), and an
array can never be larger than ``MAX_RATIO`` times its compressed bytes, so a short
message cannot make a worker allocate gigabytes.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from arroyo.errors import WireError

CODECS = ("bslz4", "bslz4-bare", "bszstd", "lz4", "lz4-block", "none")
EXTRA = "pip install 'arroyo[detectors]'"
HEADER = struct.Struct(">QI")  # the HDF5 filters' framing: decoded size, block size
BLOCK = struct.Struct(">I")
# LZ4 cannot shrink data more than 255:1; zstd can, but no detector frame holds
# more than a few thousand identical bytes per byte sent.
MAX_RATIO = {
    **{"lz4": 256, "lz4-block": 256, "bslz4": 256, "bslz4-bare": 256},
    **{"bszstd": 1 << 16, "none": 1},
}


def check_size(codec: str, nbytes: int, decoded: int) -> None:
    """``WireError``: ``unknown_encoding`` for a codec not in ``CODECS``, ``size`` when
    ``nbytes`` of it cannot decode to ``decoded`` bytes (cheap: a listener checks it on
    arrival, before the frame travels on)."""
    ratio = MAX_RATIO.get(codec)
    if ratio is None:
        msg = f"unknown compression {codec!r:.40} (known: {', '.join(CODECS)})"
        raise WireError(msg, reason="unknown_encoding")
    if decoded > ratio * nbytes + 64:
        msg = f"{nbytes} bytes of {codec} cannot decode to {decoded} bytes"
        raise WireError(msg, reason="size")


def declared_size(data: Any) -> int | None:
    """The decoded size an HDF5-filter framed buffer's header declares (None: too short
    to have one)."""
    view = _view(data)
    return int(HEADER.unpack_from(view)[0]) if len(view) >= HEADER.size else None


def default_block(itemsize: int) -> int:
    """bitshuffle's block when asked for 0, in elements: 8 KiB, whole groups of 8, at
    least 128."""
    return max(128, (8192 // itemsize) // 8 * 8)


class MissingExtra(ImportError):
    """The detector extra is not installed; the message says how to install it."""


def require() -> None:
    """Raise ``MissingExtra`` unless bitshuffle and lz4 can be imported."""
    _bitshuffle()
    _lz4()


def _bitshuffle() -> Any:
    try:
        import bitshuffle
    except ImportError as e:
        msg = f"bitshuffle is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    return bitshuffle


def _lz4() -> Any:
    try:
        import lz4.block
    except ImportError as e:
        msg = f"lz4 is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    return lz4.block


def _view(data: Any) -> memoryview:
    buf = getattr(data, "buffer", None)  # a zmq.Frame
    view = buf if buf is not None else memoryview(data)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def decompress(codec: str, data: Any, dtype: Any, shape: Any) -> np.ndarray:
    """``data`` (any buffer) compressed with ``codec``, decoded to an array of
    ``dtype`` and ``shape``. Raises ``WireError``: ``unknown_encoding``, ``size`` (the
    declared and the decoded size disagree), ``undecodable`` (corrupt data)."""
    dtype, shape = np.dtype(dtype), tuple(shape)
    view = _view(data)
    size = dtype.itemsize * math.prod(shape)
    check_size(codec, len(view), size)
    if codec == "none":
        flat = _exact(np.frombuffer(view, np.uint8), size, codec)
    elif codec == "lz4-block":
        flat = _lz4_block(view, size)
    elif codec == "lz4":
        flat = _hdf5_lz4(view, size)
    else:
        flat = _bitshuffled(codec, view, dtype, size)
    return flat.view(dtype).reshape(shape)


def _exact(flat: np.ndarray, size: int, codec: str) -> np.ndarray:
    if flat.nbytes != size:
        msg = f"{codec} data decodes to {flat.nbytes} bytes, not the {size} declared"
        raise WireError(msg, reason="size")
    return flat


def _header(view: memoryview, size: int, codec: str) -> int:
    """The block size of an HDF5-filter framed buffer, after checking its size."""
    if len(view) < HEADER.size:
        msg = f"{codec} data of {len(view)} bytes is shorter than its 12-byte header"
        raise WireError(msg, reason="undecodable")
    total, block = HEADER.unpack_from(view)
    if total != size:
        msg = f"{codec} header declares {total} bytes, the array {size}"
        raise WireError(msg, reason="size")
    return int(block)


def _lz4_block(view: memoryview, size: int) -> np.ndarray:
    block = _lz4()
    try:
        out = block.decompress(view, uncompressed_size=size)
    except Exception as e:  # lz4 raises LZ4BlockError on garbage
        msg = f"lz4 block does not decode: {e}"
        raise WireError(msg, reason="undecodable") from e
    return _exact(np.frombuffer(out, np.uint8), size, "lz4-block")


def _hdf5_lz4(view: memoryview, size: int) -> np.ndarray:
    block_size = _header(view, size, "lz4")
    if block_size <= 0 and size:
        msg = "lz4 header declares a block size of 0"
        raise WireError(msg, reason="undecodable")
    lz4 = _lz4()
    out = np.empty(size, np.uint8)
    pos, done = HEADER.size, 0
    while done < size:
        want = min(block_size, size - done)
        if pos + BLOCK.size > len(view):
            msg = f"lz4 data ends after {done} of {size} bytes"
            raise WireError(msg, reason="undecodable")
        (n,) = BLOCK.unpack_from(view, pos)
        pos += BLOCK.size
        chunk = view[pos : pos + n]
        if len(chunk) != n:
            msg = f"lz4 block of {n} bytes is cut at {len(chunk)}"
            raise WireError(msg, reason="undecodable")
        if n == want:  # the filter stores a block that would not shrink as it is
            out[done : done + n] = np.frombuffer(chunk, np.uint8)
        else:
            try:
                out[done : done + want] = np.frombuffer(
                    lz4.decompress(chunk, uncompressed_size=want), np.uint8
                )
            except Exception as e:  # a corrupt block, or one of the wrong size
                msg = f"lz4 block at byte {pos} does not decode: {e}"
                raise WireError(msg, reason="undecodable") from e
        pos, done = pos + n, done + want
    return out


def _bitshuffled(codec: str, view: memoryview, dtype: np.dtype[Any], size: int) -> np.ndarray:
    if codec == "bslz4-bare":
        block_bytes, start = default_block(dtype.itemsize) * dtype.itemsize, 0
    else:
        block_bytes, start = _header(view, size, codec), HEADER.size
    if block_bytes % dtype.itemsize:
        msg = f"{codec} block of {block_bytes} bytes is not whole {dtype.str} elements"
        raise WireError(msg, reason="undecodable")
    bs = _bitshuffle()
    body = np.frombuffer(view, np.uint8)[start:]
    count = size // dtype.itemsize
    unpack = bs.decompress_zstd if codec == "bszstd" else bs.decompress_lz4
    try:
        out = unpack(body, (count,), dtype, block_bytes // dtype.itemsize)
    except Exception as e:  # bitshuffle raises RuntimeError/ValueError on garbage
        msg = f"{codec} data does not decode: {e}"
        raise WireError(msg, reason="undecodable") from e
    return out.view(np.uint8)


def compress(codec: str, array: np.ndarray, block_size: int = 0) -> bytes:
    """``array`` compressed as ``codec`` (for simulators and tests; a detector does
    this in its own hardware). ``block_size`` in elements, 0 for the library's own."""
    array = np.ascontiguousarray(array)
    raw = array.reshape(-1).view(np.uint8)
    if codec == "none":
        return raw.tobytes()
    if codec == "lz4-block":
        return bytes(_lz4().compress(raw, store_size=False))
    if codec == "lz4":
        return _hdf5_lz4_compress(raw, block_size * array.itemsize or 1 << 30)
    if codec in ("bslz4", "bszstd", "bslz4-bare"):
        bs = _bitshuffle()
        flat = array.reshape(-1)
        if codec == "bszstd":
            body = bs.compress_zstd(flat, block_size)
        else:
            body = bs.compress_lz4(flat, block_size)
        if codec == "bslz4-bare":  # (decoded in default blocks: it has no header to say)
            return bytes(body.tobytes())
        elements = block_size or default_block(array.itemsize)
        return HEADER.pack(raw.nbytes, elements * array.itemsize) + body.tobytes()
    msg = f"unknown compression {codec!r} (known: {', '.join(CODECS)})"
    raise ValueError(msg)


def _hdf5_lz4_compress(raw: np.ndarray, block_bytes: int) -> bytes:
    lz4 = _lz4()
    parts = [HEADER.pack(raw.nbytes, block_bytes)]
    for start in range(0, raw.nbytes, block_bytes):
        block = raw[start : start + block_bytes]
        packed = lz4.compress(block, store_size=False)
        if len(packed) >= block.nbytes:
            packed = block.tobytes()
        parts += [BLOCK.pack(len(packed)), packed]
    return b"".join(parts)
