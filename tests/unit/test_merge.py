"""RunMerger beyond the happy path: workers' shares of a run that add up where the
workers meet, and runs across a restart of the stage in front of the workers (a
device or a binding sender), which only knows the workers it served since and may
broadcast a run's Stop before a worker came back to it."""

from __future__ import annotations

from arroyo.message import SHARES, Event, Message, Start, Stop, add_up_shares
from arroyo.runtime.merge import RunMerger
from arroyo.runtime.stats import JOINED_MID_RUN, RunReport

START = Start(run=1, routing={"o": "det"})


def _push(merger: RunMerger, pushes: list[tuple[str, Message]]) -> list[Message]:
    out: list[Message] = []
    for sender, message in pushes:
        out += [m for _, _, m in merger.push(sender, message, 1) if m is not None]
    return out


def _stop(hits: int, misses: int, n: int, workers: list[str]) -> Stop:
    return Stop(
        data={"frames": 10, "hits": hits, "misses": misses, SHARES: ["hits", "misses"]},
        run=1,
        seq=10,
        routing={"o": "det", "w": workers, "n": n},
    )


def test_a_fan_in_adds_up_the_workers_shares_once():
    reports: list[RunReport] = []
    merger = RunMerger("f__sink", True, lambda _: True, reports.append)
    workers = ["f/0", "f/1"]
    start = Start(run=1, routing={"o": "det"})
    pushes: list[tuple[str, Message]] = [("f/0", start), ("f/1", start)]
    pushes += [("f/0", Event(run=1, seq=i)) for i in range(3)]
    pushes += [("f/1", Event(run=1, seq=i)) for i in range(3, 7)]
    pushes += [("f/0", _stop(2, 1, 3, workers)), ("f/1", _stop(1, 3, 4, workers))]
    out = _push(merger, pushes)
    (stop,) = [m for m in out if isinstance(m, Stop)]
    # hits and misses are totals; "frames" (the same in every Stop) is not added up
    assert stop.data == {"frames": 10, "hits": 3, "misses": 4}
    (report,) = reports
    assert report.complete and (report.received, report.expected) == (7, 7)


def test_a_single_upstream_worker_passes_its_shares_as_totals():
    merger = RunMerger("f__op", False, lambda _: True, lambda _: None)
    (stop,) = [m for m in _push(merger, [("f/0", _stop(5, 2, 7, ["f/0"]))])]
    assert stop.data == {"frames": 10, "hits": 5, "misses": 2}


def test_only_numbers_named_as_shares_are_added():
    stops = [
        Stop(data={"a": 1, "b": "x", "c": True, SHARES: ["a", "b", "c", 7]}),
        Stop(data={"a": 2.5, "b": "y", "c": False, SHARES: ["a", "b", "c"]}),
    ]
    assert add_up_shares(dict(stops[0].data), stops) == {"a": 3.5, "b": "x", "c": True}
    assert add_up_shares({"a": 1}, [Stop(data={"a": 1})]) == {"a": 1}


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


def test_a_boundary_without_origin_inside_a_run_stays_in_that_run():
    reports: list[RunReport] = []
    merger = RunMerger("w__sink", True, lambda _: True, reports.append)
    pushes: list[tuple[str, Message]] = [("w/0", START)]
    pushes += [("w/0", Event(run=1, seq=i)) for i in range(5)]
    pushes += [("w/0", Start(run=1, seq=5))]  # a peer that sets no origin
    pushes += [("w/0", Event(run=1, seq=i)) for i in range(5, 10)]
    pushes += [("w/0", Stop(run=1, seq=10, routing={"o": "det", "w": ["w/0"], "n": 10}))]
    out = _push(merger, pushes)
    assert [type(m) for m in out] == [Start] + [Event] * 10 + [Stop]
    (report,) = reports
    assert report.complete and (report.received, report.expected) == (10, 10)


