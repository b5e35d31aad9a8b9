"""Has the next stage taken what a listener delivered? (for broker ends' acknowledgements)

A broker listener acknowledges a message once it is safe in Arroyo's hands. ``deliver``
returning is not enough: the message may still sit in the listener's ZeroMQ queue, and
a SIGKILL then loses it after the broker was told it was done with it. On a PUSH-pattern
link the receiver returns credit for every message it has consumed (handled and passed
on), in order, so a message is taken once its receiver has returned credit for as many
messages as it had been sent up to it. ``HandOff.check()`` snapshots, for each receiver
of each output link, how many messages it has been sent, and gives a function that says
whether every one of them has since been credited back.

A receiver that is gone (let go by the sender: it died, or answers no heartbeat) counts
as having taken what it was sent: what it held is the loss its stage's successors count
and report (docs/links.md), as for any worker that dies. A PUB link returns no credit:
with one among the outputs there is nothing to check (``check()`` returns None), and the
broker ends fall back to waiting ``ack_delay_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from arroyo.runtime.credit import CreditSender

REFRESH = 0.001  # s: how often a check reads the links' incoming credit at most


class HandOff:
    """Checks of what the receivers of ``senders`` have taken; main thread only (the
    thread that sends on the links)."""

    def __init__(self, senders: Sequence[object]) -> None:
        self.senders = [s for s in senders if isinstance(s, CreditSender)]
        self.checkable = len(self.senders) == len(senders)
        self._read_at = 0.0

    def check(self) -> Callable[[], bool] | None:
        """A function that turns True once every receiver has taken every message it
        was sent so far; None when a link cannot tell (PUB)."""
        if not self.checkable:
            return None
        owed = [
            (sender, key, peer.sent_msgs)
            for sender in self.senders
            for key, peer in sender.peers.items()
            if peer.taken_msgs < peer.sent_msgs
        ]
        if not owed:
            return _taken
        return lambda: self._taken(owed)

    def _taken(self, owed: list[tuple[CreditSender, str, int]]) -> bool:
        now = time.monotonic()
        if now - self._read_at >= REFRESH:
            self._read_at = now
            for sender in self.senders:
                sender.service()  # (reads the CREDIT that came back meanwhile)
        for sender, key, sent in owed:
            peer = sender.peers.get(key)
            if peer is not None and peer.taken_msgs < sent:
                return False
        return True


def _taken() -> bool:
    return True
