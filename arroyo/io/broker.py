"""What the broker ends share (``arroyo.io.redis``, ``arroyo.io.rabbitmq``,
``arroyo.io.nats``): a URL fit for a log line, the backlog a publisher keeps while its
broker is away, keys templated from a message's metadata, and the messages a listener
handed on and acknowledges a little later.

The message mapping they share, one broker value per Arroyo message, is
``arroyo.io.frames``; reconnecting with backoff and counting drops is
``arroyo.io.retry``; decoding foreign values is ``arroyo.io.guard``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from string import Formatter
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

from arroyo.io.retry import DropCount
from arroyo.message import Event, Message, Start, Stop

log = logging.getLogger("arroyo.io")
T = TypeVar("T")
CHECK_EVERY = 0.002  # s: how often HandedOn's owner looks whether the next stage took


def safe_url(url: str) -> str:
    """``url`` without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class Backlog(Generic[T]):
    """Messages a publisher could not hand to its broker yet, oldest first.

    Bounded by a number of messages, a number of bytes, or both (0: no bound of that
    kind). ``append`` makes room by dropping the oldest messages, counted in ``drops``
    as ``buffer_full``; the newest message is always kept, even when it alone is over
    the byte bound. Not thread-safe: the publisher holds its own lock around it.
    """

    def __init__(self, drops: DropCount, max_messages: int = 0, max_bytes: int = 0) -> None:
        self.drops = drops
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: deque[tuple[T, int]] = deque()
        self.sent = 0  # messages the broker confirmed, taken off the head
        self.resent = 0  # of those, sent again after a broken connection
        self.in_doubt = False  # the head may have reached the broker (the link broke)

    def append(self, item: T, nbytes: int) -> None:
        self._items.append((item, nbytes))
        self.nbytes += nbytes
        full = 0
        while len(self._items) > 1 and self._over():
            self.popleft()
            full += 1
        if full:
            self.drops.add(
                full, "buffer_full", "the buffer for messages the broker could not take yet is full"
            )

    def _over(self) -> bool:
        return bool(
            (self.max_messages and len(self._items) > self.max_messages)
            or (self.max_bytes and self.nbytes > self.max_bytes)
        )

    def popleft(self) -> T:
        item, nbytes = self._items.popleft()
        self.nbytes -= nbytes
        return item

    def head_sent(self) -> None:
        """The broker confirmed the oldest message: forget it, counted as sent (and as
        resent if it was in doubt: a possible duplicate)."""
        self.popleft()
        self.sent += 1
        if self.in_doubt:
            self.in_doubt = False
            self.resent += 1

    def give_up_head(self, reason: str, why: str) -> None:
        """The broker will never take the oldest message: forget it, counted in drops."""
        self.popleft()
        self.in_doubt = False
        self.drops.add(1, reason, why)

    def __getitem__(self, index: int) -> T:
        return self._items[index][0]

    def __iter__(self) -> Iterator[T]:
        return (item for item, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def drop_all(self, reason: str, why: str) -> None:
        """Count everything still here as dropped for ``reason``, and forget it."""
        if self._items:
            self.drops.add(len(self._items), reason, why)
        self._items.clear()
        self.nbytes = 0


class KeyTemplate:
    """A broker key (a routing key, a subject) made from a message: ``frames.{detector}``.

    A field is looked up in the message's own metadata (an Event) or data (a Start or
    Stop), then in the data of its run's Start, then among ``run`` (the run id) and
    ``kind`` (``start``, ``event`` or ``stop``). Format specs work (``{run:05d}``).
    ``ValueError`` at construction for a template that is not one (unbalanced braces,
    a positional ``{}``, attribute or index access).
    """

    def __init__(self, template: str) -> None:
        try:
            parsed = list(Formatter().parse(template))
        except ValueError as e:
            msg = f"{template!r} is not a key template: {e}"
            raise ValueError(msg) from e
        self.template = template
        self._run: tuple[int, dict[str, Any]] = (0, {})  # the open run's id, Start data
        self.fields = [name for _, name, _, _ in parsed if name is not None]
        for name in self.fields:
            if not name.isidentifier():
                msg = (
                    f"{template!r}: {{{name}}} is not a plain field name "
                    "(write {detector}, not {} or {a.b} or {a[0]})"
                )
                raise ValueError(msg)

    def follow(self, message: Message) -> str:
        """``render`` within the run: the data of the open run's Start (remembered from
        its Start, forgotten at its Stop) fills what the message itself lacks."""
        if isinstance(message, Start):
            self._run = (message.run, dict(message.data))
        run, start = self._run
        try:
            return self.render(message, start if message.run == run else {})
        finally:
            if isinstance(message, Stop):
                self._run = (0, {})

    def why_missing(self, field: str, message: Message, what: str) -> str:
        """The drop's reason text for a ``KeyError(field)`` of ``follow``."""
        kind = type(message).__name__
        return (
            f"{what} {self.template!r} needs {field!r}: the {kind} has no such metadata, "
            "nor its run's Start"
        )

    def render(self, message: Message, start_data: Mapping[str, Any]) -> str:
        """The key for ``message``; ``KeyError`` naming the first field it lacks."""
        if not self.fields:
            return self.template
        own = message.metadata if isinstance(message, Event) else message.data  # type: ignore[attr-defined]
        values = {"run": message.run, "kind": type(message).__name__.lower()}
        values.update(start_data)
        values.update(own)
        for name in self.fields:
            if name not in values:
                raise KeyError(name)
        return self.template.format_map(values)


class Redeliveries:
    """Messages a broker delivered again (flagged redelivered: a consumer before had
    them unacknowledged), counted as possible duplicates; one log line per streak of
    them, when it ends (``note(False)``) or at ``flush()``."""

    def __init__(self, name: str, flagged: str) -> None:
        self.name = name
        self.flagged = flagged  # how the broker says so, for the log line
        self.count = 0
        self._streak = 0

    def note(self, redelivered: bool) -> None:
        if redelivered:
            self.count += 1
            self._streak += 1
        elif self._streak:
            self.flush()

    def flush(self) -> None:
        if not self._streak:
            return
        log.warning(
            "%s: %d message(s) came again, %s (a consumer before had them "
            "unacknowledged: possible duplicates; %d in all)",
            self.name,
            self._streak,
            self.flagged,
            self.count,
        )
        self._streak = 0


class HandedOn(Generic[T]):
    """Messages a listener handed on, to acknowledge once the stages after it have
    taken them.

    ``add(item, taken)``: ``taken`` is ``Listener.handed_on()``'s check, True once the
    next stage has consumed everything delivered up to this item (its link returned
    the credit: ``arroyo.runtime.handoff``). Where there is no such check (a PUB link,
    no stage process), the item is due ``delay`` seconds after ``deliver`` returned:
    the link's ZeroMQ socket has it then, and its I/O thread sends it out of the
    process a moment later (docs/brokers.md, "Acknowledgement"). Items come due in
    the order they were added. Used from one thread only.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._items: deque[tuple[float, Callable[[], bool] | None, T]] = deque()

    def add(self, item: T, taken: Callable[[], bool] | None = None) -> None:
        self._items.append((time.monotonic(), taken, item))

    def due(self) -> list[T]:
        """The items taken (or handed on at least ``delay`` ago), oldest first, forgotten
        here."""
        before = time.monotonic() - self.delay
        out = []
        while self._items:
            at, taken, item = self._items[0]
            if not (taken() if taken is not None else at <= before):
                break
            out.append(item)
            self._items.popleft()
        return out

    def all(self) -> list[T]:
        """Every item, due or not (a clean stop: the runtime drains its links)."""
        out = [item for _, _, item in self._items]
        self._items.clear()
        return out

    def wait(self, longest: float) -> float:
        """Seconds until the oldest item may be due, at most ``longest`` (at least 1 ms):
        ``CHECK_EVERY`` for one with a check (credit comes back at no set time)."""
        if not self._items:
            return longest
        at, taken, _ = self._items[0]
        until = CHECK_EVERY if taken is not None else at + self.delay - time.monotonic()
        return max(min(until, longest), 0.001)

    def __len__(self) -> int:
        return len(self._items)
