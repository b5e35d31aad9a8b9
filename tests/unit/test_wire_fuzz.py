"""Fuzzing ``wire.decode``: whatever arrives, it returns a Message or raises WireError.

Deterministic (fixed seed), so a failure reproduces; the failing frames are printed.
"""

from __future__ import annotations

import random
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from arroyo import wire
from arroyo.errors import WireError
from arroyo.message import Event, Message, Start, Stop, payload_nbytes

SEED = 0xA770
CASES = 12_000

Frames = list[bytes]

# ---------------------------------------------------------------- valid seeds


def _corpus() -> list[Frames]:
    rng = np.random.default_rng(SEED)
    messages: list[Message] = [
        Start(data={"sample": "Si", "exposure": 0.1, "shape": [4, 4]}, run=1),
        Stop(data={"interrupted": False}, run=1, seq=3),
        Event(metadata={"frame": 0}, payload=None, run=1, seq=0),
        Event(metadata={"b": b"\x00\x01"}, payload=b"raw bytes here", run=1, seq=1),
        Event(payload=rng.integers(0, 900, (4, 4)).astype("<u2"), run=1, seq=2),
        Event(payload=np.array(3.5, dtype=">f8"), run=2, seq=0),
        Event(payload=np.zeros((0, 3), dtype="<c8"), run=2, seq=1),
        Event(
            metadata={"nested": {"l": [1, 2.5, None, True, "x"]}},
            payload={
                "img": rng.random((3, 5)).astype("<f4"),
                "mask": np.ones((3, 5), dtype="|b1"),
                "t": np.array([1, 2], dtype="<M8[ns]"),
                "s": np.array(["ab", "c"], dtype="<U2"),
            },
            run=3,
            seq=7,
        ),
    ]
    messages[4].routing = {"origin": "src", "workers": ["a", "b"]}
    return [[bytes(memoryview(f).cast("B")) for f in wire.encode(m)] for m in messages]


CORPUS = _corpus()

INTERESTING_INTS = [0, 1, -1, 2, 255, 256, 2**31, 2**32, 2**40, 2**63 - 1, -(2**63), 2**64 - 1]
DTYPES = [
    "<u2", ">f8", "|b1", "|i1", "<c16", "<M8[ns]", ">m8[s]", "<M8", "|S3", "<U2", ">U1",
    "S0", "<U0", "O", "|O", "V8", "i4,i4", "(2,)i4", "<f16", "xyz", "", "<u" + "9" * 40,
]  # fmt: skip
SHAPES: list[Any] = [
    [], [0], [1], [4], [2, 2], [2**40], [0, 2**63], [0, 2**64 - 1], [-1], [-2, -2],
    [1] * 33, [[1]], [1.0], ["2"], None, "x", [True],
]  # fmt: skip
KEYS = ["v", "k", "r", "q", "t", "m", "p", "b", "x", "extra"]


