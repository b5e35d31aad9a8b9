"""The detector suite (issue 20): a Stream V2 series of a 4M-class detector into
Arroyo, beside the plain references, in the same run.

* ingest: ``arroyo simulate`` plays a series of bitshuffle-LZ4 frames; a plain pyzmq
  PULL (``recv`` below) receives it; then the same two hops a listener with a stage
  behind it makes, in plain pyzmq (``relay`` -> ``recv`` over ipc); then the real
  Stream V2 listener stage with a counting sink behind it. Frames/s and GB/s
  (compressed and decoded) of each.
* decode: bitshuffle's own ``decompress_lz4`` called in a loop on the simulator's
  frames by a plain process (``direct`` below), beside one worker of ``DecodeOnly``
  behind the listener (the frame crosses the link compressed and is decoded when the
  operator reads the payload).
* scale: ``DecodeReduce`` (decode, then a radial profile) with 2 workers against 1.

The reference processes import neither zmq nor arroyo's runtime, and get the malloc
thresholds a stage gets (``arroyo.runtime.malloc``), like ``arroyo_bench.plain``.
Run as part of ``scripts/bench`` (``--only detectors``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from arroyo.message import Event, Message
from arroyo.stage import Operator, Publisher, Result

SHAPE = (2162, 2068)  # rows, columns: a 4M-class EIGER2
DTYPE = "uint16"
HEADER = struct.Struct(">QI")


# -- operators the Arroyo side runs -------------------------------------------------------


class DecodeOnly(Operator):
    """Reads (so decodes) each frame and passes on its metadata without the pixels."""

    def process(self, message: Message) -> Result:
        if isinstance(message, Event):
            frame = message.payload
            assert isinstance(frame, np.ndarray)
            return Event(metadata={"n": int(frame.shape[0])})
        return message


class DecodeReduce(Operator):
    """Decodes each frame and reduces it to its radial profile around the middle (one
    ``np.bincount`` over every pixel: about 15 ms per 4M frame here, decoding 3.5)."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.radius = np.empty(0, np.intp)

    def process(self, message: Message) -> Result:
        if isinstance(message, Event):
            frame = message.payload
            assert isinstance(frame, np.ndarray)
            if frame.shape != self.shape:
                rows, cols = np.indices(frame.shape)
                r = np.hypot(rows - frame.shape[0] / 2, cols - frame.shape[1] / 2)
                self.shape, self.radius = frame.shape, r.astype(np.intp).ravel()
            profile = np.bincount(self.radius, weights=frame.ravel())
            return Event(metadata={}, payload=profile)
        return message


class FrameCount(Publisher):
    """Counts events and the compressed bytes they arrived as; writes ``out`` at the
    ``count``-th (``arroyo_bench.procs.Recorder``'s JSON)."""

    def __init__(self, count: int, out: Path) -> None:
        from arroyo_bench.procs import Recorder

        self.recorder = Recorder(count, out)

    def publish(self, message: Message) -> None:
        if isinstance(message, Event):
            self.recorder.seen(message.nbytes)

    def close(self) -> None:
        self.recorder.write()


# -- reference processes --------------------------------------------------------------------


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _stay() -> None:
    # every child of the bench stays until ended: one that exits reads as a crash
    while True:
        time.sleep(3600)


def recv(args: argparse.Namespace) -> None:
    """A plain pyzmq PULL that receives the simulator's messages and counts them."""
    import zmq

    from arroyo_bench.procs import Recorder

    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(args.endpoint)
    print("ready", flush=True)
    rec = Recorder(args.count, Path(args.out))  # start + images + end
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if rec.seen(sum(len(f) for f in frames)):
                break
    finally:
        rec.write()
    _stay()


def relay(args: argparse.Namespace) -> None:
    """The same two hops as a listener with a stage behind it, in plain pyzmq: PULL
    from the simulator, PUSH on (``--forward``, bound) to a ``recv``."""
    import zmq

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    pull: zmq.Socket[bytes] = ctx.socket(zmq.PULL)
    push: zmq.Socket[bytes] = ctx.socket(zmq.PUSH)
    push.bind(args.forward)
    pull.connect(args.endpoint)
    print("ready", flush=True)
    while True:
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)


def direct(args: argparse.Namespace) -> None:
    """bitshuffle's decompress_lz4 on the simulator's frames, ``count`` times."""
    import bitshuffle

    from arroyo.io.simulate import Settings, Simulator

    sim = Simulator(Settings(shape=SHAPE, dtype=DTYPE, compression="bslz4", seed=args.seed))
    blobs = [(b[0].data, np.frombuffer(b[0].data, np.uint8), b[0].dtype) for b in sim.blobs]
    shape = (SHAPE[0] * SHAPE[1],)
    began = time.perf_counter()
    for i in range(args.count):
        raw, data, dtype = blobs[i % len(blobs)]
        block = HEADER.unpack_from(raw)[1] // dtype.itemsize
        out = bitshuffle.decompress_lz4(data[HEADER.size :], shape, dtype, block)
    seconds = time.perf_counter() - began
    _write(Path(args.out), {"count": args.count, "seconds": seconds, "n": int(out.size)})
    _stay()


ROLES = {"recv": recv, "relay": relay, "direct": direct}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m arroyo_bench.detectors")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--endpoint", default="")
    p.add_argument("--forward", default="", help="relay: where to bind its PUSH")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ROLES[args.role](args)


if __name__ == "__main__":
    main()
