"""``arroyo run TOPOLOGY --inline``: the whole graph in one process, in-memory links.

Same roles and the same Listener -> Operator -> Publisher wiring as the process
deployment, without sockets: for developing and debugging a topology. Every stage runs
one worker; each listener runs in its own thread and a lock keeps the graph
single-threaded below it. Ctrl-C stops the listeners and closes every stage.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from dataclasses import replace
from typing import Any

from arroyo.message import SHARES, Message, Stop, add_up_shares
from arroyo.runtime.boundaries import keep_run
from arroyo.runtime.roles import SourceOperator, build_user_object
from arroyo.stage import Listener, Operator, PassThrough, Publisher, Result, outputs_of
from arroyo.topology import Topology

log = logging.getLogger("arroyo.inline")


class Deliveries:
    """The in-memory links' messages, handed to their next stage in order from one
    queue. A direct call into the next stage would nest a few Python frames per stage,
    and a chain of several hundred stages would overflow the interpreter's stack. One
    thread delivers at a time (``lock``); a stage's outputs are queued behind it."""

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self.queue: deque[tuple[Operator, Message]] = deque()
        self.busy = False

    def put(self, target: Operator, message: Message) -> None:
        with self.lock:
            self.queue.append((target, message))
            if self.busy:
                return  # called from a stage that the loop below is running
            self.busy = True
            try:
                while self.queue:
                    op, m = self.queue.popleft()
                    op.handle(m)
            finally:
                self.busy = False


class InMemoryLink(Publisher):
    """A link as a delivery into the next stage's operator."""

    def __init__(self, target: Operator, deliveries: Deliveries) -> None:
        self.target = target
        self.deliveries = deliveries

    def publish(self, message: Message) -> None:
        if isinstance(message, Stop) and SHARES in message.data:
            # one worker per stage inline: its shares are the run's totals (as a merge
            # between processes would leave them)
            message = replace(message, data=add_up_shares(message.data, [message]))
        self.deliveries.put(self.target, message)


class KeptRuns(Operator):
    """The user's operator under the same run rules as in a stage process
    (``boundaries.keep_run``): what it may not return is logged and left out."""

    def __init__(self, inner: Operator) -> None:
        self.inner = inner

    def process(self, message: Message) -> Result:
        vetted = keep_run(message, outputs_of(self.inner.process(message), message))
        for reason, out in vetted.refused:
            log.warning(
                "refused a %s returned for %s run %d seq %d (%s)",
                type(out).__name__,
                type(message).__name__,
                message.run,
                message.seq,
                reason,
            )
        return vetted.outputs


def _order(topology: Topology) -> list[str]:
    """Every stage after all the stages it feeds (sinks first), walked with a stack of
    its own: no recursion, however long the chain."""
    done: dict[str, None] = {}
    for root in topology.stages:
        if root in done:
            continue
        stack = [(root, iter(topology.outputs_of(root)))]
        while stack:
            name, targets = stack[-1]
            target = next((t.target for t in targets if t.target not in done), None)
            if target is None:
                stack.pop()
                done.setdefault(name)
            elif all(target != n for n, _ in stack):  # (a cycle is refused by check)
                stack.append((target, iter(topology.outputs_of(target))))
    return list(done)


def run_inline(topology: Topology) -> None:
    deliveries = Deliveries(threading.RLock())
    operators: dict[str, Operator] = {}
    users: dict[str, Any] = {}
    listeners: list[Listener] = []
    for name in _order(topology):
        spec = topology.stages[name]
        user = build_user_object(spec)
        users[name] = user
        if spec.role == "operator":
            op: Operator = KeptRuns(user)
        elif spec.role == "listener":
            op = SourceOperator(f"{name}/0/inline")
            listeners.append(user)
            user.set_operator(op)
        else:
            op = PassThrough()
            op.add_publisher(user)
        for link in topology.outputs_of(name):
            op.add_publisher(InMemoryLink(operators[link.target], deliveries))
        operators[name] = op
    for name, user in users.items():
        if topology.stages[name].role != "listener":
            user.setup()

    def stop(*_: Any) -> None:
        for listener in listeners:
            listener.stop()

    previous = signal.signal(signal.SIGINT, stop)
    threads = [
        threading.Thread(target=_run_listener, args=(lst,), daemon=True) for lst in listeners
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)
        for name in reversed(_order(topology)):
            if topology.stages[name].role != "listener":
                users[name].close()
    log.info("inline run finished")


def _run_listener(listener: Listener) -> None:
    listener.setup()
    try:
        listener.start()
    finally:
        listener.close()
    op = listener.operator
    if isinstance(op, SourceOperator):
        stop = op.close_open({"interrupted": True})
        if stop is not None:
            listener.deliver(stop)
