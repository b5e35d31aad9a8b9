"""Redis ends for the outside world: pub/sub channels and Redis Streams.

    [stage:ingest]
    role = listener
    class = arroyo.io.redis:RedisListener
    url = redis://127.0.0.1:6379/0
    mode = stream                  ; or channel
    key = beamline:frames
    codec = arroyo                 ; arroyo | raw | json | module:function

``mode = channel`` is Redis pub/sub (SUBSCRIBE / PUBLISH): a message reaches the
listeners subscribed at that moment and nobody else, so anything published while a
listener is away (or Redis is down) is lost, by design. ``mode = stream`` is a Redis
Stream: the publisher appends with ``XADD MAXLEN ~``, the listener reads through a
consumer group and acknowledges an entry only after ``deliver`` returned, so entries
survive listener and Redis restarts (with persistence on). docs/redis.md has the
details, including the one-value framing of the ``arroyo`` codec (``pack_frames``).

Needs redis-py: ``pip install 'arroyo[redis]'``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover  (depends on the installation)
    _msg = "arroyo.io.redis needs redis-py: pip install 'arroyo[redis]' (or: pip install redis)"
    raise ImportError(_msg) from e

from arroyo.errors import ConfigError
from arroyo.io.broker import Backlog, safe_url
from arroyo.io.codecs import CodecName, get_codec
from arroyo.io.frames import decode_value, encode_value
from arroyo.io.guard import DecodeGuard
from arroyo.io.retry import BACKOFF_CAP, Backoff, DropCount
from arroyo.message import Message
from arroyo.stage import Listener, Publisher

log = logging.getLogger("arroyo.redis")

# Errors after which the same command may work later: Redis down, restarting
# (LOADING is a BusyLoadingError, a ConnectionError), or too slow to answer.
RETRYABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

CHUNK_BYTES = 16 << 20  # at most this much (or CHUNK_MESSAGES) per round trip
CHUNK_MESSAGES = 100
MARKER_TTL = 86_400  # seconds a stream publisher's "written up to" key outlives it

# -- connections -------------------------------------------------------------------------


def connect(url: str, socket_timeout: float) -> redis.Redis:
    """A client that fails fast: no hidden retries (ours have backoff and logging)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 5.0),
        retry=Retry(NoBackoff(), 0),
    )


def _check_options(mode: str, **positive: int) -> None:
    if mode not in ("channel", "stream"):
        msg = f"mode must be 'channel' or 'stream', not {mode!r}"
        raise ValueError(msg)
    for name, value in positive.items():
        if value < 1:
            msg = f"{name} must be >= 1, not {value}"
            raise ValueError(msg)


def _entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of an XREADGROUP reply on one stream (RESP2 list or RESP3 map)."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3: {stream: [[entries]]}
        (nested,) = response.values()
        return list(nested[0])
    return list(response[0][1])  # RESP2: [[stream, [entries]]]


# -- listener ----------------------------------------------------------------------------


