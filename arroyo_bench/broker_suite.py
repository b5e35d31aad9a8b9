"""The broker suite (issue 23): Arroyo's RabbitMQ and NATS JetStream ends beside each
broker's own Python client doing the same work in the same run, at 100 B and 1 MiB.

    listener   a queue / stream filled first with N raw bodies (pika / nats-py);
               the plain client consuming them, acknowledging each (the reference)
               vs  the listener stage (``codec = raw``, its defaults otherwise) ->
               ``BenchSink`` stage; timed from the first message to the last one
               acknowledged (reference) or received by the sink (Arroyo)
    publisher  the plain client publishing N bodies one at a time, each confirmed
               (``confirm_delivery``) / PubAck awaited (the reference)
               vs  ``BenchSource`` stage -> the publisher stage (its defaults: confirms,
               one PubAck at a time); timed from the first publish begun to the
               last one confirmed (``TimedRabbitPublisher``, ``TimedNatsPublisher``)

The reference clients run in the bench process, the stages as ``arroyo-stage``
processes. Both sides of a row use the same prefetch (the listener's default). Each
measurement has a queue / stream of its own, deleted after. RabbitMQ is the shared
broker at 127.0.0.1:5672; NATS a private ``nats-server`` (``max_payload: 8MB`` and
``max_pending: 256MB`` for 1 MiB messages, a store of its own) started for the suite
and always killed at its end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arroyo.io.nats import NatsPublisher
from arroyo.io.rabbitmq import RabbitPublisher
from arroyo.message import Event, Message
from arroyo_bench.measure import Measure, interleaved, log
from arroyo_bench.plans import Plan
from arroyo_bench.run import MIB, SIZE_100B, BenchError, Children, Runner, free_port
from arroyo_bench.storage_suite import _stages

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
RABBIT_PREFETCH = 100  # RabbitListener's default
NATS_PREFETCH, NATS_BATCH = 256, 64  # NatsListener's defaults
COUNTS = {"quick": {SIZE_100B: 20_000, MIB: 300}, "full": {SIZE_100B: 100_000, MIB: 1_000}}


class PublishClock:
    """Times a publisher from its first event's publish begun to its ``count``-th
    event's publish returned (confirmed); writes the result to ``out`` then."""

    def __init__(self, count: int, out: Path) -> None:
        self.count, self.out = count, out
        self.n = self.nbytes = 0
        self.first = 0.0

    def begin(self, message: Message) -> None:
        if isinstance(message, Event) and not self.n:
            self.first = time.perf_counter()

    def end(self, message: Message, sent: int) -> None:
        if not isinstance(message, Event):
            return
        self.n += 1
        self.nbytes += message.nbytes
        if self.n == self.count:
            seconds = time.perf_counter() - self.first
            # count + 1: the first publish's start counts as the first "message"
            result = {"count": self.n + 1, "bytes": self.nbytes, "seconds": seconds,
                      "complete": sent >= self.n}  # fmt: skip
            self.out.write_text(json.dumps(result))


class TimedRabbitPublisher(RabbitPublisher):
    """``RabbitPublisher`` with its defaults, timed by a ``PublishClock``."""

    def __init__(self, routing_key: str, count: int, out: Path, url: str = AMQP_URL) -> None:
        super().__init__(routing_key=routing_key, url=url)
        self.clock = PublishClock(count, out)

    def publish(self, message: Message) -> None:
        self.clock.begin(message)
        super().publish(message)
        self.clock.end(message, self.sent)


class TimedNatsPublisher(NatsPublisher):
    """``NatsPublisher`` (jetstream) with its defaults, timed by a ``PublishClock``."""

    def __init__(self, subject: str, stream: str, url: str, count: int, out: Path) -> None:
        super().__init__(subject=subject, stream=stream, url=url)
        self.clock = PublishClock(count, out)

    def publish(self, message: Message) -> None:
        self.clock.begin(message)
        super().publish(message)
        self.clock.end(message, self.sent)