def test_what_was_filed_without_origin_is_dispatched_when_its_run_is_current():
    reports: list[RunReport] = []
    merger = RunMerger("w__sink", True, lambda _: True, reports.append)
    stop = Stop(run=1, seq=6, routing={"o": "det", "w": ["w/0", "w/1"], "n": 3})
    pushes: list[tuple[str, Message]] = [("w/0", START)]
    pushes += [("w/0", Event(run=1, seq=i)) for i in range(3)]
    # w/1's first boundary names no origin: its share is filed under no origin...
    pushes += [("w/1", Start(run=1))] + [("w/1", Event(run=1, seq=i)) for i in range(3, 6)]
    # ...until its Stop names the run the share belongs to: the current one
    pushes += [("w/1", stop), ("w/0", stop)]
    out = _push(merger, pushes)
    assert [type(m) for m in out] == [Start] + [Event] * 6 + [Stop]
    (report,) = reports
    assert report.complete and (report.received, report.expected) == (6, 6)


def test_a_run_cut_by_this_stage_blames_its_stop_not_a_death():
    reports: list[RunReport] = []
    merger = RunMerger("w__sink", True, lambda _: True, reports.append)
    _push(merger, [("w/0", START), ("w/0", Event(run=1, seq=0))])
    (stop,) = [m for _, _, m in merger.flush("drain timeout") if m is not None]
    assert stop.data["incomplete"] is True
    assert reports[0].missing_workers == ["w/0 (stopped waiting: drain timeout)"]


def test_a_source_that_stopped_cleanly_is_not_said_to_have_died():
    reports: list[RunReport] = []
    gone = {"det"}
    merger = RunMerger(
        "w__sink", True, lambda w: w not in gone, reports.append, lambda: True, lambda w: w in gone
    )
    _push(merger, [("w/0", START), ("w/0", Event(run=1, seq=0))])
    merger._last_check = 0.0
    assert [type(m) for _, _, m in merger.check_dead()] == [Stop]
    assert reports[0].missing_workers == ["source (stopped)"]


def test_a_share_cut_at_a_workers_drain_timeout_makes_the_run_incomplete():
    reports: list[RunReport] = []
    merger = RunMerger("w__sink", True, lambda _: True, reports.append)
    stop = Stop(run=1, seq=3, routing={"o": "det", "w": ["w/0", "w/1"], "n": 2})
    cut = Stop(run=1, routing={"o": "det", "partial": True, "cut": "drain timeout", "n": 1})
    pushes: list[tuple[str, Message]] = [("w/0", START), ("w/1", START)]
    pushes += [("w/0", Event(run=1, seq=0)), ("w/0", Event(run=1, seq=1))]
    pushes += [("w/1", Event(run=1, seq=2)), ("w/0", stop), ("w/1", cut)]
    (merged,) = [m for m in _push(merger, pushes) if isinstance(m, Stop)]
    assert merged.data["incomplete"] is True
    (report,) = reports
    assert report.missing_workers == ["w/1 (left at drain timeout)"]
    assert (report.received, report.emitted) == (3, 3)


def test_a_run_whose_every_share_ended_early_closes_incomplete():
    """The device in front restarted after taking the run's Stop: each worker ends
    its share when the next run begins, and the fan-in must not wait for ever."""
    reports: list[RunReport] = []
    merger = RunMerger("b__sink", True, lambda _: True, reports.append)
    partial = Stop(run=1, routing={"o": "det", "partial": True, "n": 2})
    pushes: list[tuple[str, Message]] = [("b/0", START), ("b/1", START)]
    pushes += [("b/0", Event(run=1, seq=0)), ("b/1", Event(run=1, seq=1))]
    out = _push(merger, [*pushes, ("b/0", partial)])
    assert not any(isinstance(m, Stop) for m in out), "closed before b/1's share ended"
    out = _push(merger, [("b/1", partial)])
    (stop,) = [m for m in out if isinstance(m, Stop)]
    assert stop.data["incomplete"] is True
    assert reports[0].missing_workers == ["upstream (every share ended early, no Stop)"]


