"""A fan-in closes the open run of a source that died once a new process of the same
source worker begins sending, whatever run id that process starts from (a full disk
can leave its run-id file behind, so its Start's ``p`` may name an older run)."""

from __future__ import annotations

from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.merge import RunMerger
from arroyo.runtime.stats import RunReport

OLD, NEW = "det/0/100@h", "det/0/200@h"


def _push(merger: RunMerger, pushes: list[tuple[str, Message]]) -> list[Message]:
    out: list[Message] = []
    for sender, message in pushes:
        out += [m for _, _, m in merger.push(sender, message, 1) if m is not None]
    return out


def _merger(reports: list[RunReport]) -> RunMerger:
    return RunMerger("w__sink", True, lambda peer: peer != OLD, reports.append)


def _check_dead(merger: RunMerger) -> list[Message]:
    merger._last_check = 0.0  # no waiting between checks
    return [m for _, _, m in merger.check_dead() if m is not None]


def _open_run_then_restart(new_first: int, new_prev: int | None) -> list[tuple[str, Message]]:
    done = Start(run=214, routing={"o": OLD, "p": None})
    done_stop = Stop(run=214, seq=0, routing={"o": OLD, "w": ["w/0", "w/1"], "n": 0})
    old = Start(run=215, routing={"o": OLD, "p": 214})
    new = Start(run=new_first, routing={"o": NEW, "p": new_prev})
    return [
        ("w/0", done),
        ("w/1", done),
        ("w/0", done_stop),
        ("w/1", done_stop),
        ("w/0", old),
        ("w/1", old),
        ("w/0", Event(run=215, seq=0)),
        ("w/0", new),
        ("w/1", new),
    ]


def test_a_restarted_source_whose_start_names_an_older_run_ends_the_dead_ones_run():
    reports: list[RunReport] = []
    merger = _merger(reports)
    # the restart read 214 from its run-id file (215 could not be recorded)
    out = _push(merger, _open_run_then_restart(215, 214))
    out += _check_dead(merger)
    stops = [m for m in out if isinstance(m, Stop)]
    assert [(s.run, s.data.get("incomplete")) for s in stops] == [(214, None), (215, True)]
    assert reports[1].origin == OLD and reports[1].missing_workers == ["source (died)"]
    assert any(isinstance(m, Start) and m.routing["o"] == NEW for m in out), "next run begins"


def test_another_source_worker_starting_does_not_end_a_run():
    reports: list[RunReport] = []
    merger = _merger(reports)
    pushes = _open_run_then_restart(1, None)
    other = Start(run=1, routing={"o": "det/1/300@h", "p": None})
    pushes = [*pushes[:7], ("w/0", other)]
    _push(merger, pushes)
    out = _check_dead(merger)
    assert not [m for m in out if isinstance(m, Stop)], "det/1 is not det/0's successor"
    assert len(reports) == 1, "only run 214 closed"
