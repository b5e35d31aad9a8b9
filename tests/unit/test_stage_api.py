"""The stage API (Listener -> Operator -> Publishers) composed in one process."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from arroyo.message import Event, Message, Start, Stop
from arroyo.runtime.stats import StageCounters
from arroyo.stage import Listener, Operator, PassThrough, Publisher, Result, outputs_of
from arroyo.testing import (
    CollectingPublisher,
    ListListener,
    compose,
    make_run,
    run_chain,
    run_operator,
)

# ---------------------------------------------------------------- operators under test


class DoubleEvenFrames(Operator):
    """Doubles the array of even-numbered events and drops the odd ones."""

    def process(self, message: Message) -> Result:
        if not isinstance(message, Event):
            return message
        if message.seq % 2:
            return None
        assert isinstance(message.payload, np.ndarray)
        return Event(metadata=dict(message.metadata), payload=message.payload * 2)


class Split(Operator):
    """Emits each event as ``parts`` unstamped events, one per row block."""

    def __init__(self, parts: int) -> None:
        self.parts = parts

    def process(self, message: Message) -> Result:
        if not isinstance(message, Event):
            return message
        return (
            Event(metadata={"part": i, **message.metadata}, payload=block)
            for i, block in enumerate(np.array_split(message.payload, self.parts))  # type: ignore[arg-type]
        )


class Returns(Operator):
    def __init__(self, result: object) -> None:
        self.result = result

    def process(self, message: Message) -> Result:
        return self.result  # type: ignore[return-value]


# ---------------------------------------------------------------- processing


def test_operator_doubles_arrays_and_drops_odd_events() -> None:
    run = make_run(frames=5, shape=(3, 2), dtype="int32", run=4)
    out = run_operator(DoubleEvenFrames(), run)

    assert [type(m) for m in out] == [Start, Event, Event, Event, Stop]
    assert out[0] is run[0]
    assert out[-1] is run[-1]
    events = [m for m in out if isinstance(m, Event)]
    assert [e.seq for e in events] == [0, 2, 4]
    assert all(e.run == 4 for e in events)
    for event in events:
        source = run[1 + event.seq]
        assert isinstance(source, Event)
        assert event.metadata == {"frame": event.seq}
        assert isinstance(event.payload, np.ndarray)
        assert event.payload.dtype == np.int32
        np.testing.assert_array_equal(event.payload, source.payload * 2)  # type: ignore[operator]


def test_several_results_are_published_in_order_and_stamped() -> None:
    run = make_run(frames=3, shape=(6, 2), run=9)
    out = run_operator(Split(parts=3), run)

    events = [m for m in out if isinstance(m, Event)]
    assert len(out) == 1 + 9 + 1
    assert [(e.run, e.seq, e.metadata["part"]) for e in events] == [
        (9, seq, part) for seq in range(3) for part in range(3)
    ]
    for seq in range(3):
        source = run[1 + seq]
        assert isinstance(source, Event)
        parts = [e.payload for e in events if e.seq == seq]
        np.testing.assert_array_equal(np.concatenate(parts), source.payload)  # type: ignore[arg-type]


def test_results_with_their_own_run_keep_it() -> None:
    own = Event(payload=b"x", run=77, seq=3)
    fresh = Event(payload=b"y")
    source = Event(run=5, seq=11)
    outputs = outputs_of([own, fresh], source)
    assert outputs == [own, fresh]
    assert (own.run, own.seq) == (77, 3)
    assert (fresh.run, fresh.seq) == (5, 11)


@pytest.mark.parametrize("container", [list, tuple, iter])
def test_any_iterable_of_messages_is_accepted(container: type) -> None:
    a, b = Event(metadata={"n": 1}), Event(metadata={"n": 2})
    sink = CollectingPublisher()
    operator = Returns(container([a, b]))
    operator.add_publisher(sink)
    returned = operator.handle(Event(run=2, seq=6))
    assert returned == [a, b]
    assert sink.messages[0] is a
    assert sink.messages[1] is b
    assert [(m.run, m.seq) for m in sink.messages] == [(2, 6), (2, 6)]


def test_returning_none_or_empty_publishes_nothing() -> None:
    results: list[object] = [None, [], ()]
    for result in results:
        sink = CollectingPublisher()
        operator = Returns(result)
        operator.add_publisher(sink)
        assert operator.handle(Event(run=1)) == []
        assert sink.messages == []


def test_returning_the_input_keeps_it_unchanged() -> None:
    source = Event(metadata={"a": 1}, run=0, seq=4)
    source.routing = {"origin": "x"}
    assert outputs_of(source, source) == [source]
    assert (source.run, source.seq, source.routing) == (0, 4, {"origin": "x"})


def test_rebuilt_stop_keeps_the_source_routing() -> None:
    source = Stop(data={"n": 3}, run=6, seq=3)
    source.routing = {"origin": "detector", "workers": ["w0", "w1"]}

    class RebuildStop(Operator):
        def process(self, message: Message) -> Result:
            return Stop(data={"rebuilt": True})

    [out] = run_operator(RebuildStop(), [source])
    assert out is not source
    assert isinstance(out, Stop)
    assert out.data == {"rebuilt": True}
    assert out.routing == {"origin": "detector", "workers": ["w0", "w1"]}
    assert (out.run, out.seq) == (6, 3)


def test_rebuilt_message_with_its_own_routing_or_another_kind_does_not_inherit() -> None:
    source = Stop(run=6, seq=3)
    source.routing = {"origin": "detector"}
    own = Stop()
    own.routing = {"origin": "mine"}
    other_kind = Event()
    outputs_of([own, other_kind], source)
    assert own.routing == {"origin": "mine"}
    assert other_kind.routing == {}


def test_non_message_result_raises_type_error_and_publishes_nothing() -> None:
    for result, name in [(5, "int"), (["x"], "str"), ([Event(), {"k": 1}], "dict")]:
        sink = CollectingPublisher()
        operator = Returns(result)
        operator.add_publisher(sink)
        with pytest.raises(TypeError, match=f"returned {name}, expected a Message"):
            operator.handle(Event(run=1))
        assert sink.messages == []


def test_non_message_result_stops_run_operator() -> None:
    with pytest.raises(TypeError, match="expected a Message"):
        run_operator(Returns("not a message"), make_run(frames=1))


# ---------------------------------------------------------------- publishers


def test_add_and_remove_publisher() -> None:
    operator = PassThrough()
    assert operator.publishers == []
    first, second = CollectingPublisher(), CollectingPublisher()
    operator.add_publisher(first)
    operator.add_publisher(second)
    assert operator.publishers == [first, second]

    one = Event(seq=1)
    operator.handle(one)
    operator.remove_publisher(first)
    assert operator.publishers == [second]
    two = Event(seq=2)
    operator.handle(two)

    assert first.messages == [one]
    assert second.messages == [one, two]
    with pytest.raises(ValueError):
        operator.remove_publisher(first)


def test_publishers_list_is_per_operator() -> None:
    a, b = PassThrough(), PassThrough()
    a.add_publisher(CollectingPublisher())
    assert len(a.publishers) == 1
    assert b.publishers == []


def test_two_publishers_receive_everything_in_order() -> None:
    run = make_run(frames=4, run=3)
    first, second = CollectingPublisher(), CollectingPublisher()
    run_chain(ListListener(run), PassThrough(), first, second)
    assert first.messages == run
    assert second.messages == run
    assert all(a is b for a, b in zip(first.messages, second.messages, strict=True))
    assert len(first.events) == 4


def test_compose_without_operator_uses_pass_through() -> None:
    sink = CollectingPublisher()
    listener = compose(ListListener(make_run(frames=2)), None, sink)
    assert isinstance(listener.operator, PassThrough)
    assert listener.operator.publishers == [sink]
    listener.start()
    assert [type(m) for m in sink.messages] == [Start, Event, Event, Stop]


# ---------------------------------------------------------------- lifecycle


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []


class RecordingPublisher(CollectingPublisher):
    def __init__(self, log: Recorder, name: str) -> None:
        super().__init__()
        self.log, self.name = log, name

    def setup(self) -> None:
        self.log.calls.append(f"{self.name}.setup")

    def publish(self, message: Message) -> None:
        self.log.calls.append(f"{self.name}.publish")
        super().publish(message)

    def close(self) -> None:
        self.log.calls.append(f"{self.name}.close")


class RecordingOperator(PassThrough):
    def __init__(self, log: Recorder) -> None:
        self.log = log

    def setup(self) -> None:
        self.log.calls.append("op.setup")

    def close(self) -> None:
        self.log.calls.append("op.close")


class RecordingListener(ListListener):
    def __init__(self, log: Recorder, messages: list[Message], fail: bool = False) -> None:
        super().__init__(messages)
        self.log, self.fail = log, fail

    def setup(self) -> None:
        self.log.calls.append("listener.setup")

    def start(self) -> None:
        self.log.calls.append("listener.start")
        super().start()
        if self.fail:
            raise RuntimeError("source broke")

    def close(self) -> None:
        self.log.calls.append("listener.close")


def test_hooks_are_called_in_order() -> None:
    log = Recorder()
    run_chain(
        RecordingListener(log, [Event()]),
        RecordingOperator(log),
        RecordingPublisher(log, "p1"),
        RecordingPublisher(log, "p2"),
    )
    assert log.calls == [
        "p1.setup",
        "p2.setup",
        "op.setup",
        "listener.setup",
        "listener.start",
        "p1.publish",
        "p2.publish",
        "listener.close",
        "op.close",
        "p1.close",
        "p2.close",
    ]


def test_close_hooks_run_even_when_start_fails() -> None:
    log = Recorder()
    with pytest.raises(RuntimeError, match="source broke"):
        run_chain(
            RecordingListener(log, [], fail=True),
            RecordingOperator(log),
            RecordingPublisher(log, "p"),
        )
    assert log.calls[-3:] == ["listener.close", "op.close", "p.close"]


# ---------------------------------------------------------------- stopping


class StopAfter(Publisher):
    """Asks the listener to stop once it has seen ``n`` messages."""

    def __init__(self, listener: Listener, n: int) -> None:
        self.listener, self.n = listener, n
        self.seen: list[Message] = []

    def publish(self, message: Message) -> None:
        self.seen.append(message)
        if len(self.seen) == self.n:
            self.listener.stop()


def test_stop_makes_list_listener_return_early() -> None:
    run = make_run(frames=10)
    listener = ListListener(run)
    stopper = StopAfter(listener, 3)
    run_chain(listener, PassThrough(), stopper)
    assert stopper.seen == run[:3]
    assert listener.stopping


def test_stop_before_start_delivers_nothing() -> None:
    sink = CollectingPublisher()
    listener = compose(ListListener(make_run(frames=2)), PassThrough(), sink)
    assert not listener.stopping
    listener.stop()
    listener.start()
    assert sink.messages == []


def test_stop_from_another_thread() -> None:
    delivered = threading.Event()
    release = threading.Event()

    class Blocking(Publisher):
        def __init__(self) -> None:
            self.count = 0

        def publish(self, message: Message) -> None:
            self.count += 1
            delivered.set()
            assert release.wait(5)

    def endless() -> Iterator[Message]:
        while True:
            yield Event()

    publisher = Blocking()
    listener = ListListener([])
    listener.messages = endless()  # type: ignore[assignment]
    compose(listener, PassThrough(), publisher)
    worker = threading.Thread(target=listener.start)
    worker.start()
    assert delivered.wait(5)
    listener.stop()
    release.set()
    worker.join(5)
    assert not worker.is_alive()
    assert publisher.count == 1


# ---------------------------------------------------------------- wiring mistakes


def test_listener_without_operator_raises_a_clear_runtime_error() -> None:
    listener = ListListener([Event()])
    with pytest.raises(RuntimeError, match=r"ListListener has no operator; call set_operator"):
        listener.start()
    with pytest.raises(RuntimeError, match="no operator"):
        _ = listener.operator


def test_subclasses_need_not_call_super_init() -> None:
    class Bare(Listener):
        def __init__(self) -> None:
            self.option = 1

        def start(self) -> None:
            self.deliver(Event(seq=1))

    sink = CollectingPublisher()
    bare = compose(Bare(), PassThrough(), sink)
    assert not bare.stopping
    bare.start()
    assert [m.seq for m in sink.messages] == [1]


def test_make_run_is_numbered_as_documented() -> None:
    run = make_run(frames=3, shape=(2, 5), dtype="float32", run=8, data={"s": 1})
    assert isinstance(run[0], Start)
    assert run[0].data == {"s": 1}
    assert isinstance(run[-1], Stop)
    assert [(type(m).__name__, m.run, m.seq) for m in run] == [
        ("Start", 8, 0),
        ("Event", 8, 0),
        ("Event", 8, 1),
        ("Event", 8, 2),
        ("Stop", 8, 3),
    ]
    event = run[1]
    assert isinstance(event, Event)
    assert isinstance(event.payload, np.ndarray)
    assert (event.payload.shape, event.payload.dtype) == ((2, 5), np.float32)


def test_outside_drops_are_counted_with_the_stage_drops() -> None:
    # An end that lost nothing says so by default.
    assert CollectingPublisher().drops() == {}
    assert ListListener([]).drops() == {}

    counters = StageCounters("pub", 0)
    counters.drops["publish_error"] += 2
    link = counters.link("a__pub", "in")
    link.drop("bad_control")
    snap = counters.snapshot({"refused": 3, "publish_error": 1})
    assert snap["drops"] == {"publish_error": 3, "refused": 3}
    assert snap["dropped"] == 3 + 3 + 1
    # the counters themselves are not changed by a snapshot
    assert counters.snapshot()["drops"] == {"publish_error": 2}