def test_a_worker_that_begins_the_next_run_owes_no_stop_for_the_last():
    """Its Stop went to a device that restarted before forwarding it."""
    reports: list[RunReport] = []
    merger = RunMerger("a__b", True, lambda _: True, reports.append)
    pushes: list[tuple[str, Message]] = [("a/1", START), ("a/1", Event(run=1, seq=0))]
    pushes += [("a/1", Stop(run=1, seq=2, routing={"o": "det", "w": ["a/0", "a/1"], "n": 1}))]
    assert not any(isinstance(m, Stop) for m in _push(merger, pushes))
    out = _push(merger, [("a/0", Start(run=2, routing={"o": "det", "p": 1}))])
    assert [type(m) for m in out] == [Stop, Start]
    assert reports[0].missing_workers == ["a/0"] and not reports[0].complete


def test_a_worker_back_after_its_run_closed_without_it_is_dropped_as_late():
    """A remote worker counted dead (its host was cut off) reconnects when the network
    heals and delivers the rest of the run it held: the run went downstream already."""
    reports: list[RunReport] = []
    late: list[int] = []
    alive = {"b/0": False, "b/1": True}
    merger = RunMerger(
        "b__sink",
        True,
        lambda w: alive.get(w, True),
        reports.append,
        on_late=lambda: late.append(1),
    )
    pushes: list[tuple[str, Message]] = [("b/0", START), ("b/1", START)]
    pushes += [("b/0", Event(run=1, seq=0)), ("b/1", Event(run=1, seq=1))]
    pushes += [("b/1", Stop(run=1, seq=3, routing={"o": "det", "w": ["b/0", "b/1"], "n": 1}))]
    _push(merger, pushes)
    merger._last_check = 0.0
    closed = [m for _, _, m in merger.check_dead() if m is not None]
    assert [type(m) for m in closed] == [Stop] and closed[0].data.get("incomplete")
    back = [("b/0", Event(run=1, seq=2)), ("b/0", Stop(run=1, routing={"o": "det", "n": 2}))]
    assert _push(merger, back) == []  # no second Start/Stop for run 1
    assert len(late) == 2 and len(reports) == 1
    # the next run is merged as usual, with the worker that came back
    start2 = Start(run=2, routing={"o": "det", "p": 1})
    alive["b/0"] = True
    out = _push(merger, [("b/0", start2), ("b/1", start2)])
    assert [type(m) for m in out] == [Start]


def test_a_lost_workers_share_is_judged_against_what_the_source_emitted():
    # multi-host, a worker's host cut after its events arrived but before its Stop:
    # every event the source emitted arrived, so nothing is missing and the run is whole
    report = RunReport("det/0/1@a", 1, emitted=1000, received=1000, expected=706,
                       missing_workers=["w/1/9@b"])  # fmt: skip
    assert report.complete and report.missing == 0
    assert report.line() == "run 1: 1000/1000 events (complete; no Stop from w/1/9@b)"
    short = RunReport("det/0/1@a", 2, 1000, 990, 706, ["w/1/9@b"])
    assert not short.complete
    assert short.line() == "run 2: 990/1000 events (INCOMPLETE; 10 missing; no Stop from w/1/9@b)"