def _result(count: int, size: int, seconds: float) -> dict[str, Any]:
    return {"count": count, "bytes": count * size, "seconds": seconds, "complete": True}


def _guarded(measure: Callable[[], dict[str, Any]]) -> Measure:
    """A failure of the in-process client is one failed run, as a child's would be."""

    def run() -> dict[str, Any]:
        try:
            return measure()
        except BenchError:
            raise
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            raise BenchError(msg) from e

    return run


# -- RabbitMQ ---------------------------------------------------------------------------


def _rabbit_channel() -> Any:
    import pika

    params = pika.URLParameters(AMQP_URL)
    params.connection_attempts = 1
    return pika.BlockingConnection(params).channel()


def _rabbit_fill(queue: str, size: int, count: int) -> None:
    ch = _rabbit_channel()
    ch.queue_declare(queue, durable=True)
    body = bytes(size)
    for _ in range(count):
        ch.basic_publish("", queue, body)
    deadline = time.monotonic() + 60
    while ch.queue_declare(queue, durable=True, passive=True).method.message_count < count:
        if time.monotonic() > deadline:
            msg = f"queue {queue} not filled with {count} messages after 60 s"
            raise BenchError(msg)
        time.sleep(0.05)
    ch.connection.close()


def _rabbit_delete(queue: str) -> None:
    ch = _rabbit_channel()
    ch.queue_delete(queue)
    ch.connection.close()


def _pika_consume(queue: str, size: int, count: int) -> dict[str, Any]:
    ch = _rabbit_channel()
    ch.basic_qos(prefetch_count=RABBIT_PREFETCH)
    first = 0.0
    for n, (method, _, _) in enumerate(ch.consume(queue, inactivity_timeout=30), 1):
        if method is None:
            msg = f"pika got {n - 1} of {count} messages"
            raise BenchError(msg)
        if n == 1:
            first = time.perf_counter()
        ch.basic_ack(method.delivery_tag)
        if n == count:
            break
    seconds = time.perf_counter() - first
    ch.cancel()
    ch.connection.close()
    return _result(count, size, seconds)


def _pika_publish(queue: str, size: int, count: int) -> dict[str, Any]:
    ch = _rabbit_channel()
    ch.confirm_delivery()
    body = bytes(size)
    began = time.perf_counter()
    for _ in range(count):
        ch.basic_publish("", queue, body, mandatory=True)  # returns once confirmed
    seconds = time.perf_counter() - began
    ch.connection.close()
    return _result(count + 1, size, seconds)


def _rabbit_side(runner: Runner, end: str, side: str, size: int, count: int) -> Measure:
    def measure() -> dict[str, Any]:
        queue = f"arroyobench.{uuid.uuid4().hex[:12]}"
        try:
            if end == "listener":
                _rabbit_fill(queue, size, count)
                if side == "pika":
                    return _pika_consume(queue, size, count)
                return runner._measure(_listener_stages(runner, _RABBIT_IN, queue, count),
                                       runner.timeout)  # fmt: skip
            _rabbit_channel().queue_declare(queue, durable=True)
            if side == "pika":
                return _pika_publish(queue, size, count)
            start = _publisher_stages(runner, _RABBIT_OUT, queue, size, count)
            return runner._measure(start, runner.timeout)
        finally:
            _rabbit_delete(queue)

    return _guarded(measure)


_RABBIT_IN = """
class = arroyo.io.rabbitmq:RabbitListener
url = {url}
queue = {name}
codec = raw
"""
_RABBIT_OUT = """
class = arroyo_bench.broker_suite:TimedRabbitPublisher
url = {url}
routing_key = {name}
"""


# -- the stages of both brokers ---------------------------------------------------------


