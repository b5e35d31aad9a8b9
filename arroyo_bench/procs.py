"""What runs inside the benchmark's child processes (see ``arroyo_bench``).

Two kinds of peers, measured the same way:

* Arroyo stages for real ``arroyo-stage`` processes: ``BenchSource`` (a listener that
  emits one run of N events, then idles) and ``BenchSink`` (a publisher that records
  what it received and writes a small JSON result).
* Plain pyzmq processes, the reference: ``raw-send`` (PUSH), ``raw-recv`` (PULL),
  ``raw-relay`` (PULL -> PUSH) and ``peer-recv`` (the same PULL stream received by the
  ``arroyopy`` package's ZMQ listener, when it is installed).
(The compute ceiling, the stage's operator in a plain loop, is ``arroyo_bench.plain``:
it must not import zmq or arroyo, and this module imports both.)

Every receiver times the stream from its first to its last message with its own
monotonic clock; latency is receive time minus the send time stamped by the sender,
both ``time.time_ns()`` (CLOCK_REALTIME, shared by the processes of one host).

Run a raw peer as ``python -m arroyo_bench.procs ROLE --option value ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Listener, Publisher
from arroyo_bench.plain import SMALL, make_payload
from arroyo_bench.plain import write_json as _write_json

STAMP = struct.Struct("<q")  # send time (ns) in the first 8 bytes of a raw latency message
WARMUP_FRACTION = 0.05  # latency samples left out at the start (connection warm-up)


class Recorder:
    """Counts a stream and times it from the first to the last message."""

    def __init__(self, count: int, out: Path, latency: bool = False) -> None:
        self.count = count
        self.out = out
        self.latency = latency
        self.n = 0
        self.nbytes = 0
        self.first = self.last = 0.0
        self.cpu = 0.0  # process CPU time (all threads) at the first message
        self.max_gap = 0.0
        self.lat_ns: list[int] = []
        self.written = False

    def seen(self, nbytes: int, sent_ns: int = 0) -> bool:
        """Record one message; True once ``count`` messages have been seen."""
        now = time.perf_counter()
        if self.n == 0:
            self.first = now
            self.cpu = time.process_time()
        elif now - self.last > self.max_gap:
            self.max_gap = now - self.last
        self.last = now
        self.n += 1
        self.nbytes += nbytes
        if self.latency:
            self.lat_ns.append(time.time_ns() - sent_ns)
        if self.n == self.count:
            self.write()
            return True
        return False

    def result(self) -> dict[str, Any]:
        res: dict[str, Any] = {
            "count": self.n,
            "bytes": self.nbytes,
            "seconds": self.last - self.first,
            "max_gap_ms": self.max_gap * 1000,
            "cpu_s": time.process_time() - self.cpu if self.n else 0.0,
            "complete": self.n >= self.count,
        }
        if self.latency and self.lat_ns:
            lat = np.array(self.lat_ns[int(len(self.lat_ns) * WARMUP_FRACTION) :], dtype=np.int64)
            for name, q in (("p50", 50), ("p99", 99), ("p999", 99.9), ("max", 100)):
                res[f"{name}_us"] = float(np.percentile(lat, q)) / 1000
        return res

    def write(self) -> None:
        if self.written:
            return
        self.written = True
        _write_json(self.out, self.result())


class Pacer:
    """Spaces sends ``1/rate`` seconds apart on a fixed schedule (0: no pacing)."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.next_at = time.monotonic()

    def wait(self) -> None:
        if not self.period:
            return
        self.next_at += self.period
        delay = self.next_at - time.monotonic()
        if delay > 0:  # behind schedule: send at once, never skip
            time.sleep(delay)


# -- Arroyo stages ----------------------------------------------------------------------


class BenchSource(Listener):
    """Emits one run of ``count`` events of ``size`` bytes, then returns (the stage
    idles). Waits ``settle`` seconds first so that every worker downstream has joined.
    Each event is created just before it is sent, so its timestamp is its send time.
    With ``out``, writes there the CPU time the process spent sending the run."""

    def __init__(
        self,
        count: int,
        size: int,
        rate: float = 0.0,
        settle: float = 0.3,
        out: Path | None = None,
    ) -> None:
        self.count = count
        self.payload = make_payload(size)
        self.rate = rate
        self.settle = settle
        self.out = out

    def start(self) -> None:
        if self.stop_requested.wait(self.settle):
            return
        cpu = time.process_time()
        self._send_run()
        if self.out is not None:
            _write_json(self.out, {"cpu_s": time.process_time() - cpu})

    def _send_run(self) -> None:
        self.deliver(Start(data={"bench": True}))
        pacer = Pacer(self.rate)
        payload = self.payload
        for i in range(self.count):
            if self.stopping:
                return
            pacer.wait()
            meta = {"frame": i, "detector": "bench", "exposure_s": 0.001}
            self.deliver(Event(metadata=meta, payload=payload))
        self.deliver(Stop(data={"frames": self.count}))


