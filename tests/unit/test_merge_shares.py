"""Counts a worker makes over its share of a run add up where the workers' Stops meet."""

from __future__ import annotations

from arroyo.merge import SHARES, RunMerger, add_up_shares
from arroyo.message import Event, Start, Stop
from arroyo.stats import RunReport


def _stop(hits: int, misses: int, n: int, workers: list[str]) -> Stop:
    return Stop(
        data={"frames": 10, "hits": hits, "misses": misses, SHARES: ["hits", "misses"]},
        run=1,
        seq=10,
        routing={"o": "det", "w": workers, "n": n},
    )


def _merged(merger: RunMerger, pushes: list[tuple[str, object]]) -> list[object]:
    out = []
    for sender, message in pushes:
        out += [m for _, _, m in merger.push(sender, message, 1) if m is not None]
    return out


def test_a_fan_in_adds_up_the_workers_shares_once():
    reports: list[RunReport] = []
    merger = RunMerger("f__sink", True, lambda _: True, reports.append)
    workers = ["f/0", "f/1"]
    start = Start(run=1, routing={"o": "det"})
    pushes: list[tuple[str, object]] = [("f/0", start), ("f/1", start)]
    pushes += [("f/0", Event(run=1, seq=i)) for i in range(3)]
    pushes += [("f/1", Event(run=1, seq=i)) for i in range(3, 7)]
    pushes += [("f/0", _stop(2, 1, 3, workers)), ("f/1", _stop(1, 3, 4, workers))]
    out = _merged(merger, pushes)
    (stop,) = [m for m in out if isinstance(m, Stop)]
    # hits and misses are totals; "frames" (the same in every Stop) is not added up
    assert stop.data == {"frames": 10, "hits": 3, "misses": 4}
    (report,) = reports
    assert report.complete and (report.received, report.expected) == (7, 7)


def test_a_single_upstream_worker_passes_its_shares_as_totals():
    merger = RunMerger("f__op", False, lambda _: True, lambda _: None)
    (stop,) = [m for m in _merged(merger, [("f/0", _stop(5, 2, 7, ["f/0"]))])]
    assert stop.data == {"frames": 10, "hits": 5, "misses": 2}


def test_only_numbers_named_as_shares_are_added():
    stops = [
        Stop(data={"a": 1, "b": "x", "c": True, SHARES: ["a", "b", "c", 7]}),
        Stop(data={"a": 2.5, "b": "y", "c": False, SHARES: ["a", "b", "c"]}),
    ]
    assert add_up_shares(dict(stops[0].data), stops) == {"a": 3.5, "b": "x", "c": True}
    assert add_up_shares({"a": 1}, [Stop(data={"a": 1})]) == {"a": 1}
