"""Counters kept by every stage process.

Counting is a few integer additions on the hot path; a reader thread snapshots them
(see ``StageCounters.snapshot``), so the loop never waits for anyone to read them.

    source process                         downstream process
    LinkCounters(out) --frames--> link --> LinkCounters(in)
         \\                                       /
          +-- StageCounters.snapshot() -- stats channel -- arroyo status
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from arroyo.spec import Topology

log = logging.getLogger("arroyo.stage")


def enabled() -> bool:
    """Counters can be switched off (``ARROYO_STATS=0``) to measure what they cost."""
    return os.environ.get("ARROYO_STATS", "1") != "0"


@dataclass
class LinkCounters:
    """Messages and bytes through one link end, and drops by reason."""

    name: str
    direction: str  # "in" or "out"
    messages: int = 0  # every message, Start/Stop included
    events: int = 0
    bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    auth_refused: int = 0  # CURVE handshakes refused (stranger key, plain client, bad key)
    # peer identity -> epoch time since when this end has judged it dead (``LinkEnd.alive``)
    gone: dict[str, float] = field(default_factory=dict)

    GONE_KEPT = 64  # a bound against peers that come and go forever

    def count(self, size: int, event: bool = True) -> None:
        self.messages += 1
        self.events += event
        self.bytes += size

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] += n

    def gone_since(self, peer_id: str) -> None:
        if peer_id in self.gone:
            return
        if len(self.gone) >= self.GONE_KEPT:
            del self.gone[next(iter(self.gone))]
        self.gone[peer_id] = time.time()

    def back(self, peer_id: str) -> None:
        self.gone.pop(peer_id, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "link": self.name,
            "direction": self.direction,
            "messages": self.messages,
            "events": self.events,
            "bytes": self.bytes,
            "dropped": dict(self.drops),
            "auth_refused": self.auth_refused,
            "gone": dict(self.gone),  # (a copy in one step: the stage's thread adds to it)
        }


# The end of a loss reason a stage gives, uncounted (-1), when its process joined a run
# mid-way: it cannot tell what went to its predecessor from what was lost. The
# source's count covers it: where every event the source emitted arrived, nothing was.
JOINED_MID_RUN = "(its process joined mid-run: not counted)"


@dataclass
class RunReport:
    """Completeness of one run as seen by a stage that receives whole runs (after
    merging its upstream's workers, or from its single upstream process)."""

    origin: str
    run: int
    emitted: int  # events the source says it emitted (Stop.seq)
    received: int  # events this stage received for the run
    expected: int  # events the upstream processes say they forwarded
    missing_workers: list[str] = field(default_factory=list)
    # events lost before this stage, by reason, as the upstream Stops reported them
    # (``failed in process() at STAGE``, ``lost on LINK``...): any makes the run incomplete
    losses: dict[str, int] = field(default_factory=dict)
    emitted_known: bool = True  # False: the source died before its Stop said how many
    joined_late: bool = False  # this process began the run mid-way (it restarted)

    @property
    def by_source_count(self) -> bool:
        """Judge the run by what the source emitted: an upstream process died (its
        share is unknown), this process joined mid-run, or a stage before could not
        count its loss. Exact for chains that do not filter; covers the losses before."""
        unknown = any(n < 0 for n in self.losses.values())
        return bool(self.missing_workers or self.joined_late or unknown)

    @property
    def hop_missing(self) -> int:
        """Events lost on the way from the upstream processes to this stage."""
        reference = self.emitted if self.by_source_count else self.expected
        return max(0, reference - self.received)

    @property
    def missing(self) -> int:
        """Events missing from the run here: on the way here, and before (the losses
        the upstream Stops report, where the source's count did not already cover them)."""
        if self.by_source_count:
            return self.hop_missing
        return self.hop_missing + self.upstream_lost

    @property
    def upstream_lost(self) -> int:
        return sum(n for n in self.losses.values() if n > 0)

    @property
    def complete(self) -> bool:
        """Every event the source emitted arrived or was dropped on purpose."""
        uncounted = [why for why, n in self.losses.items() if n < 0]
        if any(n > 0 for n in self.losses.values()) or self.missing:
            return False
        if any(not why.endswith(JOINED_MID_RUN) for why in uncounted):
            return False
        if not self.missing_workers and not uncounted:
            return self.received == self.expected
        # An upstream process died without sending its Stop, or a stage before joined
        # the run mid-way: whole only if everything the source emitted arrived all the
        # same. A worker that left at a timeout, or a source gone without its Stop
        # ("source (died)"), is a loss in itself.
        plain = not any("(" in w for w in self.missing_workers)
        return plain and self.emitted_known and self.received >= self.emitted

    def of(self) -> int:
        """The number shown after the slash: what should have arrived, as well as known."""
        return self.emitted if self.by_source_count and self.emitted_known else self.expected

    def line(self) -> str:
        return run_line(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "origin": self.origin,
            "received": self.received,
            "expected": self.expected,
            "emitted": self.emitted,
            "emitted_known": self.emitted_known,
            "joined_late": self.joined_late,
            "of": self.of(),
            "complete": self.complete,
            "missing": self.missing,
            "missing_workers": self.missing_workers,
            "losses": {k: v for k, v in self.losses.items() if v},
        }


def run_line(run: Mapping[str, Any]) -> str:
    """``run 17: 1000/1000 events (complete)``, or what is missing and why, from a
    run report's snapshot (the stage log, ``arroyo status`` and the dashboard)."""
    state = "complete" if run["complete"] else "INCOMPLETE"
    of = run.get("of", run["expected"])
    known = run.get("emitted_known", True)
    text = f"run {run['run']}: {run['received']}/{of if known else '?'} events ({state}"
    if run.get("emitted", of) != of and known:
        text += f"; source emitted {run['emitted']}"
    if not known:
        text += "; how many the source emitted is unknown"
    elif run["missing"] and run.get("joined_late"):
        # this process began mid-run: what came before went through its predecessor
        text += f"; joined mid-run: at most {run['missing']} missing"
    elif run["missing"]:
        text += f"; {run['missing']} missing"
    if run["missing_workers"]:
        text += f"; no Stop from {', '.join(run['missing_workers'])}"
    for reason, n in run.get("losses", {}).items():
        text += f"; {n} {reason}" if n >= 0 else f"; {reason}"
    return text + ")"


@dataclass
class StageCounters:
    """Everything one stage process counts."""

    stage: str
    worker: int
    links: list[LinkCounters] = field(default_factory=list)
    errors: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    # events handed to the output links, once each however many links they go out on
    sent: int = 0
    current_run: int | None = None
    runs: deque[RunReport] = field(default_factory=lambda: deque(maxlen=50))
    # every run reported here so far, by outcome, and the events missing from them
    runs_complete: int = 0
    runs_incomplete: int = 0
    events_missing: int = 0
    process_ns: deque[int] = field(default_factory=lambda: deque(maxlen=1000))
    started: float = field(default_factory=time.time)
    # (minor faults, events) when the current run started: faults per event since then
    fault_mark: tuple[int, int] | None = None

    def link(self, name: str, direction: str) -> LinkCounters:
        counters = LinkCounters(name, direction) if enabled() else NullLinkCounters(name, direction)
        self.links.append(counters)
        return counters

    def events(self) -> int:
        """Events this process handled: received, or sent for a source."""
        received = sum(c.events for c in self.links if c.direction == "in")
        return received or self.sent

    def report(self, report: RunReport) -> None:
        """Keep a run's report, and count it by outcome."""
        self.runs.append(report)
        if report.complete:
            self.runs_complete += 1
        else:
            self.runs_incomplete += 1
            self.events_missing += report.missing

    def mark_run_start(self) -> None:
        """Called at each Start (one ``getrusage`` per run, nothing per message)."""
        self.fault_mark = (minor_faults(), self.events())

    def faults_per_event(self, faults: int) -> float | None:
        """Minor page faults of the whole process per event since the current run
        began (None before its first event). Thousands mean the allocator hands large
        temporaries back to the kernel and faults them in again (docs/operations.md)."""
        if self.fault_mark is None:
            return None
        base_faults, base_events = self.fault_mark
        events = self.events() - base_events
        return (faults - base_faults) / events if events > 0 else None

    def snapshot(self, outside: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Everything counted, plus ``outside``: the drops the stage's own listener or
        publisher reports (``drops()``), which the runtime cannot see itself."""
        times = sorted(self.process_ns)
        faults = minor_faults()
        drops = Counter(self.drops)
        drops.update(outside or {})
        return {
            "stage": self.stage,
            "worker": self.worker,
            "time": time.time(),
            "started": self.started,
            "links": [c.snapshot() for c in self.links],
            # events only: a Start/Stop is broadcast to every worker and merged after
            "received": sum(c.events for c in self.links if c.direction == "in"),
            # once per event: the links' own figures are in "links"
            "sent": self.sent if any(c.direction == "out" for c in self.links) else 0,
            "errors": self.errors,
            "dropped": sum(drops.values()) + sum(sum(c.drops.values()) for c in self.links),
            "drops": dict(drops),
            "current_run": self.current_run,
            "process_ms_mean": (sum(times) / len(times) / 1e6) if times else 0.0,
            "process_ms_p99": (times[int(len(times) * 0.99)] / 1e6) if times else 0.0,
            "runs": [r.snapshot() for r in self.runs],
            "runs_complete": self.runs_complete,
            "runs_incomplete": self.runs_incomplete,
            "events_missing": self.events_missing,
            "minor_faults": faults,
            "faults_per_event": self.faults_per_event(faults),
        }


def minor_faults() -> int:
    """Minor page faults of this process so far, every thread included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class NullLinkCounters(LinkCounters):
    """Counts nothing (``ARROYO_STATS=0``); drops are still counted."""

    def count(self, size: int, event: bool = True) -> None:
        pass


def link_totals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per link: events sent by the upstream processes, received by the downstream
    ones, the difference, drops by reason, and refused CURVE handshakes (from
    ``arroyo status`` rows)."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        # the row's process, and the worker's earlier (and removed) processes
        for link in [*row.get("links", []), *row.get("past", {}).get("links", [])]:
            t = totals.setdefault(
                link["link"],
                {"link": link["link"], "sent": 0, "received": 0, "dropped": {}, "auth_refused": 0},
            )
            t["auth_refused"] += link.get("auth_refused", 0)
            if link["direction"] == "out":
                t["sent"] += link.get("events", 0)
            else:
                t["received"] += link.get("events", 0)
            for reason, n in link.get("dropped", {}).items():
                t["dropped"][reason] = t["dropped"].get(reason, 0) + n
    for t in totals.values():
        t["difference"] = t["sent"] - t["received"]
    return list(totals.values())


def replace_file(path: Path, data: bytes, durable: bool = False) -> None:
    """Give ``path`` the content ``data`` all at once: written beside it, then renamed
    over it. A write that fails (a full disk) leaves the old content as it was, and
    removes its partial copy. ``durable``: fsync the data before the rename, so that
    after a power loss the file holds the old content or the new, never nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class StatsWriter(threading.Thread):
    """Writes the process's counters to RUN_DIR/stats/STAGE.WORKER.json once a second.

    A file per process is the stats channel: atomic to replace, readable by any
    reader at any time, and a restarted process simply overwrites its own. A write
    that fails (full disk, unwritable run_dir) is logged at once, then at most every
    ``LOG_EVERY`` seconds, and once more when writing works again; readers see the
    file's age grow (``arroyo status`` marks such figures stale).
    """

    LOG_EVERY = 60.0  # s
    RATE_WINDOW = 5.0  # s: rates are averages over this long, not one tick's difference

    def __init__(
        self, path: Path, snapshot: Callable[[], dict[str, Any]], interval: float = 1.0
    ) -> None:
        super().__init__(daemon=True, name="arroyo-stats")
        self.path = path
        self.snapshot = snapshot  # called from this thread: reads counters, never waits
        self.interval = interval
        self.done = threading.Event()
        # (time, received, sent) of the writes of the last RATE_WINDOW seconds
        self._history: deque[tuple[float, int, int]] = deque()
        self.exit = ""  # set before the last write: "stopped" when the stop was clean
        self._lock = threading.Lock()  # the stage's own thread writes too (ready, stop)
        self._failures = 0
        self._logged = 0.0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.write()

    def write(self) -> None:
        with self._lock:
            snap = self.snapshot()
            snap["pid"] = os.getpid()
            if self.exit:
                snap["exit"] = self.exit
            now = time.monotonic()
            history = self._history
            while len(history) > 1 and now - history[1][0] >= self.RATE_WINDOW:
                history.popleft()
            if history:
                t0, rx, tx = history[0]
                dt = max(now - t0, 1e-6)
                snap["rate_in"] = (snap["received"] - rx) / dt
                snap["rate_out"] = (snap["sent"] - tx) / dt
            history.append((now, snap["received"], snap["sent"]))
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                replace_file(self.path, json.dumps(snap).encode())
            except OSError as e:
                self._failed(e, now)
                return
            if self._failures:
                log.warning("stats written again after %d failed attempt(s)", self._failures)
                self._failures, self._logged = 0, 0.0

    def _failed(self, error: OSError, now: float) -> None:
        self._failures += 1
        if self._failures == 1 or now - self._logged >= self.LOG_EVERY:
            self._logged = now
            log.warning(
                "stats not written to %s: %s (%d failed attempt(s) so far; said again in "
                "%.0fs at most while it lasts)",
                self.path,
                error,
                self._failures,
                self.LOG_EVERY,
            )

    def stop(self) -> None:
        self.done.set()
        self.write()


def stats_path(topology: Topology, stage: str, worker: int) -> Path:
    """Where one worker's stats file is: RUN_DIR/stats/STAGE.WORKER.json."""
    return topology.run_dir / "stats" / f"{stage}.{worker}.json"


def past_path(stats_file: Path) -> Path:
    """Where the counts of a worker's earlier processes are: STAGE.WORKER.past.json."""
    return stats_file.with_name(stats_file.name.removesuffix(".json") + PAST_SUFFIX)


PAST_SUFFIX = ".past.json"
_SUMMED = (
    *("received", "sent", "errors", "dropped"),
    *("runs_complete", "runs_incomplete", "events_missing"),
)
_LINK_SUMMED = ("messages", "events", "bytes", "auth_refused")


def add_counts(past: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """``past`` (the counts of earlier processes) with ``last`` (one more process's
    final stats) added: totals, drops by reason, per-link figures and run reports."""
    out: dict[str, Any] = {k: past.get(k, 0) + last.get(k, 0) for k in _SUMMED}
    out["processes"] = past.get("processes", 0) + last.get("processes", 1)
    out["drops"] = dict(Counter(past.get("drops", {})) + Counter(last.get("drops", {})))
    links: dict[tuple[str, str], dict[str, Any]] = {}
    for link in [*past.get("links", []), *last.get("links", [])]:
        key = (link["link"], link["direction"])
        t = links.setdefault(key, {"link": key[0], "direction": key[1], "dropped": {}})
        for k in _LINK_SUMMED:
            t[k] = t.get(k, 0) + link.get(k, 0)
        t["dropped"] = dict(Counter(t["dropped"]) + Counter(link.get("dropped", {})))
    out["links"] = list(links.values())
    out["runs"] = [*past.get("runs", []), *last.get("runs", [])][-50:]
    return out


def fold_predecessor(stats_file: Path, pid: int) -> None:
    """A new process of a worker: add what its predecessor (the file's writer, another
    pid) counted to the worker's past, so totals stay right across restarts, and
    remove its file so it is never added twice. A killed predecessor's last second
    is missing (its file is rewritten once a second)."""
    try:
        last = json.loads(stats_file.read_text())
    except (OSError, ValueError):
        return
    if last.get("pid") in (None, pid):
        return
    past_file = past_path(stats_file)
    try:
        past = json.loads(past_file.read_text())
    except (OSError, ValueError):
        past = {}
    try:
        replace_file(past_file, json.dumps(add_counts(past, last)).encode())
        stats_file.unlink()
    except OSError as e:
        log.warning("cannot keep the counts of %s's predecessor: %s", stats_file.name, e)


class ProcessId(NamedTuple):
    """The parts of a link identity ``stage/worker/pid@host`` (``link.identity``)."""

    stage: str
    worker: int
    pid: int
    host: str


def parse_identity(identity: str) -> ProcessId | None:
    """The parts of ``identity``; None if it is not ``stage/worker/pid@host``."""
    rest, at, host = identity.rpartition("@")
    try:
        stage, worker, pid = rest.rsplit("/", 2)
        return ProcessId(stage, int(worker), int(pid), host) if at else None
    except ValueError:
        return None


def stopped_cleanly(topology: Topology, peer_id: str) -> bool:
    """The process ``stage/worker/pid@host`` (of this host) wrote, as its last stats,
    that it stopped cleanly. False when that cannot be told (another host, a file
    since rewritten by a restart, a process that was killed)."""
    who = parse_identity(peer_id)
    if who is None or who.host != socket.gethostname():
        return False
    try:
        last = json.loads(stats_path(topology, who.stage, who.worker).read_text())
    except (ValueError, OSError):
        return False
    return bool(last.get("pid") == who.pid and last.get("exit") == "stopped")
