"""Run boundaries across scaled workers (see docs/links.md, "Runs across workers").

The sender that fans a run out to N workers gives every worker the run's ``Start``
and ``Stop``, and writes into the ``Stop`` the list ``w`` of the workers that saw the
run. Each worker forwards its ``Start``, its share of the events, and its ``Stop``
carrying ``n``, the number of events it forwarded. The stage where the workers fan
back in (``RunMerger`` with ``fan_in=True``) therefore knows exactly which Stops to
wait for: it emits one Start, every event, then one Stop once every worker in ``w``
has sent its Stop (or is dead), and holds any later run's messages until then, so runs
never interleave downstream. Held messages keep their credit, so holding is bounded.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arroyo.message import LOST, SHARES, Event, Message, Start, Stop, add_up_shares
from arroyo.runtime.stats import JOINED_MID_RUN, RunReport

log = logging.getLogger("arroyo.merge")

# How long a stage with a single upstream process waits, once that process is found
# dead mid-run, for its restart to take the run up (supervisord restarts it in about a
# second) before it closes the run without it.
RESTART_GRACE = 10.0

# Stop.routing keys, events a run lost by reason (a count, or -1 when nobody knows how
# many); any makes a run incomplete at every stage after the loss. LOSSES: lost before
# the stage in front, reported by the stage that saw them go; every worker of a scaled
# stage carries the same copy, so where they meet the copies are one figure. FAILED:
# the sender's own share (events its process() failed on), added up where shares meet.
LOSSES = LOST  # (a listener sets it for its outside source: arroyo.message)
FAILED = "f"
# Start.routing key: a Start sent again to a receiver that joined mid-run (it restarted,
# or was added by scale); a stage whose run began so cannot count what it missed.
AGAIN = "again"


def add_up_losses(stops: Any) -> dict[str, int]:
    """What the ``stops`` say their run lost, by reason: the copies of the losses before
    them once, their own failures added up (an unknown count stays -1)."""
    total: dict[str, int] = {}
    for stop in stops:
        for key, add in ((LOSSES, max), (FAILED, int.__add__)):
            for reason, n in (stop.routing.get(key) or {}).items():
                if isinstance(reason, str) and isinstance(n, int) and reason in total:
                    known = total[reason]
                    total[reason] = -1 if n < 0 or known < 0 else add(known, n)
                elif isinstance(reason, str) and isinstance(n, int):
                    total[reason] = n
    return total


def partial_stop(start: Start, cut: str = "") -> Stop:
    """The Stop a worker sends for its share of a run it leaves before the run's end;
    ``cut`` says why it left part of its share behind (``drain timeout``), if it did."""
    stop = Stop(data={"interrupted": True}, run=start.run, seq=0)
    stop.routing = {**start.routing, "partial": True}
    if cut:
        stop.routing["cut"] = cut
    return stop


def _restarted(origin: str, other: str) -> bool:
    """Is ``other`` another process of the same stage worker on the same host as
    ``origin``? (identities are ``stage/worker/pid@host``, see ``link.identity``)"""
    a, _, host_a = origin.rpartition("@")
    b, _, host_b = other.rpartition("@")
    return host_a == host_b and a != b and a.rsplit("/", 1)[0] == b.rsplit("/", 1)[0]


# (sender, size, message or None): None means "consumed, nothing to dispatch".
Item = tuple[str, int, Message | None]
RunKey = tuple[str, int]
_UNSET: Any = object()


@dataclass
class _Run:
    started: bool = False
    stops: dict[str, Stop] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)
    # Every worker that forwarded this run's Start: its share must end (Stop, partial
    # Stop or death) before the run closes, even if the Stop's ``w`` does not name it
    # (an upstream that restarted mid-run only knows the workers it served since).
    senders: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    events: int = 0
    expected_events: int = 0
    held: list[tuple[str, int, Message]] = field(default_factory=list)
    origin_dead: bool = False
    origin_fate: str = "died"  # or "stopped": it exited cleanly, its Stop went missing
    cut: str = ""  # why this stage closed the run as it stood ("stage stopped", "drain timeout")
    joined_late: bool = False  # its first Start here was one sent again (see AGAIN)
    prev: Any = _UNSET  # the run id its source emitted before it (None: the first)


class RunMerger:
    """Orders one input link's messages into whole runs.

    ``fan_in``: this stage receives whole runs (it is not one of a scaled stage's
    workers), so it rebuilds each run from its senders' shares, holds later runs until
    the current one ends, and reports every run's completeness. ``named``: the upstream
    stage is scalable, so a Stop's ``w`` names the workers that carry the run; from a
    single upstream process, the senders that forwarded the Start are the ones to wait
    for. A worker of a scaled stage (``fan_in`` False) passes its share through."""

    def __init__(
        self,
        link_name: str,
        fan_in: bool,
        alive: Callable[[str], bool],
        on_report: Callable[[RunReport], None],
        upstream_done: Callable[[], bool] = lambda: False,
        stopped: Callable[[str], bool] = lambda _: False,
        on_late: Callable[[], None] = lambda: None,
        named: bool = True,
        pub: bool = False,
    ) -> None:
        self.link_name = link_name
        self.named = named
        # what a shortfall on this link is, in the reports downstream
        self.hop_loss = f"dropped on PUB link {link_name}" if pub else f"lost on link {link_name}"
        self.on_late = on_late
        self.upstream_done = upstream_done
        self.stopped = stopped  # this process identity exited cleanly (not alive)
        self.fan_in = fan_in
        self.alive = alive
        self.on_report = on_report
        self.runs: dict[RunKey, _Run] = {}
        self.current: RunKey | None = None
        self.sender_origin: dict[str, str] = {}
        self.open_runs: dict[RunKey, Start] = {}  # non-fan-in: runs begun, not ended
        self.closed: deque[RunKey] = deque(maxlen=1000)
        self._closed_keys: set[RunKey] = set()  # the same, to look up per message
        self._late_from: set[str] = set()
        self._last_check = time.monotonic()
        self._dead_since: dict[str, float] = {}  # single upstream: when it was found dead

    # -- entry point ---------------------------------------------------------------

    def push(self, sender: str, message: Message, size: int) -> list[Item]:
        if not self.fan_in:
            return self._pass(sender, message, size)
        who = message.routing.get("s") or sender
        adopted: list[Item] = []
        if isinstance(message, Start | Stop):
            origin = str(message.routing.get("o", "")) or self._known_origin(who, message.run)
            self.sender_origin[who] = origin
            adopted = self._adopt(origin, message.run)
            if isinstance(message, Start):
                self._shares_over(who, origin, message.run)
        elif message.run == 0:
            return [(sender, size, message)]  # events outside any run pass straight on
        elif who in self.sender_origin:
            origin = self.sender_origin[who]
        else:
            # Events from a sender whose Start we have not seen (we restarted, or its
            # queue outlived our predecessor): file them with the run of that number.
            origin = next((o for o, r in self.runs if r == message.run), "")
        key = (origin, message.run)
        if key not in self.runs and key in self._closed_keys:
            return adopted + self._late(who, size, key)
        run = self.runs.get(key)
        if run is None:  # (not setdefault: it would build a _Run for every message)
            run = self.runs[key] = _Run()
        if isinstance(message, Start) and not run.started and run.prev is _UNSET:
            run.prev = message.routing.get("p")
        if key == self.current:
            applied = self._apply(run, who, size, message)
            if isinstance(message, Event):
                return adopted + applied  # an event never ends a run: nothing to advance
            return adopted + applied + self._advance()
        run.held.append((who, size, message))
        if isinstance(message, Stop):
            self._note_stop(run, who, message)
        return adopted + self._advance()

    def _shares_over(self, who: str, origin: str, run_id: int) -> None:
        """A sender that begins a run has ended every earlier run of the same source
        (it forwards in order): a Stop it still owes one of them was lost in front of
        it (the stage there restarted after taking it). Its share counts as lost."""
        for (o, r), run in self.runs.items():
            owes = who in run.expected | run.senders and who not in run.stops
            if o == origin and r < run_id and owes:
                run.dead.add(who)

    def _known_origin(self, who: str, run_id: int) -> str:
        """A boundary without an origin (a peer that does not set ``o``) from a sender
        already in a run of that id belongs to that run, not to a run of its own."""
        origin = self.sender_origin.get(who, "")
        return origin if (origin, run_id) in self.runs else ""

    def _late(self, who: str, size: int, key: RunKey) -> list[Item]:
        """A share of a run already closed: a worker counted dead that comes back (its
        host was cut off and healed) still delivers the run it held. The run went
        downstream without it; re-opening it would send a second Start and Stop. Drop
        it (counted as ``late`` on the link), returning its credit."""
        self.on_late()
        if who not in self._late_from and len(self._late_from) < 1024:
            self._late_from.add(who)
            log.warning(
                "link %s: %s delivered part of run %d of %s after the run was closed "
                "without it; dropped (counted as late)",
                self.link_name,
                who,
                key[1],
                key[0] or "?",
            )
        return [(who, size, None)]

    def _adopt(self, origin: str, run_id: int) -> list[Item]:
        """Merge a run filed without its origin into the run the origin now names."""
        orphan = ("", run_id)
        if not origin or orphan not in self.runs:
            return []
        key = (origin, run_id)
        if key not in self.runs:
            # re-key in place, keeping the run's position in the queue
            self.runs = {(key if k == orphan else k): v for k, v in self.runs.items()}
            if self.current == orphan:
                self.current = key
            return []
        run = self.runs.pop(orphan)
        target = self.runs[key]
        target.events += run.events
        target.started |= run.started
        target.senders |= run.senders
        if self.current == key:
            # what was held under the orphan key is the current run's: dispatch it now
            # (held, it would never be dispatched nor credited, and the link would stall)
            return [item for who, size, m in run.held for item in self._apply(target, who, size, m)]
        target.held.extend(run.held)
        if self.current == orphan:
            self.current = key
            return self._replay(key)
        return []

    def _pass(self, sender: str, message: Message, size: int) -> list[Item]:
        key = (str(message.routing.get("o", "")), message.run)
        ended: list[Item] = []
        if isinstance(message, Start):
            if key in self.open_runs:
                return [(sender, size, None)]  # a re-sent Start (the sender reconnected)
            ended = self._end_earlier_runs(key)
            self.open_runs[key] = message
        elif isinstance(message, Stop):
            self.open_runs.pop(key, None)
            if SHARES in message.data:  # one upstream worker: its shares are the totals
                message.data = add_up_shares(message.data, [message])
        return [*ended, (sender, size, message)]

    def _end_earlier_runs(self, key: RunKey) -> list[Item]:
        """A Start of another run from the same origin (or from the origin's restarted
        process) while one is still open: the upstream moved on without sending us that
        run's Stop (it restarted, before or after broadcasting it). Our share ends here."""
        earlier = [
            k for k in self.open_runs if k != key and (k[0] == key[0] or _restarted(key[0], k[0]))
        ]
        for k in earlier:
            log.warning(
                "link %s: run %d of %s got no Stop before run %d began; ending our share",
                self.link_name,
                k[1],
                k[0] or "?",
                key[1],
            )
        return [("", 0, partial_stop(self.open_runs.pop(k))) for k in earlier]

    # -- fan-in --------------------------------------------------------------------

    def _note_stop(self, run: _Run, who: str, stop: Stop) -> None:
        if who in run.stops:
            return
        run.stops[who] = stop
        run.expected_events += int(stop.routing.get("n", 0))
        if stop.routing.get("partial"):
            # A worker that left mid-run: its share is done, but the run is not.
            return
        named = stop.routing.get("w") if self.named else None
        run.expected |= set(named or [who])

    def _apply(self, run: _Run, who: str, size: int, message: Message) -> list[Item]:
        if isinstance(message, Start):
            run.senders.add(who)
            if run.started:
                return [(who, size, None)]
            run.started = True
            # (a Start's age cannot tell: a stage that connects late, at `up`, is given
            # the run's Start as it was made, not again)
            if message.routing.get(AGAIN):
                run.joined_late = True
                message.routing = {k: v for k, v in message.routing.items() if k != AGAIN}
            return [(who, size, message)]
        if isinstance(message, Event):
            run.events += 1
            return [(who, size, message)]
        assert isinstance(message, Stop)
        self._note_stop(run, who, message)
        return [(who, size, None)]

    def _done(self, run: _Run) -> bool:
        if run.origin_dead or run.cut:
            return True
        if not run.expected:
            # Only partial Stops so far. If every worker that forwarded the Start has
            # ended its share so, the run's own Stop was lost in front of them (the
            # stage there restarted after taking it): nothing more will come.
            return bool(run.senders) and run.senders <= set(run.stops) | run.dead
        return run.expected | run.senders <= set(run.stops) | run.dead

    def _eligible(self, key: RunKey, run: _Run) -> bool:
        """A run may be emitted once the run before it (same source) has been: workers
        that joined late can deliver run k+1 before anyone delivers run k."""
        prev = run.prev
        if prev is _UNSET or prev is None or (key[0], prev) in self.closed:
            return True
        if any(run_id == prev for _, run_id in self.closed):
            return True  # its source restarted: the run before came from its predecessor
        return (key[0], prev) not in self.runs and self._done(run)

    def _pick(self) -> RunKey | None:
        for key, run in self.runs.items():
            if self._eligible(key, run):
                return key
        return None

    def _replay(self, key: RunKey) -> list[Item]:
        run = self.runs[key]
        held, run.held = run.held, []
        stops, run.stops = run.stops, {}
        run.expected, run.expected_events = set(), 0
        out: list[Item] = []
        for who, size, message in held:
            out.extend(self._apply(run, who, size, message))
        for who, stop in stops.items():
            self._note_stop(run, who, stop)
        return out

    def _advance(self) -> list[Item]:
        """Pick the next run when none is current; close the current one when done."""
        out: list[Item] = []
        while True:
            if self.current is None:
                self.current = self._pick()
                if self.current is None:
                    return out
                out.extend(self._replay(self.current))
            if not self._done(self.runs[self.current]):
                return out
            out.extend(self._close(self.current))
            if len(self.closed) == self.closed.maxlen:
                self._closed_keys.discard(self.closed[0])
            self.closed.append(self.current)
            self._closed_keys.add(self.current)
            self.current = None

    def _close(self, key: RunKey) -> list[Item]:
        run = self.runs.pop(key)
        stops = [s for s in run.stops.values() if not s.routing.get("partial")]
        last = stops[-1] if stops else next(iter(run.stops.values()), None)
        missing = sorted((run.expected | run.senders) - set(run.stops))
        report = RunReport(
            origin=key[0],
            run=key[1],
            emitted=stops[-1].seq if stops else run.events,  # (a partial Stop's seq is 0)
            received=run.events,
            expected=run.expected_events,
            missing_workers=missing,
            losses=add_up_losses(run.stops.values()),
            emitted_known=bool(stops),  # without a Stop, what the source emitted is unknown
            # no Start here at all: this process came after it (its senders had
            # already moved past it), so it cannot count the run either
            joined_late=run.joined_late or not run.started,
        )
        if run.cut:
            # it is this stage that stopped waiting: say so, and blame no one's death
            owing = missing or ([] if run.stops else ["source"])
            report.missing_workers = [f"{who} (stopped waiting: {run.cut})" for who in owing]
        elif run.origin_dead and not run.stops:
            report.missing_workers = [f"source ({run.origin_fate})"]
        # a worker that left at its drain timeout left part of its share unsent
        cut = [
            f"{w} (left at {s.routing['cut']})"
            for w, s in run.stops.items()
            if s.routing.get("cut")
        ]
        if run.stops and not stops and not (cut or run.cut or run.origin_dead):
            cut.append("upstream (every share ended early, no Stop)")
        report.missing_workers += cut
        self.on_report(report)
        stops_seen = list(run.stops.values())
        data = add_up_shares(dict(last.data), stops_seen) if last else {"interrupted": True}
        routing: dict[str, Any] = {"o": key[0], "n": run.events}
        if not report.complete:
            data["incomplete"] = True
            routing[LOSSES] = self._losses_on(report)
        else:
            # (a stage before that joined the run mid-way marked it so; every event
            # the source emitted arrived all the same)
            data.pop("incomplete", None)
        stop = Stop(data=data, run=key[1], seq=report.emitted, routing=routing)
        return [("", 0, stop)]

    def _losses_on(self, report: RunReport) -> dict[str, int]:
        """What the Stop of an incomplete run tells the stages after this one: the
        losses before this stage, and this link's own (-1: a count nobody knows)."""
        losses = dict(report.losses)
        # (where a process died, the source's count is the reference: it already
        # covers what was lost before this link)
        here = report.hop_missing - (report.upstream_lost if report.by_source_count else 0)
        if here > 0:
            # a stage that joined mid-run did not see the events before it joined
            if report.joined_late:
                losses[f"{self.hop_loss} {JOINED_MID_RUN}"] = -1
            else:
                losses[self.hop_loss] = here
        if not report.emitted_known:
            losses["lost with the source, which died before its Stop (count unknown)"] = -1
        for who in report.missing_workers:
            if "(" in who and report.hop_missing == 0:
                # a share cut short at a timeout: how much it held back is not known here
                losses[f"{self.hop_loss}: {who}"] = -1
        return losses or {self.hop_loss: -1}

    def check_dead(self) -> list[Item]:
        """Give up on workers (and sources) that died holding the current run open."""
        now = time.monotonic()
        if now - self._last_check < 0.5:
            return []
        self._last_check = now
        if self.current is None:
            self.current = self._pick() or next(iter(self.runs), None)
            if self.current is None:
                return []
            out = self._replay(self.current)
            return out + self._advance()
        key = self.current
        run = self.runs[key]
        owing = (run.expected | run.senders) - set(run.stops)
        run.dead |= {w for w in owing if not self.alive(w) and self._let_go(w, key, run)}
        if key[0] and not run.expected and not self.alive(key[0]) and self._orphaned(key):
            run.origin_dead = True
            run.origin_fate = "stopped" if self.stopped(key[0]) else "died"
            log.warning(
                "link %s: source %s of run %d %s without its Stop arriving; closing the run",
                self.link_name,
                key[0],
                key[1],
                run.origin_fate,
            )
        return self._advance()

    def _let_go(self, who: str, key: RunKey, run: _Run) -> bool:
        """May this run stop waiting for ``who``, found dead? Among a scaled stage's
        workers, at once: the others carry the stream. From a single upstream process
        that is not the source, once its restarted process has taken the run up (it is
        sent the run's Start again when it joins), or after ``RESTART_GRACE``: closing at
        once would drop the rest of the run as late. (A stage that stops closes its
        open runs as they stand anyway.)"""
        if self.named or who == key[0]:
            return True
        if any(_restarted(who, other) for other in run.senders):
            return True
        since = self._dead_since.setdefault(who, time.monotonic())
        if time.monotonic() - since <= RESTART_GRACE:
            return False
        del self._dead_since[who]
        return True

    def _orphaned(self, key: RunKey) -> bool:
        """A run whose source is gone gets no Stop only if the source died: a source
        that exited cleanly may have its Stop still on the way. It died if its restart
        already began a run: one whose Start names this run as ``p``, or any run from
        a later process of the same stage worker (its ``p`` comes from the run id the
        source last managed to record, which a full disk can leave behind). Or if
        nothing more can arrive on this link."""
        successor = any(
            r.prev == key[1] or _restarted(key[0], k[0]) for k, r in self.runs.items() if k != key
        )
        return successor or self.upstream_done()

    def flush(self, cause: str = "stage stopped") -> list[Item]:
        """At shutdown: close every open run as it stands; ``cause`` (``stage stopped``,
        ``drain timeout``) is why, for the reports."""
        out: list[Item] = []
        while self.runs:
            if self.current is None:
                self.current = next(iter(self.runs))
                out.extend(self._replay(self.current))
            self.runs[self.current].cut = cause
            out.extend(self._advance())
        return out
