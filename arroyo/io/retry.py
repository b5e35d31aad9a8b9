"""What every end facing an outside system needs when that system fails: reconnect
with backoff and readable logs, and a drop count by reason that does not flood."""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("arroyo.io")

BACKOFF_FIRST = 0.1  # seconds before the first retry; doubles up to BACKOFF_CAP
BACKOFF_CAP = 5.0
STILL_DOWN_EVERY = 30.0  # seconds between "still unreachable" warnings


class Backoff:
    """Delays between reconnect attempts (0.1 s doubling to 5 s), and the log lines."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay = BACKOFF_FIRST
        self.down_since: float | None = None
        self.attempts = 0
        self.warned_at = 0.0

    def failed(self, error: Exception) -> float:
        """Note a failure; return how long to wait before the next attempt."""
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = self.warned_at = now
            self.delay = BACKOFF_FIRST
            log.warning("%s: %s; retrying with backoff", self.what, describe_error(error))
        elif now - self.warned_at >= STILL_DOWN_EVERY:
            self.warned_at = now
            log.warning(
                "%s: still failing after %.0f s (%d attempts): %s",
                self.what,
                now - self.down_since,
                self.attempts,
                describe_error(error),
            )
        else:
            self.delay = min(self.delay * 2, BACKOFF_CAP)
        self.attempts += 1
        return self.delay

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning(
                "%s: connected again after %.1f s", self.what, time.monotonic() - self.down_since
            )
        self.down_since = None
        self.attempts = 0
        self.delay = BACKOFF_FIRST


def worth_logging(before: int, after: int) -> bool:
    """Log the first of a kind, then one line per 1000 (a flood stays readable)."""
    return before == 0 or before // 1000 != after // 1000


class DropCount:
    """What one end facing the outside world dropped: in all, and by reason for ``drops()``.

    Logs the first drop of each reason, then one line per 1000 of that reason, so a
    flood of one kind neither fills the log nor hides the first of another kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.total = 0
        self.by_reason: Counter[str] = Counter()

    def add(self, n: int, reason: str, why: str) -> None:
        before = self.by_reason[reason]
        self.total += n
        self.by_reason[reason] += n
        if worth_logging(before, before + n):
            log.warning(
                "%s: dropped %d (%s): %s (%d %s so far, %d in all)",
                self.name,
                n,
                reason,
                why,
                before + n,
                reason,
                self.total,
            )


def describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def quiet(library: str) -> None:
    """Silence a client library's own logger (``pika``, ``nats``) unless the user set
    its level: it logs each failed connection, which our backoff reports already, in
    one line and at most every ``STILL_DOWN_EVERY`` seconds."""
    logger = logging.getLogger(library)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)
