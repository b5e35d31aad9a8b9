"""The operators and publisher a stage process wraps around the user's object: the
sending end of a link as a Publisher, the user's operator counted and isolated, and
the stamping of runs at a source."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any

from arroyo.errors import ConfigError
from arroyo.message import LOST, Event, Message, Start, Stop
from arroyo.runtime.boundaries import keep_run
from arroyo.runtime.credit import CreditSender
from arroyo.runtime.live import Live
from arroyo.runtime.merge import FAILED, partial_stop
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
    """Wraps the user's operator: stamps runs at sources, counts, isolates errors.

    Below a source (``keep_runs``) the results go through ``keep_run``: an operator
    can rebuild the boundaries it is given, never begin or end a run of its own."""

    def __init__(
        self,
        inner: Operator,
        counters: StageCounters,
        on_error: str,
        keep_runs: bool = True,
        user_inner: bool = False,
    ) -> None:
        self.inner = inner
        self.counters = counters
        self.on_error = on_error
        self.keep_runs = keep_runs
        self.user_inner = user_inner  # ``inner`` is the user's class
        # True while the user's process() or publish() runs (a stop deadline may
        # interrupt those, never the runtime's own sends: see ``drain.Deadline``)
        self.in_user = False
        self._targets: list[tuple[Publisher, bool]] = []  # (publisher, is the user's)
        self.out_events: dict[int, int] = defaultdict(int)
        self.open_out: dict[int, Start] = {}  # runs whose Start went out and Stop not yet
        self.timed = stats_enabled()
        self._tick = 0
        # Live options (``arroyo set``): the process sets both when the class has any.
        self.live: Live | None = None
        self.live_target: Any = None
        self._warned: dict[str, int] = {}  # reason -> the last run it was logged for
        self.failed: dict[int, int] = defaultdict(int)  # run -> events process() failed on
        # run -> reason -> events of it dropped on arrival here (a message that did not
        # decode): at a worker nobody else can count them, so its Stop says so
        self.dropped_in: dict[int, Counter[str]] = defaultdict(Counter)
        self._logged: set[tuple[str, str, str, int]] = set()  # errors with a traceback out

    def add_publisher(self, publisher: Publisher) -> None:
        super().add_publisher(publisher)
        self._targets.append((publisher, not isinstance(publisher, LinkPublisher)))

    def remove_publisher(self, publisher: Publisher) -> None:
        super().remove_publisher(publisher)
        self._targets = [t for t in self._targets if t[0] is not publisher]

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
        failed = False
        self.in_user = self.user_inner
        try:
            outputs = outputs_of(self.inner.process(message), message)
        except Exception as e:
            self.in_user = False
            if isinstance(message, Event):
                self.failed[message.run] += 1  # not a deliberate drop: the run is not whole
            self._failed("process", "operator_error", message, e)
            outputs, failed = [], True  # a boundary still goes out (below)
        self.in_user = False
        if timed and not failed:
            self.counters.process_ns.append(time.perf_counter_ns() - t0)
        if self.keep_runs:
            outputs = self._vet(message, outputs, warn_restored=not failed)
        for out in outputs:
            if isinstance(out, Start):
                self.counters.current_run = out.run
                self.counters.mark_run_start()
            self._account(out)
            for publisher, user in self._targets:
                self.in_user = user
                try:
                    publisher.publish(out)
                except Exception as e:
                    self.in_user = False
                    self._failed("publish", "publish_error", out, e)
            self.in_user = False
        return outputs

    def _vet(self, message: Message, outputs: list[Message], warn_restored: bool) -> list[Message]:
        """The outputs that keep the run whole; counts and logs what is refused. A run's
        Start and Stop always go on, even when ``process()`` failed on them: a worker
        whose share never ends would hold the fan-in downstream (and its credit) for
        ever."""
        vetted = keep_run(message, outputs)
        for reason, out in vetted.refused:
            self.counters.errors += 1
            self.counters.drops[reason] += 1
            self._warn_once(
                reason,
                message.run,
                "refused a %s that process() returned for %s run %d seq %d: an operator "
                "cannot begin or end a run, nor move an event to another (docs/stages.md); "
                "counted as %s, further ones in this run silently",
                type(out).__name__,
                type(message).__name__,
                message.run,
                message.seq,
                reason,
            )
        if vetted.restored and warn_restored:
            self._warn_once(
                "restored",
                message.run,
                "process() returned no %s for run %d: forwarding the one it was given "
                "(a run's boundaries cannot be dropped)",
                type(message).__name__,
                message.run,
            )
        return vetted.outputs

    def _warn_once(self, reason: str, run: int, text: str, *args: Any) -> None:
        """One warning per reason and run: a refusal repeats on every run it happens."""
        if self._warned.get(reason) != run:
            self._warned[reason] = run
            log.warning(text, *args)

    def _failed(self, call: str, reason: str, message: Message, error: Exception) -> None:
        """Count a user-code exception, and log it with its traceback the first time
        this error happens in a run (an operator that fails on every frame would write
        thousands); fatal only with ``on_error = stop``."""
        self.counters.errors += 1
        self.counters.drops[reason] += 1
        key = (call, type(error).__name__, str(error)[:200], message.run)
        if key not in self._logged:
            if len(self._logged) >= 1000:
                self._logged.clear()  # a bound; an error seen again is logged again
            self._logged.add(key)
            log.exception(
                "%s() failed on %s run %d seq %d: %s (the same error again in this run "
                "is counted, not logged)",
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
            self.counters.sent += 1
        elif isinstance(out, Stop):
            out.routing = {**out.routing, "n": self.out_events.pop(out.run, 0)}
            self.open_out.pop(out.run, None)
            self._add_failures(out)
        elif isinstance(out, Start):
            self.open_out[out.run] = out

    def dropped_on_arrival(self, run: int, link: str) -> None:
        """An event of ``run`` that arrived on ``link`` but did not decode: lost here."""
        self.dropped_in[run][f"dropped as undecodable on {link} at {self.counters.stage}"] += 1

    def _add_failures(self, stop: Stop) -> None:
        """Write into the Stop the events of its run that ``process()`` failed on here,
        or that arrived here and did not decode, so every stage downstream reports the
        run incomplete, and say it once."""
        failed = self.failed.pop(stop.run, 0)
        dropped = self.dropped_in.pop(stop.run, None)
        if not failed and not dropped:
            return
        own = dict(stop.routing.get(FAILED) or {})
        for reason, n in (dropped or {}).items():
            own[reason] = own.get(reason, 0) + n
        if failed:
            reason = f"failed in process() at {self.counters.stage}"
            own[reason] = own.get(reason, 0) + failed
            log.warning(
                "run %d: process() failed on %d event(s), the run is incomplete", stop.run, failed
            )
        stop.routing = {**stop.routing, FAILED: own}

    def end_open_runs(self, cut: str) -> None:
        """End this worker's share of every run it began forwarding, without calling
        user code (it is stuck): a partial Stop marked ``cut`` to the link ends."""
        for start in list(self.open_out.values()):
            stop = partial_stop(start, cut)
            self._account(stop)
            for publisher, user in self._targets:
                if not user:
                    publisher.publish(stop)


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
            # what the listener's outside source lost in the run (a detector's gaps)
            lost = message.routing.get(LOST)
            message.routing = {"o": self.me, LOST: lost} if lost else {"o": self.me}
            self.open = None
        return message

    def close_open(self, data: dict[str, Any]) -> Stop | None:
        if self.open is None:
            return None
        stop = Stop(data=data)
        self.open = None
        stop.run, stop.seq, stop.routing = self.run, self.events, {"o": self.me}
        return stop
