"""The three stage roles, as in the original class diagram.

A ``Listener`` holds an ``Operator``; an ``Operator`` holds ``Publisher``\\ s. Inside every
stage process the runtime wires exactly this chain (see DESIGN §3): a user writes one
class for one role, and the ZMQ link ends are themselves a Listener and a Publisher.

Subclasses need not call ``super().__init__()``: the few attributes the base classes
keep are created on first use, so a stage's ``__init__`` can be nothing but its
options (which the topology converts from the INI by their annotations).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeAlias

from arroyo.message import Message

Result: TypeAlias = Message | Iterable[Message] | None


class _Live:
    """What every stage class shares: options that may change while it runs."""

    #: Names of ``__init__`` options that ``arroyo set`` may change while the stage
    #: runs; their values are converted like the INI's. Empty: none.
    live_options: ClassVar[tuple[str, ...]] = ()

    def apply_live(self, changes: dict[str, Any]) -> None:
        """Take new values of live options (``{name: converted value}``, names from
        ``live_options``). Called from the stage's main thread between two messages,
        on every worker, never during ``process``, ``publish`` or ``deliver``; a
        worker that starts later gets the values as ``__init__`` arguments instead.
        Default: set the attributes of the same names. Raise ``ValueError`` to refuse
        a change: it is logged and shown in ``arroyo status``, and nothing changes."""
        for name, value in changes.items():
            setattr(self, name, value)


class _Reports(_Live):
    """What a stage class may report of itself beside the runtime's counters: every
    listener, operator and publisher (an operator that drops events it cannot use,
    the pyFAI stage say, reports them here)."""

    def stats(self) -> dict[str, Any]:
        """Figures of this end's own, shown beside the stage's counters in ``arroyo
        status`` (a viewer's browsers and skipped frames, say): numbers or short
        strings by name. Read about once a second from the stats thread, like
        ``drops``: keep it cheap and return a new dict. Default: none."""
        return {}

    def drops(self) -> dict[str, int]:
        """Messages this stage lost on purpose or on the outside world's side, by reason
        (a value it could not decode, a write the far side refused, a frame of the
        wrong shape...), counted since ``setup``.

        The runtime reads this about once a second, from its stats thread, and adds it
        to the stage's drops in ``arroyo status`` and the metrics; keep it cheap and
        return a plain dict of counts (a copy of your counter). Default: nothing lost.
        """
        return {}


class _OutsideEnd(_Reports):
    """What the two ends that face the outside world share."""


class Publisher(_OutsideEnd, ABC):
    """Gives messages to the outside world (a viewer, Redis, a file) or to the next stage."""

    def setup(self) -> None:
        """Acquire resources (open files, connect). Called once, before the first publish."""

    @abstractmethod
    def publish(self, message: Message) -> None:
        """Deliver one message.

        Called from the stage's main thread, one message at a time, in stream order.
        May block: a publisher that cannot keep up slows its stage down (backpressure)
        rather than losing messages. An exception is logged and counted by the runtime
        with the message's run and sequence number; the stage goes on.
        """

    def close(self) -> None:
        """Flush and release resources. Called once, after the last publish."""


class Operator(_Reports, ABC):
    """Processes messages and hands the results to its publishers."""

    @property
    def publishers(self) -> list[Publisher]:
        try:
            return self.__dict__["_publishers"]
        except KeyError:
            return self.__dict__.setdefault("_publishers", [])

    def add_publisher(self, publisher: Publisher) -> None:
        self.publishers.append(publisher)

    def remove_publisher(self, publisher: Publisher) -> None:
        self.publishers.remove(publisher)

    def setup(self) -> None:  # an optional hook
        """Acquire resources. Called once, before the first message."""

    @abstractmethod
    def process(self, message: Message) -> Result:
        """Turn one message into zero, one or several messages.

        Return a Message, an iterable of Messages, or None to drop it. Called from the
        stage's main thread, one message at a time, in the order received; may take as
        long as it needs (the input link holds further messages meanwhile). Returned
        messages without a run id inherit the input's run and sequence number.
        ``Start`` and ``Stop`` pass through here too: return them (the default for
        a subclass that only cares about events is to return them unchanged), or a
        rebuilt one with new ``data``. Runs belong to the listener that makes them: in
        a stage process a Start or Stop returned for anything but that same boundary,
        or an event of another run, is refused and counted (``built_boundary``,
        ``foreign_run``), and a boundary not returned is forwarded anyway
        (docs/stages.md, "What Operator.process may return").
        """

    def close(self) -> None:  # an optional hook
        """Release resources. Called once, after the last message."""

    def handle(self, message: Message) -> list[Message]:
        """Process ``message`` and publish every result; returns the results."""
        outputs = outputs_of(self.process(message), message)
        for out in outputs:
            for publisher in self.publishers:
                publisher.publish(out)
        return outputs


class Listener(_OutsideEnd, ABC):
    """Takes messages from the outside world (or a previous stage) and hands them on."""

    @property
    def operator(self) -> Operator:
        op = self.__dict__.get("_operator")
        if op is None:
            msg = f"{type(self).__name__} has no operator; call set_operator() first"
            raise RuntimeError(msg)
        return op

    def set_operator(self, operator: Operator) -> None:
        self.__dict__["_operator"] = operator

    def handed_on(self) -> Callable[[], bool] | None:
        """A check of everything delivered so far: it turns True once the stages after
        this one have taken it (consumed it, and passed on what it made), so that a
        broker end may acknowledge it to its broker. None where that cannot be told (a
        PUB link, or no stage process around this listener): ``deliver`` returning is
        all there is to go by. Call it, and the check, from the thread that delivers."""
        handoff = self.__dict__.get("_handoff")
        return handoff() if handoff is not None else None

    def set_handoff(self, handoff: Callable[[], Callable[[], bool] | None]) -> None:
        """Called by the runtime (``arroyo.runtime.handoff``)."""
        self.__dict__["_handoff"] = handoff

    @property
    def stop_requested(self) -> threading.Event:
        """Set by ``stop()``; ``start()`` loops should check it between messages."""
        event = self.__dict__.get("_stop_requested")
        if event is None:  # (not setdefault: that would build an Event on every call)
            event = self.__dict__.setdefault("_stop_requested", threading.Event())
        return event

    @property
    def stopping(self) -> bool:
        return self.stop_requested.is_set()

    def setup(self) -> None:
        """Acquire resources (connect to the source). Called once, before ``start``."""

    @abstractmethod
    def start(self) -> None:
        """Produce messages and hand each to ``self.deliver(message)``.

        Blocks in the stage's main thread until the source is exhausted or ``stop()``
        is called, then returns. ``deliver`` may block while the next stage is full
        (backpressure). A run that is open when ``start`` returns is closed by the
        runtime with a ``Stop`` marked ``interrupted``.
        """

    def stop(self) -> None:
        """Ask ``start()`` to return soon. Non-blocking; may be called from a signal
        handler or another thread. Override to also wake a blocking read, and call
        ``super().stop()``."""
        self.stop_requested.set()

    def deliver(self, message: Message) -> None:
        """Hand one message to the operator (and through it to the publishers)."""
        self.operator.handle(message)

    def close(self) -> None:
        """Release resources. Called once, after ``start`` returned."""


class PassThrough(Operator):
    """The operator of listener and publisher stages: forwards every message as is."""

    def process(self, message: Message) -> Result:
        return message


def outputs_of(result: Result, source: Message) -> list[Message]:
    """Normalise what ``process`` returned to a list, stamping run/seq where unset."""
    if result is None:
        return []
    if isinstance(result, Message):
        outputs = [result]
    elif isinstance(result, Iterable):
        outputs = list(result)
    else:  # list(5) would say "'int' object is not iterable", naming no culprit
        msg = (
            f"process() returned {type(result).__name__}, expected a Message, "
            "an iterable of Messages or None"
        )
        raise TypeError(msg)
    for out in outputs:
        if not isinstance(out, Message):
            msg = f"process() returned {type(out).__name__}, expected a Message"
            raise TypeError(msg)
        if out is source:
            continue
        if out.run == 0:
            out.run = source.run
            out.seq = source.seq
        if not out.routing and type(out) is type(source):
            # A rebuilt Start/Stop keeps the run's bookkeeping (origin, worker set).
            out.routing = source.routing
    return outputs