# ---------------------------------------------------------------- random values


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 3 else 9)
    if choice == 0:
        return rng.choice(INTERESTING_INTS)
    if choice == 1:
        return rng.randint(-1000, 1000)
    if choice == 2:
        return rng.choice([0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308])
    if choice == 3:
        return rng.choice(["E", "S", "T", "", "e", "<u2", "é", "x" * 40])
    if choice == 4:
        return rng.randbytes(rng.randrange(6))
    if choice == 5:
        return rng.choice([True, False, None])
    if choice == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(4)))
    if choice == 7:
        return rng.choice(DTYPES)
    if choice == 8:
        return rng.choice(SHAPES)
    if choice == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 10:
        return [random_value(rng, depth + 1), random_value(rng, depth + 1), rng.choice(SHAPES)]
    return {
        rng.choice([*KEYS, 0, b"k", None]): random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def random_descriptor(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return random_value(rng)
    name = rng.choice([None, "a", "b", "", 3])
    return [name, rng.choice([*DTYPES, None]), rng.choice(SHAPES)]


def frame_for(desc: Any, rng: random.Random) -> bytes:
    """Usually exactly as many bytes as ``desc`` declares, so decoding gets far."""
    try:
        size = int(np.prod(desc[2])) * np.dtype(desc[1]).itemsize
    except Exception:
        size = rng.randrange(16)
    if not 0 <= size <= 4096 or rng.random() < 0.1:
        size = rng.randrange(16)
    return rng.randbytes(size)


# ---------------------------------------------------------------- mutations


def mutate_header_bytes(frames: Frames, rng: random.Random) -> Frames:
    head = bytearray(frames[0])
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(head) + 1)
        if op == 0 and head:
            head[pos % len(head)] ^= 1 << rng.randrange(8)
        elif op == 1 and head:
            head[pos % len(head)] = rng.randrange(256)
        elif op == 2:
            head[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 3:
            del head[pos : pos + rng.randint(1, 4)]
        elif op == 4:
            del head[pos:]
        else:
            head[pos:pos] = head[rng.randrange(len(head) + 1) :][: rng.randint(1, 8)]
    return [bytes(head), *frames[1:]]


def mutate_frame_list(frames: Frames, rng: random.Random) -> Frames:
    out = list(frames)
    op = rng.randrange(8)
    if op == 0 and out:
        del out[rng.randrange(len(out))]
    elif op == 1:
        out.insert(rng.randrange(len(out) + 1), rng.randbytes(rng.randrange(32)))
    elif op == 2 and len(out) > 1:
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    elif op == 3 and len(out) > 1:
        i = rng.randrange(1, len(out))
        out[i] = out[i][: rng.randrange(len(out[i]) + 1)]
    elif op == 4 and len(out) > 1:
        i = rng.randrange(1, len(out))
        out[i] = out[i] + rng.randbytes(rng.randint(1, 8))
    elif op == 5:
        out = out + out[1:] * rng.randint(1, 3)
    elif op == 6:
        out = [] if rng.random() < 0.5 else [out[0]] * rng.randint(2, 300)
    else:
        rng.shuffle(out)
    return out


def mutate_header_fields(frames: Frames, rng: random.Random) -> Frames:
    try:
        header = msgpack.unpackb(frames[0], strict_map_key=False)
    except Exception:
        header = None
    if not isinstance(header, dict):  # an earlier mutation broke it: mutate bytes instead
        return mutate_header_bytes(frames, rng)
    buffers = list(frames[1:])
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(4)
        key = rng.choice(KEYS)
        if op == 0:
            header[key] = random_value(rng)
        elif op == 1:
            header.pop(key, None)
        elif op == 2:
            descs = [random_descriptor(rng) for _ in range(rng.randrange(4))]
            header["b"] = descs
            header["p"] = rng.choice([0, 1, 2, 3, 3, 2])
            buffers = [frame_for(d, rng) for d in descs]
        else:
            old = header.get("b")  # change one slot of one descriptor, keep the frames
            desc = rng.choice(old) if isinstance(old, list) and old else None
            if isinstance(desc, list) and len(desc) == 3:
                slot = rng.randrange(3)
                choices: list[list[Any]] = [[None, "a", 1], DTYPES, SHAPES]
                desc[slot] = rng.choice(choices[slot])
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        head = frames[0]
    return [head, *buffers]


def random_frames(rng: random.Random) -> Frames:
    first = bytes([rng.choice([0x80 + rng.randrange(16), 0xDE, 0xDF, 0x00, rng.randrange(256)])])
    frames = [first + rng.randbytes(rng.randrange(40))]
    return frames + [rng.randbytes(rng.randrange(24)) for _ in range(rng.randrange(3))]


def random_header(rng: random.Random) -> Frames:
    header = {key: random_value(rng) for key in rng.sample(KEYS, rng.randint(0, len(KEYS)))}
    header.setdefault("v", rng.choice([1, 1, 1, 2]))
    header.setdefault("k", rng.choice(["E", "S", "T"]))
    frames = [msgpack.packb(header, use_bin_type=True)]
    descs = header.get("b")
    if isinstance(descs, list):
        frames += [frame_for(d, rng) for d in descs]
    return frames


def _mutate_seed(rng: random.Random) -> Frames:
    frames = rng.choice(CORPUS)
    mutators: list[Callable[[Frames, random.Random], Frames]] = [
        mutate_header_bytes,
        mutate_frame_list,
        mutate_header_fields,
        mutate_header_fields,
    ]
    for _ in range(rng.randint(1, 2)):
        if not frames:
            break
        frames = rng.choice(mutators)(frames, rng)
    return frames


def fuzz_cases(rng: random.Random, n: int) -> list[Frames]:
    cases: list[Frames] = []
    while len(cases) < n:
        r = rng.random()
        if r < 0.7:
            cases.append(_mutate_seed(rng))
        elif r < 0.85:
            cases.append(random_header(rng))
        else:
            cases.append(random_frames(rng))
    return cases


# ---------------------------------------------------------------- the tests


def test_corpus_is_valid() -> None:
    assert len(CORPUS) == 8
    for frames in CORPUS:
        assert isinstance(wire.decode(frames), Start | Event | Stop)


def test_decode_returns_a_message_or_raises_wire_error() -> None:
    rng = random.Random(SEED)
    cases = fuzz_cases(rng, CASES)
    assert len(cases) >= 10_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    decoded = rejected = 0
    reasons: dict[str, int] = {}
    crashes: list[str] = []
    for i, frames in enumerate(cases):
        try:
            message = wire.decode(frames)
        except WireError as e:
            rejected += 1
            reasons[e.reason] = reasons.get(e.reason, 0) + 1
            continue
        except Exception as e:
            crashes.append(f"case {i}: {type(e).__name__}: {e}\n    frames={frames!r:.300}")
            continue
        decoded += 1
        assert isinstance(message, Start | Event | Stop), f"case {i}"
        # Views over what arrived: never more payload than bytes received.
        if isinstance(message, Event):
            assert payload_nbytes(message.payload) <= wire.frames_nbytes(frames), f"case {i}"
    elapsed = time.perf_counter() - started
    rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before

    assert not crashes, f"{len(crashes)} non-WireError exceptions:\n" + "\n".join(crashes[:10])
    assert decoded + rejected == len(cases)
    # The mix must exercise both outcomes and every rejection path worth having.
    assert decoded > len(cases) // 50, (decoded, rejected)
    assert rejected > len(cases) // 2, (decoded, rejected)
    assert {"malformed", "version", "frames", "size"} <= reasons.keys(), reasons
    assert elapsed < 8, f"decoding {len(cases)} cases took {elapsed:.1f} s"
    assert rss_growth_kb < 200_000, f"peak RSS grew by {rss_growth_kb} kB"


def _header(desc_shape: Any, dtype: str = "<f8", n: int = 1) -> bytes:
    descs = [[f"a{i}" if n > 1 else None, dtype, desc_shape] for i in range(n)]
    header = {"v": 1, "k": "E", "p": 3 if n > 1 else 2, "b": descs}
    return msgpack.packb(header)


HOSTILE: list[tuple[str, Frames]] = [
    ("shape 2**40, 8-byte frame", [_header([2**40]), b"\x00" * 8]),
    ("shape 2**63-1", [_header([2**63 - 1]), b"\x00" * 8]),
    ("three dims of 2**20", [_header([2**20] * 3), b""]),
    ("max dims of 2**64-1", [_header([2**64 - 1] * wire.MAX_NDIM), b""]),
    ("256 arrays of 2**40", [_header([2**40], n=256), *[b"\x00" * 8] * 256]),
    ("empty with impossible dims", [_header([0, 2**63], "<u2"), b""]),
    ("array32 of 2**32-1 items", [b"\xdd\xff\xff\xff\xff"]),
    ("map32 of 2**32-1 pairs", [b"\xdf\xff\xff\xff\xff"]),
    ("str32 of 4 GB", [b"\x81\xa1v\xdb\xff\xff\xff\xff"]),
    ("bin32 of 4 GB", [b"\x81\xa1m\xc6\xff\xff\xff\xff"]),
    ("deeply nested arrays", [b"\x81\xa1m" + b"\x91" * 100_000 + b"\xc0"]),
    ("a million frames", [b"\x80"] * 1_000_000),
]


@pytest.mark.parametrize("frames", [f for _, f in HOSTILE], ids=[name for name, _ in HOSTILE])
def test_hostile_declarations_fail_fast_without_allocating(frames: Frames) -> None:
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(WireError):
            wire.decode(frames)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, f"took {elapsed:.2f} s"
    assert peak < 1 << 20, f"peak traced allocation {peak} bytes"
