"""RabbitMQ ends for the outside world: consume a queue, publish to an exchange.

    [stage:ingest]
    role = listener
    class = arroyo.io.rabbitmq:RabbitListener
    url = amqp://guest:guest@127.0.0.1:5672/%2F
    queue = beamline.frames
    exchange = beamline              ; optional: bind the queue to it
    routing_key = frames.#
    codec = arroyo                   ; arroyo | raw | json | array | module:function

One AMQP message is one Arroyo message (Start, Event or Stop), mapped by the codec as
for Redis (``arroyo.io.frames``). The listener acknowledges a message only after
``deliver`` returned for it, so what a killed listener held is delivered again, and
counts what the broker flags as redelivered. The publisher waits for the broker's
confirm of every message and keeps a bounded backlog while the broker is away.
docs/brokers.md has the details.

Needs pika: ``pip install 'arroyo[rabbitmq]'``. It is imported when a stage is made,
so the rest of Arroyo imports without it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io.broker import Backlog, HandedOn, KeyTemplate, Redeliveries, safe_url
from arroyo.io.codecs import Codec, CodecName, get_codec
from arroyo.io.frames import decode_value, encode_value
from arroyo.io.guard import DecodeGuard
from arroyo.io.retry import BACKOFF_CAP, Backoff, DropCount, describe_error, quiet
from arroyo.message import Message
from arroyo.stage import Listener, Publisher

log = logging.getLogger("arroyo.rabbitmq")

EXTRA = "pip install 'arroyo[rabbitmq]'"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
CONNECT_TIMEOUT = 5.0  # s: a socket that does not answer counts as a failed attempt
KEEPALIVE = 1.0  # s between the publisher thread's looks at an idle connection
MAX_KEY = 255  # bytes: AMQP's limit for a routing key (a "short string")
# Broker refusals that no retry mends: the stage's settings are wrong.
ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED = 403, 404, 406
CONTENT_TYPES = {"arroyo": "application/x-arroyo-frames", "json": "application/json"}


def require() -> Any:
    """The pika module, or ``ConfigError`` naming the extra."""
    try:
        import pika
    except ImportError as e:
        msg = f"arroyo.io.rabbitmq needs pika, which is not installed: {EXTRA}"
        raise ConfigError(msg) from e
    quiet("pika")  # (its logs of each failed connection: our backoff says it in one line)
    return pika


def parameters(pika: Any, url: str, heartbeat: int, name: str) -> Any:
    """Connection parameters from ``url``: one attempt, no hidden retries (ours have
    backoff and logging), a heartbeat, and ``name`` shown by ``rabbitmqctl``."""
    try:
        params = pika.URLParameters(url)
    except Exception as e:  # pika raises several kinds for a URL it cannot read
        msg = f"cannot read url {safe_url(url)}: {describe_error(e)}"
        raise ValueError(msg) from e
    params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = CONNECT_TIMEOUT
    params.stack_timeout = 2 * CONNECT_TIMEOUT
    params.client_properties = {"connection_name": f"{name} pid {os.getpid()}"}
    return params


def value_codec(codec: str, dtype: str, shape: tuple[int, ...]) -> Codec:
    try:
        return get_codec(codec, dtype=dtype, shape=shape)
    except ValueError as e:
        msg = f"codec {codec!r}: {e}"
        raise ValueError(msg) from e


def refusal(error: Exception) -> int:
    """The AMQP reply code of a channel the broker closed (0 for anything else)."""
    return int(getattr(error, "reply_code", 0) or 0)


def refused_for_good(pika: Any, error: Exception) -> bool:
    """A refusal at connect or declare time that no retry mends: bad credentials, no
    permission (403), a declaration unlike the existing one (406)."""
    errors = pika.exceptions
    bad_login = (errors.AuthenticationError, errors.ProbableAuthenticationError)
    return isinstance(error, bad_login) or refusal(error) in (ACCESS_REFUSED, PRECONDITION_FAILED)


def check_names(exchange: str, exchange_type: str, queue: str = "") -> None:
    for what, name in (("queue", queue), ("exchange", exchange)):
        if len(name.encode()) > MAX_KEY:
            msg = f"{what} is longer than {MAX_KEY} bytes"
            raise ValueError(msg)
    if exchange_type and not exchange:
        msg = f"exchange_type = {exchange_type} declares an exchange: name it (exchange = ...)"
        raise ValueError(msg)


def _close_quietly(connection: Any) -> None:
    if connection is None:
        return
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # a broken connection may fail to close; it is gone anyway
        log.debug("closing the connection failed", exc_info=True)


class ConsumerCancelled(Exception):
    """The broker cancelled our consumer: its queue was deleted (or the node left)."""


# -- listener ----------------------------------------------------------------------------


class RabbitListener(Listener):
    """Consumes one queue and hands each message on, acknowledging it afterwards.

    Contract:

    - On every (re)connect: declare the exchange if ``exchange_type`` is set; declare
      ``queue`` (``durable``, ``auto_delete``) if ``declare``, else check it exists;
      bind it to ``exchange`` with ``routing_key`` if ``exchange`` is set; then consume
      with at most ``prefetch`` unacknowledged messages.
    - A message is acknowledged only ``ack_delay_ms`` after ``deliver`` returned for
      everything it decoded to (the link's I/O thread sends it out of this process
      meanwhile; docs/brokers.md). A listener killed before that leaves it
      unacknowledged, and the broker delivers it again, flagged as redelivered.
      Throughput is therefore at most about ``prefetch / ack_delay_ms`` per ms.
    - ``stats()``: ``received`` messages, ``duplicates`` (those flagged redelivered:
      the broker's count of possible duplicates, since a killed process cannot say
      which it had handed on), ``reconnects`` and ``queue_lost`` (consumer cancelled
      by the broker, as when the queue is deleted).
    - A message that does not decode is counted in ``drops()`` by reason
      (``arroyo.io.guard``) and acknowledged, so it never comes back.
    - Broker unreachable, connection cut, queue missing or deleted: reconnect with
      backoff (0.1 s doubling to 5 s), logged when it goes and when it is back. A
      declaration the broker refuses for good (different ``durable`` than the
      existing queue: 406; no permission: 403) is a ``ConfigError``.
    - ``stop()`` makes ``start()`` return within about ``block_ms``; messages the
      broker had sent ahead but that were not handed on are given back (requeued).
    """

    def __init__(
        self,
        queue: str,
        url: str = DEFAULT_URL,
        declare: bool = True,
        durable: bool = True,
        auto_delete: bool = False,
        exchange: str = "",
        exchange_type: str = "",
        routing_key: str = "#",
        prefetch: Annotated[int, Bounds(ge=1, le=65535)] = 100,
        codec: Annotated[str, CodecName()] = "arroyo",
        dtype: str = "",
        shape: tuple[int, ...] = (),
        heartbeat: Annotated[int, Bounds(ge=0)] = 60,
        block_ms: Annotated[int, Bounds(ge=1)] = 200,
        ack_delay_ms: Annotated[float, Bounds(ge=0)] = 50.0,
    ) -> None:
        self._pika = require()
        check_names(exchange, exchange_type, queue)
        self.queue = queue
        self.url = url
        self.declare = declare
        self.durable = durable
        self.auto_delete = auto_delete
        self.exchange = exchange
        self.exchange_type = exchange_type
        self.routing_key = routing_key
        self.prefetch = prefetch
        self.codec = value_codec(codec, dtype, tuple(shape))
        self.block_ms = block_ms
        # delivery tags of messages handed on, not acknowledged yet
        self._handed: HandedOn[int] = HandedOn(ack_delay_ms / 1000)
        self.name = f"{type(self).__name__}(queue {queue!r} at {safe_url(url)})"  # for logs
        self.params = parameters(self._pika, url, heartbeat, self.name)
        self.received = 0
        self.redelivered = Redeliveries(self.name, "flagged redelivered")
        self.events: Counter[str] = Counter()  # reconnects, queue_lost
        self.connection: Any = None
        self._channel: Any = None
        self._guard = DecodeGuard(self.name)
        self._backoff = Backoff(self.name)

    # -- connection ----------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self._open()
        except self._pika.exceptions.AMQPError as e:
            if refused_for_good(self._pika, e):
                self._disconnect()
                msg = f"{self.name}: the broker refused: {describe_error(e)}"
                raise ConfigError(msg) from e
            raise

    def _open(self) -> None:
        self.connection = self._pika.BlockingConnection(self.params)
        channel = self.connection.channel()
        if self.exchange_type:
            channel.exchange_declare(self.exchange, self.exchange_type, durable=True)
        if self.declare:
            channel.queue_declare(self.queue, durable=self.durable, auto_delete=self.auto_delete)
        else:
            channel.queue_declare(self.queue, passive=True)
        if self.exchange:
            channel.queue_bind(self.queue, self.exchange, routing_key=self.routing_key)
        channel.basic_qos(prefetch_count=self.prefetch)
        self._channel = channel
        self._handed.all()  # forgotten: tags of a closed channel (the broker sends them again)

    def _disconnect(self) -> None:
        _close_quietly(self.connection)
        self.connection = self._channel = None

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        failures = (self._pika.exceptions.AMQPError, ConsumerCancelled)
        while not self.stopping:
            try:
                if self._channel is None:
                    self._connect()
                    if self._backoff.down_since is not None:
                        self.events["reconnects"] += 1
                    self._backoff.succeeded()
                self._consume()
            except failures as e:
                if isinstance(e, ConsumerCancelled):
                    self.events["queue_lost"] += 1
                self._disconnect()
                self.stop_requested.wait(self._backoff.failed(e))

    def _consume(self) -> None:
        channel = self._channel
        while not self.stopping:
            # wake up in time to acknowledge what waits for it, else look at stop()
            timeout = self._handed.wait(self.block_ms / 1000)
            waiting = channel.consume(self.queue, inactivity_timeout=timeout)
            item = next(waiting, None)
            if item is None:  # the consumer is gone
                break
            method, _properties, body = item
            if method is not None:
                self.received += 1
                self.redelivered.note(method.redelivered)
                for message in self._guard.decode(decode_value, self.codec, body):
                    self.deliver(message)
                self._handed.add(method.delivery_tag)
            self._acknowledge(channel, self._handed.due())
        else:
            # A clean stop: the runtime drains the links before the process exits.
            self._acknowledge(channel, self._handed.all())
            channel.cancel()  # gives back what was sent ahead and not handed on
            return
        if not (channel.is_open and self.connection.is_open):
            msg = f"the connection to the broker was lost (channel open: {channel.is_open})"
            raise self._pika.exceptions.StreamLostError(msg)
        msg = f"the broker cancelled the consumer of queue {self.queue!r} (was it deleted?)"
        raise ConsumerCancelled(msg)

    def _acknowledge(self, channel: Any, tags: list[int]) -> None:
        """Acknowledge ``tags`` (in delivery order) with one ``basic.ack``."""
        if tags:
            channel.basic_ack(tags[-1], multiple=True)

    # -- counters ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """``received``, ``duplicates`` (messages flagged redelivered), ``reconnects``
        and ``queue_lost`` (docs/brokers.md)."""
        return {
            "received": self.received,
            "duplicates": self.redelivered.count,
            "reconnects": self.events["reconnects"],
            "queue_lost": self.events["queue_lost"],
        }

    def drops(self) -> dict[str, int]:
        """Messages acknowledged but not delivered, by reason: the decode guard's
        (``undecodable``, ``too_deep``, ``unencodable``, ``frame_size``...)."""
        return self._guard.drops()

    @property
    def dropped(self) -> int:
        return self._guard.total

    def close(self) -> None:
        self._disconnect()
        self.redelivered.flush()
        if self.dropped:
            log.warning("%s: %d messages dropped in all", self.name, self.dropped)


# -- publisher ---------------------------------------------------------------------------


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
        self.sent = 0
        self.resent = 0
        self.connection: Any = None
        self._channel: Any = None
        self._dropped = DropCount(self.name)
        self._backoff = Backoff(self.name)
        self._backlog: Backlog[tuple[str, bytes, Any]] = Backlog(
            self._dropped, max_bytes=int(buffer_mb * (1 << 20))
        )
        self._in_doubt = False  # the head of the backlog may have reached the broker
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
                self._give_up("unroutable", f"no queue is bound for routing key {key!r}")
                continue
            except errors.NackError:
                self._give_up("nacked", f"the broker refused the message for {key!r} (nack)")
                continue
            except errors.ChannelClosedByBroker as e:
                if refusal(e) != PRECONDITION_FAILED:
                    self._in_doubt = True
                    raise
                self._give_up("refused", f"the broker refused it: {e.reply_text}")
                raise  # the channel is gone: reconnect
            except self._retryable:
                self._in_doubt = True
                raise
            self._backlog.popleft()
            self.sent += 1
            if self._in_doubt:
                self._in_doubt = False
                self.resent += 1

    def _give_up(self, reason: str, why: str) -> None:
        self._backlog.popleft()
        self._in_doubt = False
        self._dropped.add(1, reason, why)

    # -- outages -------------------------------------------------------------------

    def _went_down(self, error: Exception) -> None:
        self._down = True
        _close_quietly(self.connection)
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
            _close_quietly(self.connection)
            self.connection = self._channel = None
