"""keep_run: what an operator's results become around run boundaries."""

from __future__ import annotations

from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.boundaries import BUILT_BOUNDARY, FOREIGN_RUN, keep_run
from arroyo.stage import outputs_of

ROUTING = {"o": "det/0/1@h", "p": 2}


def vet(source: Message, *returned: Message):
    return keep_run(source, outputs_of(list(returned), source))


def test_a_start_built_for_an_event_is_refused_and_the_event_kept():
    event = Event(run=3, seq=5)
    built = Start(data={"split": True})
    vetted = vet(event, built, event)
    assert vetted.outputs == [event]
    assert vetted.refused == [(BUILT_BOUNDARY, built)]


def test_a_rebuilt_start_keeps_the_runs_identity_and_goes_first():
    start = Start(data={"a": 1}, run=3, routing=dict(ROUTING))
    extra = Event(metadata={"k": 1})
    rebuilt = Start(data={"b": 2}, routing={"o": "mine"})
    vetted = vet(start, extra, rebuilt)
    assert vetted.outputs == [rebuilt, extra]
    assert (rebuilt.run, rebuilt.seq, rebuilt.routing, rebuilt.data) == (3, 0, ROUTING, {"b": 2})
    assert not vetted.refused and not vetted.restored


def test_a_stop_goes_last_and_a_second_boundary_is_refused():
    stop = Stop(run=3, seq=10, routing=dict(ROUTING))
    summary = Event(metadata={"hits": 4})
    again = Start()
    vetted = vet(stop, stop, again, summary)
    assert vetted.outputs == [summary, stop]
    assert vetted.refused == [(BUILT_BOUNDARY, again)]


def test_a_boundary_not_returned_is_restored():
    for boundary in (Start(run=4), Stop(run=4, seq=7)):
        vetted = vet(boundary, Event(metadata={}))
        assert boundary in vetted.outputs and vetted.restored


def test_an_event_of_another_run_is_refused():
    event = Event(run=3, seq=1)
    other = Event(run=99)
    vetted = vet(event, event, other)
    assert vetted.outputs == [event]
    assert vetted.refused == [(FOREIGN_RUN, other)]