def _listener_stages(
    runner: Runner, options: str, name: str, count: int, url: str = AMQP_URL
) -> Callable[[Path, Path], None]:
    def start(case: Path, out: Path) -> None:
        text = f"""
[topology]
name = brokerin
run_dir = {case}/run

[stage:src]
role = listener
{options.format(url=url, name=name).strip()}

[stage:sink]
role = publisher
class = arroyo_bench.procs:BenchSink
input = src
count = {count}
out = {out}
"""
        _stages(runner, case, text, "sink", "src")

    return start


def _publisher_stages(
    runner: Runner, options: str, name: str, size: int, count: int, url: str = AMQP_URL
) -> Callable[[Path, Path], None]:
    def start(case: Path, out: Path) -> None:
        text = f"""
[topology]
name = brokerout
run_dir = {case}/run

[stage:src]
role = listener
class = arroyo_bench.procs:BenchSource
count = {count}
size = {size}

[stage:pub]
role = publisher
input = src
{options.format(url=url, name=name).strip()}
count = {count}
out = {out}
"""
        _stages(runner, case, text, "pub", "src")

    return start


# -- NATS JetStream ---------------------------------------------------------------------


class NatsServer:
    """A private ``nats-server`` with JetStream, ``max_payload: 8MB``, ``max_pending:
    256MB``."""

    def __init__(self, root: Path) -> None:
        self.root = root / "nats"
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.children = Children()

    def start(self) -> None:
        import shutil

        exe = shutil.which("nats-server")
        if exe is None:
            msg = "nats-server is not on PATH"
            raise BenchError(msg)
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats.conf"
        conf.write_text(
            # max_pending: a pull of 64 messages of 1 MiB (NatsListener's default batch)
            # is over the default 64 MB a client may have waiting, and the server then
            # closes the connection as a slow consumer
            f'listen: "127.0.0.1:{self.port}"\nmax_payload: 8MB\nmax_pending: 256MB\n'
            f'jetstream {{\n  store_dir: "{self.root / "store"}"\n}}\n'
        )
        log_path = self.root / "server.log"
        self.children.start([exe, "-c", str(conf)], log_path)
        self.children.wait_log(log_path, "Server is ready")

    def stop(self) -> None:
        self.children.kill_all()


def _nats(url: str, work: Callable[[Any], Any]) -> Any:
    async def go() -> Any:
        import nats

        nc = await nats.connect(url, allow_reconnect=False)
        try:
            return await work(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


def _nats_create(url: str, stream: str, subject: str) -> None:
    async def work(nc: Any) -> None:
        await nc.jetstream().add_stream(name=stream, subjects=[subject])

    _nats(url, work)


def _nats_fill(url: str, subject: str, size: int, count: int) -> None:
    async def work(nc: Any) -> None:
        js, body = nc.jetstream(), bytes(size)
        step = 500 if size < 4096 else 20
        for i in range(0, count, step):
            acks = [await js.publish_async(subject, body) for _ in range(min(step, count - i))]
            await asyncio.gather(*acks)

    _nats(url, work)


def _nats_delete(url: str, stream: str) -> None:
    async def work(nc: Any) -> None:
        await nc.jetstream().delete_stream(stream)

    _nats(url, work)


def _natspy_consume(url: str, stream: str, subject: str, size: int, count: int) -> dict[str, Any]:
    async def work(nc: Any) -> dict[str, Any]:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, max_ack_pending=NATS_PREFETCH)
        sub = await nc.jetstream().pull_subscribe(subject, "ref", stream=stream, config=config)
        n, first = 0, 0.0
        while n < count:
            for msg in await sub.fetch(min(NATS_BATCH, count - n), timeout=30):
                if not n:
                    first = time.perf_counter()
                await msg.ack()
                n += 1
        await nc.flush()  # the last acks are out
        return _result(count, size, time.perf_counter() - first)

    result: dict[str, Any] = _nats(url, work)
    return result


def _natspy_publish(url: str, subject: str, size: int, count: int) -> dict[str, Any]:
    async def work(nc: Any) -> dict[str, Any]:
        js, body = nc.jetstream(), bytes(size)
        began = time.perf_counter()
        for _ in range(count):
            await js.publish(subject, body)  # waits for the PubAck
        return _result(count + 1, size, time.perf_counter() - began)

    result: dict[str, Any] = _nats(url, work)
    return result


