"""The compute ceiling: the stage's numpy operator called in a loop by a plain process.

This module imports numpy and ``stages.kernels`` and nothing else: no zmq, no arroyo.
That matters: once zmq is imported, glibc's malloc stops adapting its mmap threshold
and frame-sized temporaries are mapped and faulted in afresh every time, so a ceiling
that imported zmq was slowed exactly like the stage it was meant to judge (issue 14).

Run as ``python -m arroyo_bench.plain --size S --count N --rounds R --at T --out F``:
waits until the wall-clock time ``T`` (the processes of one measurement start
together), runs ``N`` events, writes when it began and ended.

The bench starts it with the same malloc thresholds a stage gets
(``arroyo.runtime.malloc.ENVIRONMENT``): with glibc's defaults, whether this very loop
re-faults its temporaries every round depends on a few KiB of slack at the top of the
heap (the dynamic trim threshold is twice the last freed mmapped block), so the
ceiling would measure glibc's luck instead of the code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from stages.kernels import temporaries

SMALL = 1024  # payloads below this are bytes with metadata, larger ones numpy arrays


def make_payload(size: int) -> bytes | np.ndarray:
    """The payload of every benchmark message of ``size`` bytes (uint16 above SMALL)."""
    rng = np.random.default_rng(size)
    if size < SMALL:
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return rng.integers(0, 4096, size // 2, dtype=np.uint16)


def write_json(path: Path, data: dict[str, object]) -> None:
    """Whole or not at all: the bench polls for the file and reads it at once."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m arroyo_bench.plain")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--at", type=float, default=0.0, help="start time (epoch s)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    frame = make_payload(args.size)
    assert isinstance(frame, np.ndarray)
    time.sleep(max(0.0, args.at - time.time()))
    began = time.time()
    for _ in range(args.count):
        temporaries(frame, args.rounds)
    write_json(args.out, {"began": began, "ended": time.time(), "count": args.count})
    # stay until ended, like every child of the bench: one that exits on its own reads
    # as a crash while the others are still working
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
