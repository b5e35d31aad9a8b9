"""NATS ends for the outside world: a JetStream durable pull consumer, a JetStream
publisher with PubAck, and plain core NATS subjects (no persistence).

    [stage:ingest]
    role = listener
    class = arroyo.io.nats:NatsListener
    url = nats://127.0.0.1:4222
    stream = BEAMLINE
    subject = frames.>
    durable = saxs                   ; the consumer's name: it remembers what was acked
    deliver = new                    ; new | all | last | seq:N | time:2026-12-04T18:00Z
    codec = arroyo                   ; arroyo | raw | json | array | module:function

One NATS message is one Arroyo message, mapped by the codec as for Redis and RabbitMQ
(``arroyo.io.frames``). The listener acknowledges a message only once the next stage
has taken it (``Listener.handed_on``), so what a killed listener held comes again;
it counts what JetStream says it delivered more than once. The publisher waits for
JetStream's PubAck of every message, sends each with a ``Nats-Msg-Id`` so a resend
after a lost PubAck is deduplicated by the stream, and keeps a bounded backlog while
the server is away. A message over the server's ``max_payload`` (1 MB by default) is
dropped and counted as ``too_large``. ``mode = core`` is plain NATS: latest-only, what
nobody is subscribed to is gone. docs/brokers.md has the details.

nats-py is asyncio-only: its event loop runs in a thread of its own
(``arroyo.io._asyncio_thread``) and hands messages to the stage's main thread through
a queue, so the hot loop stays synchronous (DESIGN §7).

Needs nats-py: ``pip install 'arroyo[nats]'``. It is imported when a stage is made,
so the rest of Arroyo imports without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections import Counter
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.io._asyncio_thread import LoopThread
from arroyo.io._nats_client import (
    CONNECT_TIMEOUT,
    DEFAULT_URL,
    Mode,
    close_quietly,
    connect,
    ensure_stream,
    log,
    require,
    retryable,
    start_position,
)
from arroyo.io.broker import HandedOn, Redeliveries, safe_url
from arroyo.io.codecs import CodecName
from arroyo.io.frames import decode_value, value_codec
from arroyo.io.guard import DecodeGuard
from arroyo.io.retry import Backoff, DropCount, describe_error
from arroyo.stage import Listener

CONSUMER_CHECK = 1.0  # s without messages between two looks whether the consumer exists
FETCH_BYTES = 16 << 20  # at most this much asked for in one fetch (see _batch)
FIRST_BATCH = 8  # messages in a fetch before their size is known


class ConsumerLost(Exception):
    """The JetStream consumer (or its stream) was deleted under the listener."""


# -- listener ----------------------------------------------------------------------------


class NatsListener(Listener):
    """Hands on what arrives on a JetStream consumer or a core NATS subject.

    Contract:

    - ``mode = jetstream``: a durable pull consumer ``durable`` on ``stream``, filtered
      by ``subject``, is created if missing (the stream too, with ``create_stream``)
      and starts at ``deliver``; an existing consumer resumes where it was, whatever
      ``deliver`` says. At most ``prefetch`` messages are unacknowledged at once.
    - A message is acknowledged once the next stage has taken everything it decoded
      to (``Listener.handed_on``, ``arroyo.io.broker.HandedOn``), or ``ack_delay_ms``
      after ``deliver`` returned where the link cannot tell (a PUB link). One the listener does
      not acknowledge within ``ack_wait_s`` (a killed listener's) is delivered again;
      a message JetStream delivers more than once is counted in ``duplicates``.
    - ``mode = core``: a plain subscription. What is published while the listener is
      not subscribed is lost, and when more than ``buffer`` messages wait for the
      main thread the oldest is dropped (``slow_consumer``): latest-only.
    - A message that does not decode is counted in ``drops()`` by reason
      (``arroyo.io.guard``) and acknowledged, so it never comes back.
    - Server unreachable, restarted, connection cut: reconnect with backoff (0.1 s
      doubling to 5 s), logged when it goes and when it is back (``reconnects``).
    - nats-py runs in a thread of its own; ``deliver`` is only ever called from the
      stage's main thread. ``stop()`` makes ``start()`` return within ``block_ms``;
      what was fetched but not handed on is given back (nak) at ``close()``.
    """

    def __init__(
        self,
        subject: str,
        stream: str = "",
        url: str = DEFAULT_URL,
        mode: Mode = "jetstream",
        durable: str = "arroyo",
        deliver: str = "new",
        create_stream: bool = True,
        codec: Annotated[str, CodecName()] = "arroyo",
        dtype: str = "",
        shape: tuple[int, ...] = (),
        prefetch: Annotated[int, Bounds(ge=1)] = 256,
        batch: Annotated[int, Bounds(ge=1)] = 64,
        ack_wait_s: Annotated[float, Bounds(gt=0)] = 30.0,
        ack_delay_ms: Annotated[float, Bounds(ge=0)] = 50.0,
        buffer: Annotated[int, Bounds(ge=1)] = 10_000,
        block_ms: Annotated[int, Bounds(ge=1)] = 200,
    ) -> None:
        self._nats = require()
        if mode == "jetstream" and not stream:
            msg = "mode = jetstream needs the stream's name (stream = ...)"
            raise ValueError(msg)
        self.subject = subject
        self.stream = stream
        self.url = url
        self.mode = mode
        self.durable = durable
        self.position = start_position(deliver)
        self.create_stream = create_stream
        self.codec = value_codec(codec, dtype, tuple(shape))
        self.prefetch = prefetch
        self.batch = min(batch, prefetch)
        self._largest = 0  # the largest message's bytes so far (bounds a fetch)
        self.ack_wait = ack_wait_s
        self.buffer = buffer
        self.block = block_ms / 1000
        where = f"stream {stream!r} " if mode == "jetstream" else ""
        self.name = f"{type(self).__name__}({where}subject {subject!r} at {safe_url(url)})"
        self.received = 0
        self.redelivered = Redeliveries(self.name, "delivered more than once by JetStream")
        self.events: Counter[str] = Counter()  # reconnects
        # (connection number, Msg): fetched by the loop thread, taken by the main one
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue()
        self._handed: HandedOn[tuple[int, Any]] = HandedOn(ack_delay_ms / 1000)
        self._guard = DecodeGuard(self.name)  # main thread
        self._lost = DropCount(self.name)  # loop thread (slow_consumer)
        self._backoff = Backoff(self.name)
        self._loop = LoopThread("nats-listener")
        # loop thread only:
        self._nc: Any = None
        self._sub: Any = None
        self._connection = 0  # numbers connections, so an old one's acks are told apart
        self._unacked = 0  # fetched on this connection and not acknowledged yet
        self._room: asyncio.Event | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._ack_later: list[tuple[int, Any]] = []  # handed on while disconnected
        self._pump_task: asyncio.Task[Any] | None = None
        self._idle_since: float | None = None  # no message fetched since

    # -- the loop thread -----------------------------------------------------------

    async def _pump(self) -> None:
        """Fetch (jetstream) or watch the subscription (core) until cancelled."""
        self._room = asyncio.Event()
        self._pump_task = asyncio.current_task()
        failures: tuple[type[Exception], ...] = (*retryable(self._nats), ConsumerLost)
        while True:
            try:
                if self._nc is None:
                    await self._connect()
                if self.mode == "core" or self._unacked >= self.prefetch:
                    await self._idle()
                else:
                    await self._fetch()
                if self._nc.is_closed:
                    msg = "the connection to the server was lost"
                    raise self._nats.errors.ConnectionClosedError(msg)
            except failures as e:
                await self._went_down(e)

    async def _idle(self) -> None:
        """Wait for room in the window (acks), or ``block`` seconds."""
        assert self._room is not None
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), self.block)

    async def _connect(self) -> None:
        nc = await connect(self._nats, self.url, self.name)
        try:
            if self.mode == "core":
                self._sub = await nc.subscribe(self.subject, cb=self._on_core)
            else:
                self._sub = await self._subscribe(nc.jetstream())
        except BaseException:
            await close_quietly(nc)
            raise
        self._nc = nc
        self._connection += 1
        self._unacked = 0
        later, self._ack_later = self._ack_later, []
        self._acknowledge(later)
        if self._backoff.down_since is not None:
            self.events["reconnects"] += 1
        self._backoff.succeeded()

    async def _subscribe(self, js: Any) -> Any:
        api = self._nats.js.api
        if self.create_stream:
            await ensure_stream(self._nats, js, self.stream, self.subject)
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.prefetch,
            filter_subject=self.subject,
            **self.position,
        )
        return await js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream, config=config
        )

    def _batch(self) -> int:
        """Messages to ask for: ``batch``, within ``prefetch``, and no more bytes than
        ``FETCH_BYTES`` at the largest message seen so far. A server closes a client
        whose pending data passes its ``max_pending`` (64 MiB by default): 64 frames of
        1 MiB in one fetch did, and what it held came back only after ``ack_wait_s``.
        Until a message has been seen, ``FIRST_BATCH``."""
        n = min(self.batch, self.prefetch - self._unacked)
        if not self._largest:
            return min(n, FIRST_BATCH)
        return max(1, min(n, FETCH_BYTES // self._largest))

    async def _fetch(self) -> None:
        try:
            msgs = await self._sub.fetch(self._batch(), timeout=self.block)
        except TimeoutError:
            msgs = []  # nothing new (a lost connection is seen by the caller)
        if not msgs:
            await self._check_consumer()
            return
        self._idle_since = None
        self._unacked += len(msgs)
        self._largest = max(self._largest, *(len(m.data) for m in msgs))
        for msg in msgs:
            self._queue.put((self._connection, msg))

    async def _check_consumer(self) -> None:
        """A pull on a deleted consumer just finds nothing: after a second without
        messages, ask whether it still exists (``ConsumerLost`` if not: the caller
        reconnects, which creates it again)."""
        now = time.monotonic()
        if self._idle_since is None or now - self._idle_since < CONSUMER_CHECK:
            self._idle_since = self._idle_since or now
            return
        self._idle_since = now
        try:
            await self._sub.consumer_info()
        except self._nats.js.errors.NotFoundError as e:
            self.events["consumer_lost"] += 1
            msg = f"consumer {self.durable!r} of stream {self.stream!r} is gone (deleted?)"
            raise ConsumerLost(msg) from e

    async def _on_core(self, msg: Any) -> None:
        self._queue.put((self._connection, msg))
        if self._queue.qsize() > self.buffer:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            why = f"more than buffer = {self.buffer} messages waited for the stage"
            self._lost.add(1, "slow_consumer", why)

    async def _went_down(self, error: Exception) -> None:
        nc, self._nc, self._sub = self._nc, None, None
        await close_quietly(nc)
        await asyncio.sleep(self._backoff.failed(error))

    def _acknowledge(self, items: list[tuple[int, Any]]) -> None:
        """(On the loop) acknowledge what the main thread handed on."""
        if items and self.mode == "jetstream":
            task = asyncio.ensure_future(self._ack(items))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _ack(self, items: list[tuple[int, Any]]) -> None:
        """Acknowledge on the current connection: a JetStream ack names its message by
        its reply subject, so one fetched before a reconnect is acknowledged too (else
        it would come again, and hold a place in the consumer's window meanwhile).
        Acks that cannot go now wait for the next connection."""
        ours = sum(connection == self._connection for connection, _ in items)
        for done, (_, msg) in enumerate(items):
            try:
                if self._nc is None:
                    raise self._nats.errors.ConnectionClosedError
                await self._nc.publish(msg.reply, b"+ACK")
            except retryable(self._nats):
                self._ack_later.extend(items[done:])
                return
        self._unacked -= ours
        if self._room is not None:
            self._room.set()

    async def _shutdown(self, unhanded: list[tuple[int, Any]]) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
        if self._acks:
            await asyncio.gather(*self._acks, return_exceptions=True)
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed and self.mode == "jetstream":
            for connection, msg in unhanded:
                if connection == self._connection:
                    try:
                        await msg.nak()  # given back now, not after ack_wait
                    except retryable(self._nats):
                        break
        await close_quietly(nc)

    # -- the stage's main thread ---------------------------------------------------

    def start(self) -> None:
        pump = self._loop.submit(self._pump())
        try:
            while not self.stopping:
                try:
                    item = self._queue.get(timeout=self._handed.wait(self.block))
                except queue.Empty:
                    item = None
                if item is not None:
                    self._take(item)
                self._acknowledge_due(self._handed.due())
            self._acknowledge_due(self._handed.all())  # a clean stop drains the links
        except BaseException:
            pump.cancel()
            raise

    def _take(self, item: tuple[int, Any]) -> None:
        msg = item[1]
        self.received += 1
        if self.mode == "jetstream":
            self.redelivered.note(msg.metadata.num_delivered > 1)
        for message in self._guard.decode(decode_value, self.codec, msg.data):
            self.deliver(message)
        self._handed.add(item, self.handed_on())

    def _acknowledge_due(self, items: list[tuple[int, Any]]) -> None:
        if items:
            self._loop.call(self._acknowledge, items)

    def stats(self) -> dict[str, Any]:
        """``received``, ``duplicates`` (messages JetStream delivered more than once),
        ``reconnects`` and ``consumer_lost`` (deleted under it; docs/brokers.md)."""
        return {
            "received": self.received,
            "duplicates": self.redelivered.count,
            "reconnects": self.events["reconnects"],
            "consumer_lost": self.events["consumer_lost"],
        }

    def drops(self) -> dict[str, int]:
        """Messages not delivered, by reason: the decode guard's (``undecodable``,
        ``too_deep``, ``frame_size``...) and, in core mode, ``slow_consumer``."""
        return dict(Counter(self._guard.drops()) + Counter(self._lost.by_reason))

    @property
    def dropped(self) -> int:
        return self._guard.total + self._lost.total

    def close(self) -> None:
        unhanded = []
        while True:
            try:
                unhanded.append(self._queue.get_nowait())
            except queue.Empty:
                break
        try:
            self._loop.run(self._shutdown(unhanded), 2 * CONNECT_TIMEOUT)
        except Exception as e:  # the server may be gone: what was not acked comes again
            log.warning("%s: closing: %s", self.name, describe_error(e))
        self._loop.stop()
        self.redelivered.flush()
        if self.dropped:
            log.warning("%s: %d messages dropped in all", self.name, self.dropped)


from arroyo.io._nats_publisher import NatsPublisher  # noqa: E402  (one module for users)

__all__ = ["NatsListener", "NatsPublisher"]
