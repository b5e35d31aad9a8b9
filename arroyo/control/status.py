"""The rows of ``arroyo status``: supervisor state, psutil figures and each process's
stats file, joined per process.

Rows cover every process supervisord knows and every stage process of the topology
running outside it (state ``UNMANAGED``, see ``strays``). The figures are what each
process last wrote to its stats file, once a second. A live process whose file is
older than ``STALE_AFTER`` (its disk is full, it is frozen or hung) is marked
``stale``: its counters are the last ones written, and it has no live rates.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil

from arroyo.control import strays
from arroyo.control.render import split_process_name
from arroyo.runtime.stats import (
    PAST_SUFFIX,
    StatsWriter,
    add_counts,
    parse_identity,
    past_path,
    stats_path,
)
from arroyo.topology import Topology

STALE_AFTER = 5.0  # s: five missed rewrites of a file written once a second
LIVE_STATES = {"RUNNING", strays.STATE}
STALLED = "STALLED"
_STOPPED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}


@dataclass(frozen=True)
class _Proc:
    chain: str
    stage: str
    worker: int
    state: str
    pid: int | None
    started: float  # epoch seconds, 0 when not running


def _processes(
    topology: Topology, infos: list[dict[str, Any]], supervisor: int | None
) -> list[_Proc]:
    procs = []
    for info in infos:
        stage, worker = split_process_name(info["name"])
        running = info["statename"] == "RUNNING"
        started = float(info["start"]) if running else 0.0
        procs.append(
            _Proc(info["group"], stage, worker, info["statename"], info["pid"] or None, started)
        )
    known = {i["pid"] for i in infos if i["pid"]}
    for s in strays.find_strays(topology, known, supervisor):
        chain = topology.stages[s.stage].chain
        procs.append(_Proc(chain, s.stage, s.worker, strays.STATE, s.pid, s.started))
    return procs


class CpuMeter:
    """CPU % of processes, averaged over this meter's readings of the last ``window``
    seconds, bursts included (psutil's user + system time; 100 is one core).

    A reader that refreshes (the dashboard, ``arroyo top``) keeps one meter, so each
    refresh shows the last few seconds rather than a sample that a bursty process
    (the demo's: busy a second, then idle) is almost never caught in. A meter's first
    reading of a process takes two readings ``FIRST`` s apart, shared by all."""

    WINDOW = StatsWriter.RATE_WINDOW  # s: the same as the rates beside it
    FIRST = 0.1  # s

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._procs: dict[int, psutil.Process] = {}
        self._readings: dict[int, deque[tuple[float, float]]] = {}

    def percent(self, pids: list[int]) -> dict[int, float]:
        """CPU % of every pid that still runs."""
        wanted = set(pids)
        for pid in set(self._procs) - wanted:
            self._forget(pid)
        first = [pid for pid in wanted if self._read(pid) == 1]
        if first:
            time.sleep(self.FIRST)
            for pid in first:
                self._read(pid)
        out = {}
        for pid in wanted:
            readings = self._readings.get(pid)
            if readings and len(readings) > 1 and readings[-1][0] > readings[0][0]:
                (t0, c0), (t1, c1) = readings[0], readings[-1]
                out[pid] = round(100 * (c1 - c0) / (t1 - t0), 1)
        return out

    def _read(self, pid: int) -> int:
        """Read ``pid``'s CPU time; returns how many readings the meter holds (0: gone)."""
        proc = self._procs.get(pid)
        try:
            if proc is None or not proc.is_running():  # not running: the pid was reused
                proc = self._procs[pid] = psutil.Process(pid)
                self._readings[pid] = deque()
            times = proc.cpu_times()
        except psutil.Error:
            self._forget(pid)
            return 0
        now = time.monotonic()
        readings = self._readings[pid]
        readings.append((now, times.user + times.system))
        while len(readings) > 2 and readings[0][0] < now - self.window:
            readings.popleft()
        return len(readings)

    def _forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._readings.pop(pid, None)


def _staleness(proc: _Proc, stats: dict[str, Any], now: float) -> tuple[bool, float | None]:
    """(stale, age of the figures in s). Figures of a live process are stale when its
    last write is older than STALE_AFTER, or when it has written nothing although
    it has been up that long (the file then holds an earlier process's figures)."""
    if proc.state not in LIVE_STATES:
        return False, None
    if stats.get("pid") == proc.pid and "time" in stats:
        age = max(0.0, now - float(stats["time"]))
        return age > STALE_AFTER, age
    return now - proc.started > STALE_AFTER, None


def _row(topology: Topology, proc: _Proc, cpu: dict[int, float], now: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "chain": proc.chain,
        "stage": proc.stage,
        "worker": proc.worker,
        "state": proc.state,
        "pid": proc.pid,
        "uptime": (now - proc.started) if proc.started else 0.0,
        "cpu_percent": None,
        "rss_bytes": None,
    }
    if proc.pid:
        with contextlib.suppress(psutil.Error):
            ps = psutil.Process(proc.pid)
            row["cpu_percent"] = cpu.get(proc.pid)
            row["rss_bytes"] = ps.memory_info().rss
            if ps.status() in _STOPPED:
                row["stalled"] = "stopped (SIGSTOP, or held by a debugger)"
    path = stats_path(topology, proc.stage, proc.worker)
    stats = _read(path)
    past = _read(past_path(path))
    stale, age = _staleness(proc, stats, now)
    live = proc.state in LIVE_STATES and not stale
    row.update(
        {
            "received": stats.get("received", 0),
            "sent": stats.get("sent", 0),
            "errors": stats.get("errors", 0),
            "dropped": stats.get("dropped", 0),
            "runs_complete": stats.get("runs_complete", 0),
            "runs_incomplete": stats.get("runs_incomplete", 0),
            "events_missing": stats.get("events_missing", 0),
            "current_run": stats.get("current_run"),
            "rate_in": stats.get("rate_in", 0.0) if live else (None if stale else 0.0),
            "rate_out": stats.get("rate_out", 0.0) if live else (None if stale else 0.0),
            "stale": stale,
            "stats_age": age,
            "drops": stats.get("drops", {}),
            "process_ms_mean": stats.get("process_ms_mean", 0.0),
            "process_ms_p99": stats.get("process_ms_p99", 0.0),
            "minor_faults": stats.get("minor_faults"),
            "faults_per_event": stats.get("faults_per_event"),
            "links": stats.get("links", []),
            # counts of this worker's earlier processes (restarts) and of removed workers
            "past": past,
            "runs": [*past.get("runs", []), *stats.get("runs", [])][-50:],
            "live": stats.get("live"),
            "extra": stats.get("extra", {}),
        }
    )
    return row


def status_rows(
    topology: Topology,
    infos: list[dict[str, Any]],
    supervisor: int | None,
    cpu: CpuMeter | None = None,
) -> list[dict[str, Any]]:
    """One row per process supervisord reports (``infos``, from getAllProcessInfo)
    and per stage process of the topology outside it (``supervisor``: its pid).
    ``cpu``: the meter a refreshing reader keeps (default: a new one, two readings
    ``CpuMeter.FIRST`` s apart)."""
    procs = _processes(topology, infos, supervisor)
    cpu_percent = (cpu or CpuMeter()).percent([p.pid for p in procs if p.pid])
    now = time.time()
    rows = [_row(topology, p, cpu_percent, now) for p in procs]
    _add_exited(topology, rows)
    mark_stalled(rows)
    return rows


def _read(path: Any) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _add_exited(topology: Topology, rows: list[dict[str, Any]]) -> None:
    """The final counts of workers that have no process any more (scaled down) stay in
    the totals until ``down``: they are added to the past of their stage's first row."""
    shown = {(r["stage"], r["worker"]) for r in rows}
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        first.setdefault(r["stage"], r)
    folder = topology.run_dir / "stats"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.endswith(PAST_SUFFIX):
            continue
        stage, _, worker = path.name.removesuffix(".json").rpartition(".")
        if stage not in first or not worker.isdigit() or (stage, int(worker)) in shown:
            continue
        row = first[stage]
        gone = add_counts(_read(past_path(path)), _read(path))
        row["past"] = add_counts(row["past"], gone) if row["past"] else gone
        row["runs"] = row["runs"][-50:]


def mark_stalled(rows: list[dict[str, Any]]) -> None:
    """Give the state STALLED to every running process that is stopped (``stalled``
    set by the caller) or that a live peer has let go: it answered none of libzmq's
    heartbeats for ``peer_timeout`` (frozen, hung in the kernel, its host cut off), so
    its share of the open run was closed incomplete and its credit released. The
    reason goes in ``stalled``. A process busy in a long ``process()`` call still
    answers, and is not let go."""
    let_go: dict[tuple[str, int, int], str] = {}
    for r in rows:
        if r["state"] not in LIVE_STATES or r.get("stale"):
            continue  # a peer's verdict counts while the peer itself is live
        for link in r.get("links", []):
            for identity in link.get("gone", {}):
                who = parse_identity(identity)
                if who is not None:
                    key = (who.stage, who.worker, who.pid)
                    let_go.setdefault(key, f"let go by {r['stage']}/{r['worker']}")
    for r in rows:
        if r["state"] != "RUNNING" or not r.get("pid"):
            continue
        why = let_go.get((r["stage"], r["worker"], r["pid"]))
        if why is not None:
            stopped = r.get("stalled")
            r["stalled"] = f"{stopped}; {why}" if stopped else why
        if r.get("stalled"):
            r["state"] = STALLED