class BenchSink(Publisher):
    """Records the events it gets; writes ``out`` (JSON) at the ``count``-th event, or
    at close with what it had."""

    def __init__(self, count: int, out: Path, latency: bool = False) -> None:
        self.recorder = Recorder(count, out, latency)

    def publish(self, message: Message) -> None:
        if isinstance(message, Event):
            self.recorder.seen(message.nbytes, message.timestamp_ns)

    def close(self) -> None:
        self.recorder.write()


# -- raw pyzmq peers ----------------------------------------------------------------------


def _socket(ctx: zmq.Context[Any], kind: int, endpoint: str, bind: bool) -> zmq.Socket[Any]:
    sock = ctx.socket(kind)
    sock.linger = 0
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def _idle_until_signalled() -> None:
    """Keep the sockets open (so nothing in flight is torn down) until told to go."""
    while True:
        time.sleep(3600)


def raw_send(args: argparse.Namespace) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = _socket(ctx, zmq.PUSH, args.endpoint, bind=False)
    payload = make_payload(args.size)
    time.sleep(args.settle)
    pacer = Pacer(args.rate)
    if args.latency:
        buf = bytearray(payload if isinstance(payload, bytes) else payload.tobytes())
        for _ in range(args.count):
            pacer.wait()
            STAMP.pack_into(buf, 0, time.time_ns())
            sock.send(buf)
    else:
        copy = isinstance(payload, bytes)  # zero-copy for arrays, as Arroyo sends them
        data: Any = payload
        for _ in range(args.count):
            pacer.wait()
            sock.send(data, 0, copy=copy)
    _idle_until_signalled()


def raw_recv(args: argparse.Namespace) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = _socket(ctx, zmq.PULL, args.endpoint, bind=True)
    print("ready", flush=True)
    rec = Recorder(args.count, Path(args.out), args.latency)
    copy = args.size < SMALL
    try:
        while True:
            frame = sock.recv(copy=copy)
            data = frame if isinstance(frame, bytes) else frame.buffer
            sent = STAMP.unpack_from(data)[0] if args.latency else 0
            if rec.seen(len(data), sent):
                break
    finally:
        rec.write()
    _idle_until_signalled()


def raw_relay(args: argparse.Namespace) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    pull = _socket(ctx, zmq.PULL, args.endpoint, bind=True)
    push = _socket(ctx, zmq.PUSH, args.forward, bind=False)
    print("ready", flush=True)
    copy = args.size < SMALL
    while True:
        push.send(pull.recv(copy=copy), copy=copy)


def peer_recv(args: argparse.Namespace) -> None:
    """The stream received by arroyopy's ZMQListener (an asyncio PULL socket)."""
    import zmq.asyncio
    from arroyopy.operator import Operator as PeerOperator
    from arroyopy.zmq import ZMQListener as PeerListener

    rec = Recorder(args.count, Path(args.out))
    listener: Any = None

    class Count(PeerOperator):
        async def process(self, message: Any) -> None:
            if rec.seen(len(message)):
                listener.stop_requested = True

    async def main() -> None:
        nonlocal listener
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PULL)
        sock.linger = 0
        sock.bind(args.endpoint)
        print("ready", flush=True)
        listener = PeerListener(Count(), sock)
        await listener.start()

    try:
        asyncio.run(main())
    finally:
        rec.write()
    _idle_until_signalled()


ROLES = {
    "raw-send": raw_send,
    "raw-recv": raw_recv,
    "raw-relay": raw_relay,
    "peer-recv": peer_recv,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m arroyo_bench.procs")
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--endpoint", default="", help="where to bind or connect")
    parser.add_argument("--forward", default="", help="raw-relay: where to push to")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--settle", type=float, default=0.3)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--out", default="result.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ROLES[args.role](args)


if __name__ == "__main__":
    main()
