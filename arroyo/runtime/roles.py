"""The operators and publisher a stage process wraps around the user's object: the
sending end of a link as a Publisher, the user's operator counted and isolated, and
the stamping of runs at a source."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from arroyo.errors import ConfigError
from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.credit import CreditSender
from arroyo.runtime.live import Live
from arroyo.runtime.pubsub import PubSender
from arroyo.runtime.stats import StageCounters
from arroyo.runtime.stats import enabled as stats_enabled
from arroyo.spec import StageSpec
from arroyo.stage import Operator, Publisher, outputs_of

log = logging.getLogger("arroyo.stage")


class StageFailed(Exception):
    """``on_error = stop`` and an operator raised: the process exits non-zero."""


def build_user_object(spec: StageSpec, live: dict[str, Any] | None = None) -> Any:
    """Instantiate the stage's class with its converted options, the ``live`` values
    stored by ``arroyo set`` overriding them (ConfigError on failure)."""
    try:
        cls = spec.load_class()
        return cls(**{**spec.options, **(live or {})})
    except Exception as e:
        msg = f"stage {spec.name}: cannot create {spec.class_path}: {type(e).__name__}: {e}"
        raise ConfigError(msg) from e


class LinkPublisher(Publisher):
    """The Publisher that is the sending end of an internal link."""

    def __init__(self, end: CreditSender | PubSender, give_up: Any) -> None:
        self.end = end
        self.give_up = give_up

    def publish(self, message: Message) -> None:
        # A PUB end counts its own drops (pub_full); a credit end only fails to send
        # when a stopping stage gives up waiting for a receiver.
        if not self.end.send(message, self.give_up) and isinstance(self.end, CreditSender):
            self.end.counters.drop("undeliverable")


class StageOperator(Operator):
    """Wraps the user's operator: stamps runs at sources, counts, isolates errors."""

    def __init__(self, inner: Operator, counters: StageCounters, on_error: str) -> None:
        self.inner = inner
        self.counters = counters
        self.on_error = on_error
        self.out_events: dict[int, int] = defaultdict(int)
        self.timed = stats_enabled()
        self._tick = 0
        # Live options (``arroyo set``): the process sets both when the class has any.
        self.live: Live | None = None
        self.live_target: Any = None

    def process(self, message: Message) -> Any:
        return self.inner.process(message)

    def handle(self, message: Message) -> list[Message]:
        live = self.live
        if live is not None and live.pending is not None:  # between two messages
            live.apply_pending(self.live_target, message)
        # Time one message in eight: the mean and p99 stay representative, and two
        # clock reads per message are a measurable share of a 100-byte hop.
        self._tick = (self._tick + 1) & 7
        timed = self.timed and self._tick == 0
        t0 = time.perf_counter_ns() if timed else 0
        try:
            outputs = outputs_of(self.inner.process(message), message)
        except Exception as e:
            self._failed("process", "operator_error", message, e)
            return []
        if timed:
            self.counters.process_ns.append(time.perf_counter_ns() - t0)
        for out in outputs:
            if isinstance(out, Start):
                self.counters.current_run = out.run
            self._account(out)
            for publisher in self.publishers:
                try:
                    publisher.publish(out)
                except Exception as e:
                    self._failed("publish", "publish_error", out, e)
        return outputs

    def _failed(self, call: str, reason: str, message: Message, error: Exception) -> None:
        """Count and log a user-code exception; fatal only with ``on_error = stop``."""
        self.counters.errors += 1
        self.counters.drops[reason] += 1
        log.exception(
            "%s() failed on %s run %d seq %d: %s",
            call,
            type(message).__name__,
            message.run,
            message.seq,
            error,
        )
        if self.on_error == "stop":
            msg = f"on_error = stop: {type(error).__name__}: {error}"
            raise StageFailed(msg) from error

    def _account(self, out: Message) -> None:
        # Events carry no origin, so count by run id; a stage sees one run at a time.
        if isinstance(out, Event):
            self.out_events[out.run] += 1
        elif isinstance(out, Stop):
            out.routing = {**out.routing, "n": self.out_events.pop(out.run, 0)}


class SourceOperator(Operator):
    """At a listener stage: stamps run ids, sequence numbers and the run's origin."""

    def __init__(self, me: str, last_run: int = 0, on_start: Any = None) -> None:
        self.me = me
        self.next_run = last_run + 1
        self.on_start = on_start
        self.run: int = last_run  # a restarted source's first Start names it as "p"
        self.events = 0
        self.open: Start | None = None

    def process(self, message: Message) -> Message | list[Message]:
        if isinstance(message, Start) and self.open is not None:
            # A source that starts a run before ending the last one: end it for it.
            stop = self.close_open({"interrupted": True, "reason": "new Start before Stop"})
            return [m for m in (stop, self.process(message)) if isinstance(m, Message)]
        if isinstance(message, Start):
            if message.run == 0:
                message.run = self.next_run
            self.next_run = message.run + 1
            previous = self.run or None
            self.run, self.events = message.run, 0
            message.seq = 0
            # "p" lets a merge downstream put runs back in order.
            message.routing = {"o": self.me, "p": previous}
            if self.on_start is not None:
                self.on_start(message.run)
            self.open = message
        elif isinstance(message, Event):
            message.run = self.run if self.open is not None else 0
            message.seq = self.events
            self.events += 1
        elif isinstance(message, Stop):
            message.run, message.seq = self.run, self.events
            message.routing = {"o": self.me}
            self.open = None
        return message

    def close_open(self, data: dict[str, Any]) -> Stop | None:
        if self.open is None:
            return None
        stop = Stop(data=data)
        self.open = None
        stop.run, stop.seq, stop.routing = self.run, self.events, {"o": self.me}
        return stop