_NATS_IN = """
class = arroyo.io.nats:NatsListener
url = {url}
stream = {name}
subject = {name}.in
deliver = all
codec = raw
"""
_NATS_OUT = """
class = arroyo_bench.broker_suite:TimedNatsPublisher
url = {url}
stream = {name}
subject = {name}.in
"""


def _nats_side(
    runner: Runner, server: NatsServer, end: str, side: str, size: int, count: int
) -> Measure:
    url = server.url

    def measure() -> dict[str, Any]:
        stream = f"arroyobench{uuid.uuid4().hex[:12]}"
        subject = f"{stream}.in"
        _nats_create(url, stream, subject)
        try:
            if end == "listener":
                _nats_fill(url, subject, size, count)
                if side == "nats-py":
                    return _natspy_consume(url, stream, subject, size, count)
                start = _listener_stages(runner, _NATS_IN, stream, count, url)
                return runner._measure(start, runner.timeout)
            if side == "nats-py":
                return _natspy_publish(url, subject, size, count)
            start = _publisher_stages(runner, _NATS_OUT, stream, size, count, url)
            return runner._measure(start, runner.timeout)
        finally:
            _nats_delete(url, stream)

    return _guarded(measure)


# -- the suite --------------------------------------------------------------------------

SIDES = {
    ("rabbitmq", "listener"): ["pika", "RabbitListener"],
    ("rabbitmq", "publisher"): ["pika", "RabbitPublisher"],
    ("nats", "listener"): ["nats-py", "NatsListener"],
    ("nats", "publisher"): ["nats-py", "NatsPublisher"],
}


def brokers(runner: Runner, plan: Plan) -> dict[str, Any]:
    counts = COUNTS["full" if plan.mode == "full" else "quick"]
    out: dict[str, Any] = {"rows": [], "notes": []}
    server = NatsServer(runner.root)
    try:
        server.start()
    except BenchError as e:
        log(f"  nats: n/a ({e})")
        out["notes"].append(f"NATS not measured: {e}")
        server.stop()
        server = None  # type: ignore[assignment]
    try:
        for (broker, end), sides in SIDES.items():
            if broker == "nats" and server is None:
                continue
            rows = [
                {"suite": f"{broker} {end}", "transport": broker, "broker": broker, "end": end,
                 "size": s, "count": counts[s], "sides": sides}
                for s in (SIZE_100B, MIB)
            ]  # fmt: skip

            def run(row: dict[str, Any], side: str, broker: str = broker) -> Measure:
                end, size, n = row["end"], row["size"], row["count"]
                if broker == "rabbitmq":
                    return _rabbit_side(runner, end, side, size, n)
                return _nats_side(runner, server, end, side, size, n)

            out["rows"] += interleaved(rows, sides, max(1, plan.repeats), run)
    finally:
        if server is not None:
            server.stop()
    out["notes"] += [LISTENER_BOUND, *_stalls(out["rows"])]
    return out


LISTENER_BOUND = (
    "The listeners run with their defaults: each acknowledges a message once the sink "
    "stage has taken it (its link's credit, returned in batches or after 10 ms idle), "
    "with at most prefetch unacknowledged (100 for RabbitListener, 256 for NatsListener)."
)


def _stalls(rows: list[dict[str, Any]]) -> list[str]:
    """A note for each Arroyo run that stood still for seconds (a redelivery wait?)."""
    notes = []
    for row in rows:
        ours = row["sides"][-1]
        for i, run in enumerate(row[ours]["runs"], 1):
            gap = run.get("max_gap_ms", 0.0) / 1000
            if gap > 5:
                notes.append(f"{ours} {row['size']:,} B run {i}: no message for {gap:.1f} s "
                             "in the middle of the stream.")  # fmt: skip
    return notes
