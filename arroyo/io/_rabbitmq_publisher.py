"""The RabbitMQ publisher (``arroyo.io.rabbitmq:RabbitPublisher``, docs/brokers.md):
publishes each message to an exchange with a routing key, waits for the broker's
confirms on a thread of its own, and keeps a bounded backlog while the broker is away."""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._amqp import (
    CONNECT_TIMEOUT,
    DEFAULT_URL,
    MAX_KEY,
    PRECONDITION_FAILED,
    check_names,
    close_quietly,
    parameters,
    refusal,
    refused_for_good,
    require,
)
from arroyo.io.broker import Backlog, KeyTemplate, safe_url
from arroyo.io.codecs import CodecName
from arroyo.io.frames import encode_value, value_codec
from arroyo.io.retry import BACKOFF_CAP, Backoff, DropCount, describe_error
from arroyo.message import Message
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.rabbitmq")

KEEPALIVE = 1.0  # s between the publisher thread's looks at an idle connection
CONTENT_TYPES = {"arroyo": "application/x-arroyo-frames", "json": "application/json"}


class RabbitPublisher(Publisher):
    """Publishes every message to an exchange, each confirmed by the broker.

    Contract:

    - ``routing_key`` is a template filled from the message (``frames.{detector}``;
      ``arroyo.io.broker.KeyTemplate``): a message it cannot fill is dropped, counted
      as ``no_routing_key``. The default exchange ``""`` routes to the queue named by
      the key. ``exchange_type`` set: the exchange is declared (durable) on connect.
    - While the broker answers, ``publish`` returns once the broker confirmed the
      message (publisher confirms), so a slow broker slows the stage down. A message
      the broker cannot route (``mandatory``, no queue bound) is dropped as
      ``unroutable``; one it refuses (a nack, as from a full queue with
      ``x-overflow = reject-publish``, or a channel error 406 such as a message over
      its size limit) as ``nacked`` or ``refused``. ``persistent`` sets delivery
      mode 2 (the message is written to disk in a durable queue).
    - When the broker is unreachable or the connection breaks, messages wait in a
      backlog of at most ``buffer_mb`` megabytes (oldest dropped first:
      ``buffer_full``) while a thread reconnects with backoff (0.1 s doubling to
      5 s) and sends them in order before anything newer. The message in flight when
      the connection broke is sent again (counted in ``stats()['resent']``): the
      broker may have had it already, so the far side may see it twice.
    - ``close()`` waits up to ``close_timeout`` seconds for the backlog; what is left
      is dropped as ``unreachable``.
    """

    def __init__(
        self,
        routing_key: str,
        exchange: str = "",
        url: str = DEFAULT_URL,
        exchange_type: str = "",
        codec: Annotated[str, CodecName()] = "arroyo",
        dtype: str = "",
        shape: tuple[int, ...] = (),
        persistent: bool = False,
        mandatory: bool = True,
        buffer_mb: Annotated[float, Bounds(gt=0)] = 64.0,
        close_timeout: Annotated[float, Bounds(ge=0)] = 10.0,
        heartbeat: Annotated[int, Bounds(ge=0)] = 60,
    ) -> None:
        self._pika = require()
        check_names(exchange, exchange_type)
        self.key = KeyTemplate(routing_key)
        self.exchange = exchange
        self.url = url
        self.exchange_type = exchange_type
        self.codec = value_codec(codec, dtype, tuple(shape))
        self.persistent = persistent
        self.mandatory = mandatory
        self.close_timeout = close_timeout
        where = f"exchange {exchange!r}" if exchange else "the default exchange"
        self.name = f"{type(self).__name__}({where} at {safe_url(url)})"  # for logs
        self.params = parameters(self._pika, url, heartbeat, self.name)
        self.connection: Any = None
        self._channel: Any = None
        self._dropped = DropCount(self.name)
        self._backoff = Backoff(self.name)
        self._backlog: Backlog[tuple[str, bytes, Any]] = Backlog(
            self._dropped, max_bytes=int(buffer_mb * (1 << 20))
        )
        self._lock = threading.Lock()
        self._down = False
        self._next_attempt = 0.0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._retryable = (self._pika.exceptions.AMQPError,)

    def setup(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            try:
                self._connect()
            except self._retryable as e:
                if refused_for_good(self._pika, e):
                    msg = f"{self.name}: the broker refused: {describe_error(e)}"
                    raise ConfigError(msg) from e
                self._went_down(e)
        self._thread = threading.Thread(
            target=self._service, name="rabbitmq-publisher", daemon=True
        )
        self._thread.start()

    def publish(self, message: Message) -> None:
        if self._thread is None:
            self.setup()
        key = self._routing_key(message)
        if key is None:
            return
        value = encode_value(self.codec, message)
        if value is None:
            return
        properties = self._pika.BasicProperties(
            content_type=CONTENT_TYPES.get(self.codec.name, "application/octet-stream"),
            delivery_mode=2 if self.persistent else None,
            type=type(message).__name__.lower(),
        )
        body = value if isinstance(value, bytes) else bytes(value)  # (pika takes bytes only)
        with self._lock:
            self._backlog.append((key, body, properties), len(body))
            if self._down:
                return
            try:
                self._flush_locked()
            except self._retryable as e:
                self._went_down(e)

    def _routing_key(self, message: Message) -> str | None:
        try:
            key = self.key.follow(message)
        except KeyError as e:
            why = self.key.why_missing(e.args[0], message, "routing key")
            self._dropped.add(1, "no_routing_key", why)
            return None
        if len(key.encode()) > MAX_KEY:
            self._dropped.add(
                1, "bad_routing_key", f"routing key over {MAX_KEY} bytes: {key[:60]}..."
            )
            return None
        return key

    # -- sending (the caller holds the lock) ----------------------------------------

    def _connect(self) -> None:
        self.connection = self._pika.BlockingConnection(self.params)
        channel = self.connection.channel()
        if self.exchange_type:
            channel.exchange_declare(self.exchange, self.exchange_type, durable=True)
        channel.confirm_delivery()
        self._channel = channel

    def _flush_locked(self) -> None:
        errors = self._pika.exceptions
        while self._backlog:
            key, value, properties = self._backlog[0]
            try:
                self._channel.basic_publish(
                    self.exchange, key, value, properties, mandatory=self.mandatory
                )
            except errors.UnroutableError:
                self._backlog.give_up_head(
                    "unroutable", f"no queue is bound for routing key {key!r}"
                )
                continue
            except errors.NackError:
                self._backlog.give_up_head(
                    "nacked", f"the broker refused the message for {key!r} (nack)"
                )
                continue
            except errors.ChannelClosedByBroker as e:
                if refusal(e) != PRECONDITION_FAILED:
                    self._backlog.in_doubt = True
                    raise
                self._backlog.give_up_head("refused", f"the broker refused it: {e.reply_text}")
                raise  # the channel is gone: reconnect
            except self._retryable:
                self._backlog.in_doubt = True
                raise
            self._backlog.head_sent()

    # -- outages -------------------------------------------------------------------

    def _went_down(self, error: Exception) -> None:
        self._down = True
        close_quietly(self.connection)
        self.connection = self._channel = None
        self._next_attempt = time.monotonic() + self._backoff.failed(error)
        self._wake.set()

    def _service(self) -> None:
        """Reconnects and sends the backlog while the broker is away; otherwise looks
        at the idle connection now and then (heartbeats, a close from the broker)."""
        while not self._closing.is_set():
            with self._lock:
                timeout = self._recover() if self._down else self._keep_alive()
            self._wake.wait(max(timeout, 0.01))
            self._wake.clear()

    def _recover(self) -> float:
        wait = self._next_attempt - time.monotonic()
        if wait > 0:
            return wait
        try:
            if self._channel is None:
                self._connect()
            self._flush_locked()
        except self._retryable as e:
            self._went_down(e)
            return self._next_attempt - time.monotonic()
        self._down = False
        self._backoff.succeeded()
        return KEEPALIVE

    def _keep_alive(self) -> float:
        if self.connection is not None:
            try:
                self.connection.process_data_events(0)
            except self._retryable as e:
                self._went_down(e)
        return KEEPALIVE

    # -- counters and the end ------------------------------------------------------

    @property
    def sent(self) -> int:
        """Messages the broker confirmed."""
        return self._backlog.sent

    @property
    def resent(self) -> int:
        return self._backlog.resent

    def stats(self) -> dict[str, Any]:
        """``sent`` (confirmed by the broker), ``resent`` (sent again after a broken
        connection: possible duplicates), ``buffered`` (messages in the backlog)."""
        return {"sent": self.sent, "resent": self.resent, "buffered": len(self._backlog)}

    def drops(self) -> dict[str, int]:
        """Messages the broker never took, by reason: ``no_routing_key``,
        ``bad_routing_key``, ``unroutable``, ``nacked``, ``refused``, ``buffer_full``,
        ``unreachable`` (docs/brokers.md)."""
        return dict(self._dropped.by_reason)

    @property
    def dropped(self) -> int:
        return self._dropped.total

    def close(self) -> None:
        deadline = time.monotonic() + self.close_timeout
        if self._down and self._backlog:
            log.info(
                "%s: waiting up to %.0f s to send %d buffered message(s)",
                self.name,
                self.close_timeout,
                len(self._backlog),
            )
        while self._down and self._backlog and time.monotonic() < deadline:
            time.sleep(0.05)
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(BACKOFF_CAP + 2 * CONNECT_TIMEOUT)
        with self._lock:
            self._backlog.drop_all("unreachable", "the broker was unreachable until close")
            close_quietly(self.connection)
            self.connection = self._channel = None
