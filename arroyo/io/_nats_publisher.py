"""The NATS publisher (``arroyo.io.nats:NatsPublisher``; docs/brokers.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.io._asyncio_thread import LoopThread
from arroyo.io._nats_client import (
    CONNECT_TIMEOUT,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_URL,
    HEADROOM,
    Mode,
    close_quietly,
    connect,
    ensure_stream,
    log,
    require,
    retryable,
    stream_subjects,
)
from arroyo.io.broker import Backlog, KeyTemplate, safe_url
from arroyo.io.codecs import CodecName
from arroyo.io.frames import encode_value, value_codec
from arroyo.io.retry import Backoff, DropCount, describe_error
from arroyo.message import Message
from arroyo.stage import Publisher


class NatsPublisher(Publisher):
    """Publishes every message to a subject: to JetStream with a PubAck, or core NATS.

    Contract:

    - ``subject`` is a template filled from the message (``frames.{detector}``;
      ``arroyo.io.broker.KeyTemplate``): a message it cannot fill is dropped, counted
      as ``no_subject``. With ``stream`` and ``create_stream`` the stream is created
      if missing, for the template's subjects (``frames.*``).
    - ``mode = jetstream``: ``publish`` returns once JetStream acknowledged the
      message (PubAck), so a slow server slows the stage down. Each message carries a
      ``Nats-Msg-Id`` unique to this publisher process, so the stream drops a copy
      sent again within its duplicate window (``deduplicated``). A message the server
      refuses (an error in the PubAck: the stream full with ``discard = new``, a
      message over the stream's ``max_msg_size``) is dropped as ``refused``.
    - ``mode = core``: plain NATS publish, no acknowledgement: nothing is kept for a
      subscriber that is not there.
    - A message over the server's ``max_payload`` (1 MB unless configured; told by
      the server at connect) is dropped as ``too_large``; the log line gives its size
      and the limit. NATS would close the connection for it; Arroyo does not chunk.
    - When the server is unreachable or the connection breaks, messages wait in a
      backlog of at most ``buffer_mb`` megabytes (oldest dropped first:
      ``buffer_full``) while the loop thread reconnects with backoff and sends them in
      order. The message in flight when the connection broke is sent again
      (``resent``); in jetstream mode its ``Nats-Msg-Id`` lets the stream drop it if
      it had it already.
    - ``close()`` waits up to ``close_timeout`` seconds for the backlog; what is left
      is dropped as ``unreachable``.
    """

    def __init__(
        self,
        subject: str,
        url: str = DEFAULT_URL,
        mode: Mode = "jetstream",
        stream: str = "",
        create_stream: bool = True,
        codec: Annotated[str, CodecName()] = "arroyo",
        dtype: str = "",
        shape: tuple[int, ...] = (),
        ack_timeout: Annotated[float, Bounds(gt=0)] = 5.0,
        buffer_mb: Annotated[float, Bounds(gt=0)] = 64.0,
        close_timeout: Annotated[float, Bounds(ge=0)] = 10.0,
    ) -> None:
        self._nats = require()
        self.key = KeyTemplate(subject)
        self.url = url
        self.mode = mode
        self.stream = stream
        self.create_stream = create_stream and bool(stream) and mode == "jetstream"
        self.codec = value_codec(codec, dtype, tuple(shape))
        self.ack_timeout = ack_timeout
        self.close_timeout = close_timeout
        self.name = f"{type(self).__name__}({mode} subject {subject!r} at {safe_url(url)})"
        self.deduplicated = 0
        self.reconnects = 0
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self._id = f"{uuid.uuid4().hex[:16]}-"  # Nats-Msg-Id prefix of this process
        self._count = 0
        self._dropped = DropCount(self.name)  # loop thread
        self._skipped = DropCount(self.name)  # main thread: never sent (no_subject, too_large)
        self._backoff = Backoff(self.name)
        self._loop = LoopThread("nats-publisher")
        self._started = False
        # loop thread only:
        self._backlog: Backlog[tuple[str, bytes, str]] = Backlog(
            self._dropped, max_bytes=int(buffer_mb * (1 << 20))
        )
        self._nc: Any = None
        self._js: Any = None
        self._down = False
        self._lock: asyncio.Lock | None = None
        self._recovery: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()  # (made anew on the loop at each connect)

    def setup(self) -> None:
        if self._started:
            return
        self._started = True
        self._loop.run(self._first_connect(), 2 * CONNECT_TIMEOUT + 5)

    def publish(self, message: Message) -> None:
        if not self._started:
            self.setup()
        subject = self._subject(message)
        if subject is None:
            return
        value = encode_value(self.codec, message)
        if value is None:
            return
        body = value if isinstance(value, bytes) else bytes(value)
        if len(body) > self.max_payload - HEADROOM:
            why = (
                f"{type(message).__name__} of {len(body)} bytes, over the server's "
                f"max_payload of {self.max_payload} bytes (less {HEADROOM} for headers)"
            )
            self._skipped.add(1, "too_large", why)
            return
        self._count += 1
        item = (subject, body, f"{self._id}{self._count}")
        self._loop.run(self._send(item), self.ack_timeout + 2 * CONNECT_TIMEOUT + 5)

    def _subject(self, message: Message) -> str | None:
        try:
            return self.key.follow(message)
        except KeyError as e:
            why = self.key.why_missing(e.args[0], message, "subject")
            self._skipped.add(1, "no_subject", why)
            return None

    # -- the loop thread -----------------------------------------------------------

    async def _first_connect(self) -> None:
        self._lock = asyncio.Lock()
        try:
            await self._connect()
        except retryable(self._nats) as e:
            self._went_down(e)

    async def _connect(self) -> None:
        self._lost = asyncio.Event()
        nc = await connect(self._nats, self.url, self.name, self._lost)
        try:
            if self.mode == "jetstream":
                js = nc.jetstream(timeout=self.ack_timeout)
                if self.create_stream:
                    await ensure_stream(self._nats, js, self.stream, stream_subjects(self.key))
                self._js = js
        except BaseException:
            await close_quietly(nc)
            raise
        self._nc = nc
        self.max_payload = nc.max_payload

    async def _send(self, item: tuple[str, bytes, str]) -> None:
        self._backlog.append(item, len(item[1]))
        if not self._down:
            await self._flush()

    async def _flush(self) -> None:
        assert self._lock is not None
        errors = self._nats.js.errors
        async with self._lock:
            while self._backlog and not self._down:
                subject, body, msg_id = self._backlog[0]
                try:
                    await self._publish(subject, body, msg_id)
                except errors.APIError as e:
                    why = f"the server refused it: {e.description} (error {e.err_code})"
                    self._backlog.give_up_head("refused", why)
                    continue
                except self._nats.errors.MaxPayloadError:
                    why = f"{len(body)} bytes are over the server's max_payload {self.max_payload}"
                    self._backlog.give_up_head("too_large", why)
                    continue
                except retryable(self._nats) as e:
                    self._backlog.in_doubt = True
                    self._went_down(e)
                    return
                self._backlog.head_sent()

    async def _publish(self, subject: str, body: bytes, msg_id: str) -> None:
        if self._nc is None or self._nc.is_closed:
            msg = "the connection to the server was lost"
            raise self._nats.errors.ConnectionClosedError(msg)
        if self.mode == "core":
            await self._nc.publish(subject, body)
            return
        request = asyncio.ensure_future(
            self._js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})
        )
        lost = asyncio.ensure_future(self._lost.wait())
        try:  # (a PubAck never comes on a lost connection: do not wait ack_timeout)
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not request.done():
            request.cancel()
            msg = "the connection to the server was lost"
            raise self._nats.errors.ConnectionClosedError(msg)
        ack = request.result()
        if ack.duplicate:
            self.deduplicated += 1

    def _went_down(self, error: Exception) -> None:
        self._down = True
        nc, self._nc, self._js = self._nc, None, None
        self._recovery = asyncio.ensure_future(self._recover(nc, self._backoff.failed(error)))

    async def _recover(self, old: Any, delay: float) -> None:
        await close_quietly(old)
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except retryable(self._nats) as e:
                delay = self._backoff.failed(e)
                continue
            break
        self._down = False
        self.reconnects += 1
        self._backoff.succeeded()
        await self._flush()

    async def _close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        assert self._lock is not None
        async with self._lock:
            self._backlog.drop_all("unreachable", "the server was unreachable until close")
            nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:  # (core mode: the last publishes)
            try:
                await asyncio.wait_for(nc.flush(), self.ack_timeout)
            except retryable(self._nats) as e:
                log.warning("%s: the last messages may not have gone out: %s", self.name, e)
        await close_quietly(nc)

    # -- counters and the end ------------------------------------------------------

    @property
    def sent(self) -> int:
        """Messages the broker confirmed."""
        return self._backlog.sent

    @property
    def resent(self) -> int:
        return self._backlog.resent

    def stats(self) -> dict[str, Any]:
        """``sent`` (acknowledged by JetStream; in core mode, written), ``resent``
        (sent again after a broken connection), ``deduplicated`` (the stream said it
        had it already), ``reconnects``, ``buffered`` (in the backlog now)."""
        return {
            "sent": self.sent,
            "resent": self.resent,
            "deduplicated": self.deduplicated,
            "reconnects": self.reconnects,
            "buffered": len(self._backlog),
        }

    def drops(self) -> dict[str, int]:
        """Messages the server never took, by reason: ``no_subject``, ``too_large``,
        ``refused``, ``buffer_full``, ``unreachable`` (docs/brokers.md)."""
        return dict(Counter(self._skipped.by_reason) + Counter(self._dropped.by_reason))

    @property
    def dropped(self) -> int:
        return self._skipped.total + self._dropped.total

    def close(self) -> None:
        if not self._started:
            return
        deadline = time.monotonic() + self.close_timeout
        if self._down and self._backlog:
            log.info(
                "%s: waiting up to %.0f s to send %d buffered message(s)",
                self.name,
                self.close_timeout,
                len(self._backlog),
            )
        while self._backlog and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._loop.run(self._close(), self.ack_timeout + CONNECT_TIMEOUT + 1)
        except Exception as e:
            log.warning("%s: closing: %s", self.name, describe_error(e))
        self._loop.stop()