class RedisListener(Listener):
    """Receives messages from a Redis channel or stream and hands each one on.

    Contract:

    - ``mode = channel``: SUBSCRIBE to ``key``; each published value is one message.
      What is published while this listener is not subscribed is lost (pub/sub).
    - ``mode = stream``: read ``key`` through consumer group ``group`` (created with
      MKSTREAM if missing; a new group starts at new entries, or at the oldest retained
      entry with ``from_start``) as consumer ``consumer`` (default ``HOSTNAME-PID``).
      An entry is acknowledged (XACK) only after ``deliver`` returned for it. On every
      (re)connect this consumer's own pending entries are read again first (id ``0``),
      then new ones (``>``); an entry delivered whose XACK got lost is acknowledged,
      not delivered again. Entries another consumer of the group left pending for
      longer than ``claim_idle_ms`` are claimed (XAUTOCLAIM) and delivered: this is
      how a listener restarted under a new consumer name picks up what its previous
      process read but never acknowledged (0 switches it off).
    - The value is decoded by ``codec``; in stream mode it is the entry's ``field``.
      A value that does not decode, whatever the codec raises (``arroyo.io.guard``),
      or an entry without ``field`` is counted in ``dropped``, logged and, in stream
      mode, acknowledged so it is never read again: no entry can make this listener
      exit, so none can make it loop.
    - Redis unreachable or restarting: reconnects with backoff (0.1 s doubling to
      5 s), logging when it goes and when it is back.
    - ``stop()`` makes ``start()`` return within about ``block_ms`` (after delivering
      the entries already read).
    """

    def __init__(
        self,
        key: str,
        url: str = "redis://127.0.0.1:6379/0",
        mode: Literal["channel", "stream"] = "channel",
        codec: Annotated[str, CodecName()] = "arroyo",
        group: str = "arroyo",
        consumer: str = "",
        block_ms: int = 200,
        batch: int = 100,
        field: str = "data",
        from_start: bool = False,
        claim_idle_ms: int = 60_000,
    ) -> None:
        _check_options(mode, block_ms=block_ms, batch=batch)
        if claim_idle_ms < 0:
            msg = f"claim_idle_ms must be >= 0, not {claim_idle_ms}"
            raise ValueError(msg)
        self.key = key
        self.url = url
        self.mode = mode
        self.codec = get_codec(codec)
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.block_ms = block_ms
        self.batch = batch
        self.field = field.encode()
        self.from_start = from_start
        self.claim_idle_ms = claim_idle_ms
        self.received = 0
        self.client: redis.Redis | None = None
        self._pubsub: Any = None
        self._cursor: str | bytes | None = None  # reading own pending entries from here
        self._delivered: set[bytes] = set()  # delivered, XACK not confirmed yet
        self._next_claim = 0.0
        self.name = f"{type(self).__name__}({mode} {key!r} at {safe_url(url)})"  # for logs
        self._guard = DecodeGuard(self.name)
        self._backoff = Backoff(self.name)

    # -- connection ----------------------------------------------------------------

    def _connect(self) -> None:
        self.client = connect(self.url, self.block_ms / 1000 + 10.0)
        if self.mode == "channel":
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.key)
            self._pubsub = pubsub
            return
        try:
            self.client.xgroup_create(
                self.key, self.group, id="0" if self.from_start else "$", mkstream=True
            )
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                msg = f"{self.name}: cannot create consumer group {self.group!r}: {e}"
                raise ConfigError(msg) from e
        self._cursor = "0"
        self._next_claim = 0.0

    def _disconnect(self) -> None:
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # a broken connection may fail to close; it is gone anyway
                log.debug("closing the pub/sub connection failed", exc_info=True)
            self._pubsub = None
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                log.debug("closing the client failed", exc_info=True)
            self.client = None

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        while not self.stopping:
            try:
                if self.client is None:
                    self._connect()
                if self.mode == "channel":
                    self._poll_channel()
                else:
                    self._poll_stream()
            except RETRYABLE as e:
                self._disconnect()
                self.stop_requested.wait(self._backoff.failed(e))
                continue
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                # The stream or the group vanished (deleted, or Redis restarted without
                # persistence): make them again.
                log.warning("%s: %s; creating the group again", self.name, e)
                self._disconnect()
                continue
            self._backoff.succeeded()

    def _poll_channel(self) -> None:
        assert self._pubsub is not None
        timeout = self.block_ms / 1000
        for _ in range(self.batch):
            item = self._pubsub.get_message(timeout=timeout)
            if item is None:
                return
            timeout = 0.0
            if item.get("type") in ("message", "pmessage"):
                self.received += 1
                for message in self._decode(item["data"]):
                    self.deliver(message)

    def _poll_stream(self) -> None:
        client = self.client
        assert client is not None
        if self.claim_idle_ms and time.monotonic() >= self._next_claim:
            self._claim_abandoned(client)
        if self._cursor is not None:  # our own pending entries first, without blocking
            reply = client.xreadgroup(
                self.group, self.consumer, {self.key: self._cursor}, count=self.batch
            )
            entries = _entries(reply)
            if not entries:
                self._cursor = None
                return
            self._cursor = entries[-1][0]
        else:
            reply = client.xreadgroup(
                self.group, self.consumer, {self.key: ">"}, count=self.batch, block=self.block_ms
            )
            entries = _entries(reply)
        self._handle_entries(client, entries)

    def _handle_entries(
        self, client: redis.Redis, entries: Iterable[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> None:
        done: list[bytes] = []
        for entry_id, fields in entries:
            if entry_id in self._delivered:  # delivered before a reconnect; XACK was lost
                done.append(entry_id)
                continue
            self.received += 1
            if not fields:  # still pending but trimmed away by MAXLEN or XDEL
                self._drop(
                    "deleted", f"entry {entry_id!r} was deleted from the stream before delivery"
                )
            elif self.field not in fields:
                self._drop("no_field", f"entry {entry_id!r} has no field {self.field.decode()!r}")
            else:
                for message in self._decode(fields[self.field]):
                    self.deliver(message)
            self._delivered.add(entry_id)
            done.append(entry_id)
        if done:
            client.xack(self.key, self.group, *done)
            self._delivered.difference_update(done)

    def _claim_abandoned(self, client: redis.Redis) -> None:
        """Take over and deliver entries other consumers read but left unacknowledged."""
        self._next_claim = time.monotonic() + max(1.0, self.claim_idle_ms / 2000)
        cursor: Any = "0-0"
        while not self.stopping:
            reply = client.xautoclaim(
                self.key,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=cursor,
                count=self.batch,
            )
            cursor, entries = reply[0], reply[1]
            for entry_id in reply[2] if len(reply) > 2 else []:
                self._drop(
                    "deleted", f"entry {entry_id!r} was deleted from the stream before delivery"
                )
            if entries:
                log.warning(
                    "%s: claimed %d entries that another consumer of group %r left "
                    "unacknowledged for over %d ms",
                    self.name,
                    len(entries),
                    self.group,
                    self.claim_idle_ms,
                )
                self._handle_entries(client, entries)
            if cursor in (b"0-0", "0-0"):
                return

    def _decode(self, value: Any) -> list[Message]:
        return self._guard.decode(decode_value, self.codec, value)

    def _drop(self, reason: str, why: str) -> None:
        self._guard.drop(reason, why)

    @property
    def dropped(self) -> int:
        return self._guard.total

    def drops(self) -> dict[str, int]:
        """Values read but not delivered, by reason: ``deleted`` (trimmed from the
        stream before delivery), ``no_field``, and the decode guard's (``undecodable``,
        ``too_deep``, ``unencodable``: ``arroyo.io.guard``)."""
        return self._guard.drops()

    def close(self) -> None:
        self._disconnect()
        if self.dropped:
            log.warning("%s: %d values dropped in all", self.name, self.dropped)


# -- publisher ---------------------------------------------------------------------------


class RedisPublisher(Publisher):
    """Publishes every message to a Redis channel (PUBLISH) or stream (XADD).

    Contract:

    - ``mode = channel``: PUBLISH the value to ``key``; only listeners subscribed at
      that moment get it. ``mode = stream``: XADD it as field ``field`` to stream
      ``key``, trimmed to about ``maxlen`` entries (``MAXLEN ~``).
    - ``publish`` sends before it returns while Redis is reachable (a slow Redis slows
      the stage down). When Redis is unreachable, messages wait in a buffer of at
      most ``buffer`` messages while a background thread reconnects with backoff
      (0.1 s doubling to 5 s) and then sends them, in order, before anything newer.
      A full buffer drops its oldest message; drops are counted in ``dropped`` and
      logged. ``close()`` waits up to ``close_timeout`` seconds for the buffer to
      drain, then counts what is left as dropped.
    - Stream mode writes each message once even when the connection breaks after
      Redis applied an XADD but before the reply arrived: every XADD goes in one
      MULTI/EXEC with a SET of a per-publisher key ("written up to message N"), which
      is read back after a reconnect. Channel mode may publish such a message twice.
    - A codec that returns nothing for a message (``raw`` for Start/Stop) sends nothing.
      A command Redis refuses (for instance WRONGTYPE) drops the message, counted and
      logged, and raises from ``publish`` so the stage counts the error.
    """

    def __init__(
        self,
        key: str,
        url: str = "redis://127.0.0.1:6379/0",
        mode: Literal["channel", "stream"] = "channel",
        codec: Annotated[str, CodecName()] = "arroyo",
        maxlen: int = 100_000,
        field: str = "data",
        buffer: int = 10_000,
        close_timeout: float = 10.0,
    ) -> None:
        _check_options(mode, maxlen=maxlen, buffer=buffer)
        self.key = key
        self.url = url
        self.mode = mode
        self.codec = get_codec(codec)
        self.maxlen = maxlen
        self.field = field
        self.buffer = buffer
        self.close_timeout = close_timeout
        self.sent = 0
        self.client: redis.Redis | None = None
        # "written up to" key of this publisher (stream mode; see the class docstring)
        self.marker = f"arroyo:written:{key}:{uuid.uuid4().hex}"
        self._counter = 0
        self._lock = threading.Lock()
        self._down = False
        self._abandon = threading.Event()
        self._retry_thread: threading.Thread | None = None
        self.name = f"{type(self).__name__}({mode} {key!r} at {safe_url(url)})"  # for logs
        self._dropped = DropCount(self.name)
        self._pending: Backlog[tuple[int, bytes | bytearray]] = Backlog(
            self._dropped, max_messages=buffer
        )
        self._backoff = Backoff(self.name)

    def setup(self) -> None:
        if self.client is not None:
            return
        self.client = connect(self.url, 10.0)
        try:
            self.client.ping()
        except RETRYABLE as e:
            with self._lock:
                self._went_down(e)

    def publish(self, message: Message) -> None:
        if self.client is None:
            self.setup()
        value = encode_value(self.codec, message)
        if value is None:
            return
        with self._lock:
            self._counter += 1
            self._pending.append((self._counter, value), len(value))
            if self._down:
                return
            try:
                self._flush_locked()
            except RETRYABLE as e:
                self._went_down(e)

    # -- sending -------------------------------------------------------------------

    def _flush_locked(self) -> None:
        """Send everything pending, oldest first, in chunks (caller holds the lock)."""
        assert self.client is not None
        while self._pending:
            chunk: list[tuple[int, bytes | bytearray]] = []
            size = 0
            for counter, value in self._pending:
                if chunk and (len(chunk) >= CHUNK_MESSAGES or size + len(value) > CHUNK_BYTES):
                    break
                chunk.append((counter, value))
                size += len(value)
            try:
                self._send(self.client, chunk)
            except RETRYABLE:
                raise
            except redis.RedisError as e:
                for _ in chunk:
                    self._pending.popleft()
                self._count_drops(len(chunk), "refused", f"Redis refused them: {e}")
                msg = f"{self.name}: {e}"
                raise RuntimeError(msg) from e
            for _ in chunk:
                self._pending.popleft()
            self.sent += len(chunk)

    def _send(self, client: redis.Redis, chunk: list[tuple[int, bytes | bytearray]]) -> None:
        if self.mode == "channel":
            if len(chunk) == 1:
                client.publish(self.key, chunk[0][1])
                return
            pipe = client.pipeline(transaction=False)
            for _, value in chunk:
                pipe.publish(self.key, value)
            pipe.execute()
            return
        pipe = client.pipeline(transaction=True)
        for _, value in chunk:
            pipe.xadd(self.key, {self.field: value}, maxlen=self.maxlen, approximate=True)
        pipe.set(self.marker, chunk[-1][0], ex=MARKER_TTL)
        pipe.execute()

    def _forget_written(self, client: redis.Redis) -> None:
        """After a reconnect (stream mode): drop what Redis had applied before the break."""
        if self.mode != "stream" or not self._pending:
            return
        raw = client.get(self.marker)
        if raw is None:
            return
        written = int(raw)
        already = 0
        while self._pending and self._pending[0][0] <= written:
            self._pending.popleft()
            already += 1
        if already:
            self.sent += already
            log.info(
                "%s: %d message(s) had been written before the connection broke; "
                "not sending them again",
                self.name,
                already,
            )

    # -- outages -------------------------------------------------------------------

    def _went_down(self, error: Exception) -> None:
        """Redis is unreachable: buffer from now on and retry in the background."""
        self._down = True
        delay = self._backoff.failed(error)
        if self._retry_thread is None or not self._retry_thread.is_alive():
            self._retry_thread = threading.Thread(
                target=self._recover, args=(delay,), name=f"redis-retry-{self.key}", daemon=True
            )
            self._retry_thread.start()

    def _recover(self, delay: float) -> None:
        while not self._abandon.wait(delay):
            with self._lock:
                assert self.client is not None
                try:
                    self._forget_written(self.client)
                    self._flush_locked()
                except RETRYABLE as e:
                    delay = self._backoff.failed(e)
                    continue
                except RuntimeError as e:  # refused messages were dropped; go on
                    log.error("%s", e)
                    delay = 0.0
                    continue
                self._down = False
                self._backoff.succeeded()
                return

    @property
    def dropped(self) -> int:
        return self._dropped.total

    def drops(self) -> dict[str, int]:
        """Messages Redis never got, by reason: ``buffer_full`` (the retry buffer
        overflowed while Redis was away), ``refused`` (an error reply such as
        WRONGTYPE), ``unreachable`` (still buffered when the stage closed)."""
        return dict(self._dropped.by_reason)

    def _count_drops(self, n: int, reason: str, why: str) -> None:
        self._dropped.add(n, reason, why)

    def close(self) -> None:
        thread = self._retry_thread
        if thread is not None and thread.is_alive():
            log.info(
                "%s: waiting up to %.0f s to send %d buffered message(s)",
                self.name,
                self.close_timeout,
                len(self._pending),
            )
            thread.join(self.close_timeout)
        self._abandon.set()
        if thread is not None:
            thread.join(BACKOFF_CAP + 15)
        with self._lock:
            self._pending.drop_all("unreachable", "Redis was unreachable until close")
            if self.client is not None:
                if self.mode == "stream" and not self._down:
                    try:
                        self.client.delete(self.marker)
                    except redis.RedisError:
                        log.debug("could not delete %s", self.marker, exc_info=True)
                self.client.close()
                self.client = None
