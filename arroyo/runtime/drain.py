"""What a stopping stage leaves behind when it gives up draining (``drain_timeout``).

A stage that was asked to stop drains its input for at most ``drain_timeout``
seconds. What it then leaves is counted on the input link under ``drain_timeout``:

* the messages still queued in its input sockets, read without blocking and not
  processed (``count_backlog``): the sender's credit window, which holds them, is
  never returned, so they are also all that can be queued there;
* when the user's ``process()`` or ``publish()`` is still running a second after the
  deadline (a hung sink, a blocking call that ignores the stop), the main thread is
  interrupted there (``Deadline``: SIGALRM raises ``StuckAtStop``, only while user
  code runs, never inside the runtime's own sends), and the message it was on, the
  rest of its batch, the messages a fan-in held and the queued ones are counted.
  Without that, supervisord's SIGKILL at ``stopwaitsecs`` would take them uncounted.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from arroyo import wire
from arroyo.errors import WireError
from arroyo.message import Event
from arroyo.runtime.merge import Item, RunMerger
from arroyo.runtime.stats import LinkCounters

log = logging.getLogger("arroyo.stage")

DRAIN_TIMEOUT = "drain_timeout"
STUCK_MARGIN = 1.0  # s after the deadline: the stage's own give-up comes first
BACKLOG_READ_LIMIT = 1.0  # s: a publisher that never stops cannot keep us reading


class StuckAtStop(BaseException):
    """User code still ran past ``drain_timeout`` after a stop request. A
    BaseException, so that a user's ``except Exception`` does not swallow it."""


class Input(Protocol):
    counters: LinkCounters

    def receive(self) -> list[tuple[str, list[Any]]]: ...


class Deadline:
    """Interrupts user code that is still running ``STUCK_MARGIN`` after a stopping
    stage's ``drain_timeout``. ``in_user_code()`` is asked from the signal handler,
    in the main thread, between two bytecodes."""

    def __init__(self, in_user_code: Callable[[], bool]) -> None:
        self.in_user_code = in_user_code
        self.fired = False

    def install(self) -> Callable[[], None]:
        """Called in the main thread; returns what undoes it."""
        previous = signal.signal(signal.SIGALRM, self._on_alarm)

        def undo() -> None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

        return undo

    def arm(self, drain_timeout: float) -> None:
        """May be called from any thread (the signal watcher)."""
        signal.setitimer(signal.ITIMER_REAL, drain_timeout + STUCK_MARGIN)

    def _on_alarm(self, *_: Any) -> None:
        if self.in_user_code():
            self.fired = True
            msg = "user code still running at drain timeout"
            raise StuckAtStop(msg)


def count_left(counters: LinkCounters, batch: Iterable[list[Any]]) -> int:
    """Count messages read but never processed: received, and dropped as
    ``drain_timeout`` (or under their wire reason if they are malformed)."""
    n = 0
    for frames in batch:
        size = wire.frames_nbytes(frames)
        try:
            message = wire.decode(frames)
        except WireError as e:
            counters.drop(e.reason)
            continue
        counters.count(size, isinstance(message, Event))
        counters.drop(DRAIN_TIMEOUT)
        n += 1
    return n


def count_backlog(end: Input) -> int:
    """Read what is still queued on ``end`` without processing it, and count it."""
    n = 0
    deadline = time.monotonic() + BACKLOG_READ_LIMIT
    while time.monotonic() < deadline and (items := end.receive()):
        n += count_left(end.counters, (frames for _, frames in items))
    return n


def received(items: list[Item]) -> int:
    """How many of a merger's ``items`` are input messages (not a merged Stop, not a
    consumed duplicate)."""
    return sum(1 for sender, _, msg in items if sender and msg is not None)


def count_unread(inputs: Sequence[tuple[Input, RunMerger]], drain_timeout: float) -> int:
    """At drain timeout: count what is still queued on every input, unprocessed."""
    unread = sum(count_backlog(end) for end, _ in inputs)
    log.warning(
        "drain timeout (%.0fs): leaving with %d messages unread, counted as %s",
        drain_timeout,
        unread,
        DRAIN_TIMEOUT,
    )
    return unread


def leave_stuck(inputs: Sequence[tuple[Input, RunMerger]], drain_timeout: float, role: str) -> None:
    """The user's process() or publish() was still running past the stop deadline:
    close the runs the fan-ins hold without handing anything to user code again, and
    count what they held and what is queued (the message it was stuck on and the
    rest of its batch are counted where it was interrupted)."""
    batch = sum(end.counters.drops[DRAIN_TIMEOUT] for end, _ in inputs)
    held = unread = 0
    for end, merger in inputs:
        n = received(merger.flush("drain timeout"))
        end.counters.drop(DRAIN_TIMEOUT, n)
        held += n
        unread += count_backlog(end)
    log.warning(
        "drain timeout (%.0fs): %s() had not returned; left behind %d messages (%d in "
        "hand, %d held for later runs, %d unread), counted as %s",
        drain_timeout,
        "process" if role == "operator" else "publish",
        batch + held + unread,
        batch,
        held,
        unread,
        DRAIN_TIMEOUT,
    )