def test_an_uncounted_loss_before_is_judged_against_what_the_source_emitted():
    # a single operator killed mid-run with nothing in flight: its restarted process
    # joined the run mid-way and cannot count what went to its predecessor (-1), but
    # every event the source emitted arrived, so the run is whole
    joined = {f"lost on link det->op {JOINED_MID_RUN}": -1}
    whole = RunReport("det/0/1@a", 1, 8000, 8000, 7371, ["op/0/5@a"], losses=joined)
    assert whole.complete and whole.missing == 0
    short = RunReport("det/0/1@a", 1, 8000, 7990, 7371, ["op/0/5@a"], losses=joined)
    assert not short.complete and short.missing == 10
    # without a worker missing here either, the source's count still decides
    assert RunReport("det/0/1@a", 1, 8000, 8000, 7371, losses=joined).complete
    assert not RunReport("det/0/1@a", 1, 8000, 7999, 7371, losses=joined).complete
    # a counted loss is a loss whatever arrived
    counted = {"failed in process() at op": 3, **joined}
    assert not RunReport("det/0/1@a", 1, 8000, 8000, 7371, losses=counted).complete
    # an uncounted loss of another kind (a share cut short, a source gone without its
    # Stop) is not covered by what arrived: the count arriving here may be short too
    cut = {"lost on link op->sink: op/1/7@a (left at drain timeout)": -1}
    assert not RunReport("det/0/1@a", 1, 8000, 8000, 7371, losses=cut).complete


def test_a_restarted_single_operator_that_lost_nothing_leaves_the_run_whole():
    # op/0/5 forwards 3 events and is killed; its restart op/0/6 joins mid-run (the
    # Start sent again), forwards the other 7 and closes its Stop incomplete: it cannot
    # count what went to its predecessor. All 10 the source emitted arrived here.
    reports: list[RunReport] = []
    alive = {"op/0/5@a": True, "op/0/6@a": True}
    merger = RunMerger("op->sink", True, lambda w: alive[w], reports.append, named=False)
    start = Start(run=1, routing={"o": "det/0/1@a"})
    pushes: list[tuple[str, Message]] = [("op/0/5@a", start)]
    pushes += [("op/0/5@a", Event(run=1, seq=i)) for i in range(3)]
    alive["op/0/5@a"] = False
    pushes += [("op/0/6@a", Start(run=1, routing={"o": "det/0/1@a"}))]
    pushes += [("op/0/6@a", Event(run=1, seq=i)) for i in range(3, 10)]
    uncounted = {f"lost on link det->op {JOINED_MID_RUN}": -1}
    stop = Stop(data={"frames": 10, "incomplete": True}, run=1, seq=10,
                routing={"o": "det/0/1@a", "n": 7, "l": uncounted})  # fmt: skip
    out = _push(merger, [*pushes, ("op/0/6@a", stop)])
    merger._last_check = 0.0  # the liveness check runs at most twice a second
    out += [m for _, _, m in merger.check_dead() if m is not None]
    assert [type(m).__name__ for m in out] == ["Start"] + ["Event"] * 10 + ["Stop"]
    (report,) = reports
    assert report.complete and report.missing_workers == ["op/0/5@a"], report
    assert out[-1].data == {"frames": 10} and "l" not in out[-1].routing


def test_a_single_upstream_process_is_waited_for_by_itself_not_by_the_w_it_carries():
    # a Stop from one process carries the ``w`` its own sender wrote for the next hop;
    # from a single upstream process that names this stage's workers, not the senders
    reports: list[RunReport] = []
    merger = RunMerger("op->sink", True, lambda _: True, reports.append, named=False)
    out = _push(
        merger,
        [
            ("op/0", Start(run=1, routing={"o": "det"})),
            ("op/0", Event(run=1, seq=0)),
            ("op/0", Stop(run=1, seq=1, routing={"o": "det", "n": 1, "w": ["sink/0"]})),
        ],
    )
    assert [type(m).__name__ for m in out] == ["Start", "Event", "Stop"]
    assert reports[0].complete


def test_losses_reported_upstream_make_the_run_incomplete_downstream():
    reports: list[RunReport] = []
    merger = RunMerger("op->sink", True, lambda _: True, reports.append, named=False)
    losses = {"failed in process() at op": 3}
    out = _push(
        merger,
        [
            ("op/0", Start(run=1, routing={"o": "det"})),
            ("op/0", Stop(run=1, seq=3, routing={"o": "det", "n": 0, "l": losses})),
        ],
    )
    assert out[-1].data["incomplete"] is True and out[-1].routing["l"] == losses
    assert not reports[0].complete and reports[0].losses == losses
