"""Run merging when the stage in front of the workers restarts mid-run (a device or a
binding sender): it only knows the workers it served since, and a worker that came
back after it broadcast the run's Stop never gets that Stop."""

from __future__ import annotations

from arroyo.merge import RunMerger
from arroyo.message import Event, Message, Start, Stop
from arroyo.stats import RunReport

START = Start(run=1, routing={"o": "det"})


def _push(merger: RunMerger, pushes: list[tuple[str, Message]]) -> list[Message]:
    out: list[Message] = []
    for sender, message in pushes:
        out += [m for _, _, m in merger.push(sender, message, 1) if m is not None]
    return out


def test_a_fan_in_waits_for_every_worker_that_forwarded_the_start():
    reports: list[RunReport] = []
    merger = RunMerger("b__sink", True, lambda _: True, reports.append)
    pushes: list[tuple[str, Message]] = [("b/0", START), ("b/1", START)]
    pushes += [("b/0", Event(run=1, seq=i)) for i in range(3)]
    pushes += [("b/1", Event(run=1, seq=i)) for i in range(3, 5)]
    # the restarted device served only b/1 when it broadcast the Stop
    pushes += [("b/1", Stop(run=1, seq=5, routing={"o": "det", "w": ["b/1"], "n": 2}))]
    out = _push(merger, pushes)
    assert not any(isinstance(m, Stop) for m in out), "closed before b/0's share ended"
    # b/0 ends its share with a partial Stop: now the run closes, whole
    out = _push(merger, [("b/0", Stop(run=1, routing={"o": "det", "partial": True, "n": 3}))])
    (stop,) = [m for m in out if isinstance(m, Stop)]
    assert (stop.run, stop.seq) == (1, 5)
    (report,) = reports
    assert report.complete and (report.received, report.expected) == (5, 5)


def test_a_worker_that_forwarded_the_start_and_died_is_given_up_on():
    reports: list[RunReport] = []
    alive = {"b/0": False, "b/1": True}
    merger = RunMerger("b__sink", True, lambda w: alive.get(w, True), reports.append)
    pushes: list[tuple[str, Message]] = [("b/0", START), ("b/1", START)]
    pushes += [("b/1", Stop(run=1, seq=0, routing={"o": "det", "w": ["b/1"], "n": 0}))]
    _push(merger, pushes)
    merger._last_check = 0.0  # the liveness check runs at most twice a second
    out = [m for _, _, m in merger.check_dead() if m is not None]
    assert [type(m) for m in out] == [Stop]
    assert reports[0].missing_workers == ["b/0"]


def test_a_start_of_the_next_run_ends_a_run_that_got_no_stop():
    merger = RunMerger("dev__b", False, lambda _: True, lambda _: None)
    out = _push(merger, [("dev/1", START), ("dev/1", Event(run=1, seq=0))])
    assert [type(m) for m in out] == [Start, Event]
    out = _push(merger, [("dev/2", Start(run=2, routing={"o": "det", "p": 1}))])
    assert [type(m) for m in out] == [Stop, Start]
    stop = out[0]
    assert isinstance(stop, Stop) and stop.run == 1 and stop.routing["partial"] is True
    assert list(merger.open_runs) == [("det", 2)]
    # another origin's runs are left alone
    assert _push(merger, [("x/1", Start(run=7, routing={"o": "other"}))])[0].run == 7
    assert set(merger.open_runs) == {("det", 2), ("other", 7)}
