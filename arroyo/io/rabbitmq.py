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
for Redis (``arroyo.io.frames``). The listener acknowledges a message only once the
next stage has taken it, so what a killed listener held is delivered again, and counts
what the broker flags as redelivered. The publisher waits for the broker's
confirm of every message and keeps a bounded backlog while the broker is away
(``_rabbitmq_publisher``; what both share is in ``_amqp``). docs/brokers.md has the
details.

Needs pika: ``pip install 'arroyo[rabbitmq]'``. It is imported when a stage is made,
so the rest of Arroyo imports without it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated, Any

from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._amqp import (
    DEFAULT_URL,
    check_names,
    close_quietly,
    parameters,
    refused_for_good,
    require,
)
from arroyo.io._rabbitmq_publisher import RabbitPublisher
from arroyo.io.broker import HandedOn, Redeliveries, safe_url
from arroyo.io.codecs import CodecName
from arroyo.io.frames import decode_value, value_codec
from arroyo.io.guard import DecodeGuard
from arroyo.io.retry import Backoff, describe_error
from arroyo.stage import Listener

log = logging.getLogger("arroyo.rabbitmq")

__all__ = ["ConsumerCancelled", "RabbitListener", "RabbitPublisher"]


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
    - A message is acknowledged only once the next stage has taken everything it
      decoded to (its link returned the credit: ``Listener.handed_on``), or
      ``ack_delay_ms`` after ``deliver`` returned where the link cannot tell (a PUB
      link; docs/brokers.md, "Acknowledgement"). A listener killed before that leaves
      it unacknowledged, and the broker delivers it again, flagged as redelivered.
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
        close_quietly(self.connection)
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
                self._handed.add(method.delivery_tag, self.handed_on())
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
