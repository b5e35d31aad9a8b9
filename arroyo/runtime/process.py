"""One stage process: links in -> operator -> links out (DESIGN §3, §7).

``StageProcess(topology, stage, worker).run()`` builds the stage's Listener ->
Operator -> Publisher(s) chain around the user's class, runs it in the main thread,
and on SIGTERM/SIGINT stops taking input, finishes and forwards what is in flight,
says EOS on its outputs, and returns 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import zmq

from arroyo import wire
from arroyo.errors import ConfigError, WireError
from arroyo.message import Event, Message
from arroyo.runtime import malloc
from arroyo.runtime.credit import CreditReceiver, CreditSender
from arroyo.runtime.drain import (
    DRAIN_TIMEOUT,
    Deadline,
    StuckAtStop,
    count_left,
    count_unread,
    leave_stuck,
    received,
)
from arroyo.runtime.handoff import HandOff
from arroyo.runtime.link import CREDIT_IDLE_DELAY, identity
from arroyo.runtime.live import Live, live_options
from arroyo.runtime.merge import Item, RunMerger, partial_stop
from arroyo.runtime.net import Net
from arroyo.runtime.pubsub import PubSender, SubReceiver
from arroyo.runtime.roles import (
    LinkPublisher,
    SourceOperator,
    StageFailed,
    StageOperator,
    build_user_object,
)
from arroyo.runtime.stats import (
    RunReport,
    StageCounters,
    StatsWriter,
    fold_predecessor,
    replace_file,
    stats_path,
    stopped_cleanly,
)
from arroyo.stage import Listener, Operator, PassThrough, Publisher
from arroyo.topology import Topology

log = logging.getLogger("arroyo.stage")

PUB_JOIN_TIMEOUT = 5.0
# After SIGTERM a stage waits this long for its upstream to finish (EOS) before it asks
# to leave (BYE). supervisord signals a whole group at once, in any order: the grace
# lets every upstream see its own SIGTERM first, and a stopping upstream never
# acknowledges a BYE, so a chain stop drains front to back; a stage stopped alone (or
# scaled down) leaves after the grace, having lost nothing.
LEAVE_GRACE = 1.0


class StageProcess:
    """Runs one worker of one stage until stopped."""

    def __init__(self, topology: Topology, stage: str, worker: int = 0) -> None:
        self.topology = topology
        self.spec = topology.stage(stage)
        if self.spec.tune_malloc:
            # before the user's object exists: its first frame-sized buffers and every
            # temporary after them stay on the heap (arroyo.runtime.malloc)
            tuned = malloc.tune()
            log.debug("malloc thresholds set: %s", tuned or "none (not glibc, or from env)")
        self.worker = worker
        self.me = identity(stage, worker)
        self.counters = StageCounters(stage, worker)
        self.stop_requested = threading.Event()
        self.stop_since = 0.0
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.inputs: list[tuple[CreditReceiver | SubReceiver, RunMerger]] = []
        self.outputs: list[CreditSender | PubSender] = []
        self.listener: Listener | None = None
        self.outside_end: Listener | Publisher | None = None  # the user's, if it is one
        self.op: StageOperator | None = None
        self.deadline = Deadline(lambda: self.op is not None and self.op.in_user)
        self.ready = False
        self.stats: StatsWriter | None = None
        self.user: Any = None
        self.live: Live | None = None  # when the class has live options
        self.net: Net | None = None

    # -- set-up --------------------------------------------------------------------

    def _open_links(self) -> None:
        spec = self.spec
        self.net = net = Net.for_stage(self.topology, spec)
        for link in self.topology.outputs_of(spec.name):
            counters = self.counters.link(link.name, "out")
            if link.pattern == "pub":
                self.outputs.append(
                    PubSender(self.ctx, link, self.me, counters, PUB_JOIN_TIMEOUT, net)
                )
            else:
                self.outputs.append(CreditSender(self.ctx, link, self.me, counters, net))
        for link in self.topology.inputs_of(spec.name):
            counters = self.counters.link(link.name, "in")
            end: CreditReceiver | SubReceiver
            if link.pattern == "pub":
                end = SubReceiver(self.ctx, link, self.me, counters, spec.max_message_bytes, net)
            else:
                end = CreditReceiver(
                    self.ctx,
                    link,
                    self.me,
                    counters,
                    spec.hwm,
                    spec.hwm_bytes,
                    spec.max_message_bytes,
                    net,
                )
            # A stage that is not scalable receives whole runs: it merges and reports
            # each of them, whether one upstream process sends them or many.
            upstream = self.topology.stages[link.source]
            stopped = partial(stopped_cleanly, self.topology)
            late = partial(end.counters.drop, "late")
            merger = RunMerger(
                link.name,
                not spec.scalable or upstream.scalable,
                end.alive,
                self._report,
                end.finished,
                stopped,
                late,
                named=upstream.scalable,
                pub=link.pattern == "pub",
            )
            self.inputs.append((end, merger))

    def _report(self, report: RunReport) -> None:
        self.counters.report(report)
        level = logging.INFO if report.complete else logging.WARNING
        log.log(level, "%s", report.line())

    def _give_up(self) -> bool:
        """While stopping, a send that has waited past drain_timeout is abandoned."""
        return (
            self.stop_requested.is_set()
            and time.monotonic() - self.stop_since > self.spec.drain_timeout
        )

    def _chain(self, user: Any) -> StageOperator:
        publishers: list[Publisher] = [LinkPublisher(end, self._give_up) for end in self.outputs]
        if self.spec.role == "operator":
            inner: Operator = user
        elif self.spec.role == "listener":
            inner = SourceOperator(self.me, self._last_run(), self._save_run)
        else:
            inner = PassThrough()
            publishers = [user]
        keep_runs = self.spec.role != "listener"  # a source makes the runs
        user_inner = self.spec.role == "operator"
        op = StageOperator(inner, self.counters, self.spec.on_error, keep_runs, user_inner)
        op.live, op.live_target = self.live, user
        for p in publishers:
            op.add_publisher(p)
        return op

    def _run_file(self) -> Path:
        return stats_path(self.topology, self.spec.name, self.worker).with_suffix(".run")

    def _last_run(self) -> int:
        """The run id this source used last, so that run ids keep counting up across
        restarts instead of starting at 1 again."""
        path = self._run_file()
        try:
            return int(path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s): run ids start again at 1", path, e)
            return 0

    def _save_run(self, run: int) -> None:
        # One small write per run, before the Start leaves, so that a crash cannot
        # reuse the id. Replaced whole and fsynced: a write that fails (a full disk)
        # keeps the last id recorded, where an in-place write would leave nothing.
        try:
            path = self._run_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, str(run).encode(), durable=True)
        except OSError as e:
            log.warning("cannot record run id %d: %s", run, e)

    def _mark_ready(self) -> None:
        """Links open, the user's object built and set up: say so in the stats file at
        once (``arroyo up`` waits for it; a stage that fails before it never started)."""
        self.ready = True
        if self.stats is not None:
            self.stats.write()

    def _on_signal(self, *_: Any) -> None:
        """Nothing to do here: installing a handler is what makes Python write the
        signal to the wakeup pipe, and the watcher thread does the stopping. (This
        runs between two bytecodes of the main thread, which may hold the very lock
        a stop would take.)"""

    def _watch_signal(self, fd: int) -> None:
        """Sleeps in a read of the signal wakeup pipe, where Python's C-level handler
        writes the number of each signal it catches: a stop is seen at once, and an
        idle stage spends nothing on watching. Reads until run() closes the pipe."""
        wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
        try:
            while data := os.read(fd, 64):
                if wanted & set(data):
                    self.request_stop()
        except OSError:
            pass
        finally:
            os.close(fd)

    def _catch_signals(self) -> Callable[[], None]:
        """SIGTERM and SIGINT start a clean stop; returns what undoes it."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(
            target=self._watch_signal, args=(read_fd,), daemon=True, name="arroyo-signal"
        )
        watcher.start()
        undo_deadline = self.deadline.install()

        def undo() -> None:
            undo_deadline()
            signal.set_wakeup_fd(previous)
            os.close(write_fd)  # the watcher reads end-of-file and closes its end

        return undo

    def request_stop(self, *_: Any) -> None:
        if not self.stop_requested.is_set():
            self.stop_since = time.monotonic()
            self.stop_requested.set()
            for end in self.outputs:
                end.stopping = True
            if self.listener is not None:
                self.listener.stop()
            else:
                self.deadline.arm(self.spec.drain_timeout)

    # -- running -------------------------------------------------------------------

    def _make_user_object(self) -> Any:
        """The user's object, built with the live values kept in run_dir, if any."""
        try:
            cls = self.spec.load_class()
        except Exception:  # build_user_object reports it
            return build_user_object(self.spec)
        if live_options(cls):
            self.live = Live(self.topology.run_dir, self.spec.name, cls)
            if self.live.values:
                log.info("live values kept in run_dir: %s", self.live.describe())
        self.user = build_user_object(self.spec, self.live.values if self.live else None)
        if self.live is not None:
            self.live.start()
        return self.user

    def _idle(self) -> None:
        """Nothing to do between two messages: a live change applies now."""
        live = self.live
        if live is not None and live.pending is not None:
            live.apply_pending(self.user, None, self.counters.current_run)

    def run(self) -> int:
        user = self._make_user_object()
        if isinstance(user, Listener | Publisher):
            self.outside_end = user
        release_signals = self._catch_signals()
        path = stats_path(self.topology, self.spec.name, self.worker)
        fold_predecessor(path, os.getpid())
        stats = StatsWriter(path, self._stats_snapshot)
        self.stats = stats
        stats.start()
        try:
            try:
                self._open_links()
            except OSError as e:
                msg = f"stage {self.spec.name}: {e}"
                raise ConfigError(msg) from e
            op = self.op = self._chain(user)
            for p in op.publishers:
                p.setup()
            if self.spec.role == "operator":
                user.setup()
            log.info("started as %s", self.me)
            if self.spec.role == "listener":
                self._run_source(user, op)
            else:
                self._mark_ready()
                if not self._run_stage(op):
                    # the user's object never returned: closing it could hang as well
                    log.warning(
                        "stopped at drain timeout, leaving %s unclosed", self.spec.class_path
                    )
                    stats.exit = "stopped"
                    return 0
            if self.spec.role == "operator":
                user.close()
            for p in op.publishers:
                p.close()
            stats.exit = "stopped"
        except StageFailed as e:
            log.error("stopping: %s", e)
            return 1
        finally:
            if self.live is not None:
                self.live.stop()
            self._close_links()
            stats.stop()
            release_signals()
        log.info("stopped cleanly")
        return 0

    def _run_stage(self, op: StageOperator) -> bool:
        """The stage loop; False if the user's code was stuck at the stop deadline."""
        try:
            self._run_loop(op)
        except StuckAtStop:
            leave_stuck(self.inputs, self.spec.drain_timeout, self.spec.role)
            op.end_open_runs(cut="drain timeout")
            return False
        return True

    def _run_source(self, listener: Listener, op: StageOperator) -> None:
        self.listener = listener
        listener.set_operator(op)
        listener.set_handoff(HandOff(self.outputs).check)
        listener.setup()
        self._mark_ready()
        try:
            if not self.stop_requested.is_set():
                listener.start()
        finally:
            listener.close()
        src = op.inner
        assert isinstance(src, SourceOperator)
        stop = src.close_open({"interrupted": True})
        if stop is not None:
            op.handle(stop)
        if not self.stop_requested.is_set():
            log.info("source finished; idle until stopped")
        while not self.stop_requested.is_set():
            self._service_outputs(200)
            self._idle()

    def _service_outputs(self, timeout_ms: int) -> None:
        poller = zmq.Poller()
        for end in self.outputs:
            for s in end.sockets():
                poller.register(s, zmq.POLLIN)
        if self.outputs:
            poller.poll(timeout_ms)
        else:
            time.sleep(timeout_ms / 1000)
        for end in self.outputs:
            end.service()

    def _run_loop(self, op: StageOperator) -> None:
        poller = zmq.Poller()
        for end, _ in self.inputs:
            for s in end.sockets():
                poller.register(s, zmq.POLLIN)
        for out in self.outputs:
            for s in out.sockets():
                poller.register(s, zmq.POLLIN)
        leaving = False
        owed = False
        cause = "stage stopped"  # why open runs are closed as they stand at the end
        while True:
            # credit owed to a sender goes back within CREDIT_IDLE_DELAY even when idle
            poller.poll(int(CREDIT_IDLE_DELAY * 1000) + 1 if owed else 100)
            busy = False
            for end, merger in self.inputs:
                busy |= self._drain_input(end, merger, op)
                self._dispatch_all(end, op, merger.check_dead())
            for out in self.outputs:
                out.service()
            if not busy:
                for end, _ in self.inputs:
                    end.flush_credit()
                self._idle()
            owed = any(end.credit_pending() for end, _ in self.inputs)
            if self.stop_requested.is_set():
                waited = time.monotonic() - self.stop_since
                if not leaving and waited > LEAVE_GRACE:
                    leaving = True
                    for end, _ in self.inputs:
                        end.leave()
                if all(end.finished() for end, _ in self.inputs) and not busy:
                    break
                if time.monotonic() - self.stop_since > self.spec.drain_timeout:
                    count_unread(self.inputs, self.spec.drain_timeout)
                    cause = "drain timeout"
                    break
        for end, merger in self.inputs:
            self._dispatch_all(end, op, merger.flush(cause))
            for key, start in list(merger.open_runs.items()):
                # This worker leaves mid-run: its share of the run ends here.
                merger.open_runs.pop(key)
                op.handle(partial_stop(start, cut="" if cause == "stage stopped" else cause))

    def _drain_input(
        self, end: CreditReceiver | SubReceiver, merger: RunMerger, op: StageOperator
    ) -> bool:
        items = end.receive()
        for i, (sender, frames) in enumerate(items):
            size = wire.frames_nbytes(frames)
            try:
                message = wire.decode(frames)
            except WireError as e:
                end.counters.drop(e.reason)
                log.warning(
                    "link %s: dropped a bad message from %s: %s", end.link.name, sender or "?", e
                )
                end.consumed(sender, size)
                run = wire.event_run(frames)
                if run is not None and not merger.fan_in:
                    # a worker's share passes through uncounted: its Stop carries the loss
                    # (a stage that merges runs counts it as missing on its own)
                    op.dropped_on_arrival(run, end.link.name)
                continue
            end.counters.count(size, isinstance(message, Event))
            try:
                self._dispatch_all(end, op, merger.push(sender, message, size))
            except StuckAtStop:
                count_left(end.counters, (frames for _, frames in items[i + 1 :]))
                raise
        return bool(items)

    def _dispatch_all(
        self, end: CreditReceiver | SubReceiver, op: StageOperator, items: list[Item]
    ) -> None:
        for i, (sender, size, msg) in enumerate(items):
            try:
                self._dispatch(end, op, sender, size, msg)
            except StuckAtStop:
                # this message and those after it were received and never delivered
                end.counters.drop(DRAIN_TIMEOUT, received(items[i:]))
                raise

    def _dispatch(
        self,
        end: CreditReceiver | SubReceiver,
        op: StageOperator,
        sender: str,
        size: int,
        msg: Message | None,
    ) -> None:
        if msg is not None:
            op.handle(msg)
        if sender:
            end.consumed(sender, size)

    def _close_links(self) -> None:
        for out in self.outputs:
            out.close()
        for end, _ in self.inputs:
            end.close(0)
        if self.net is not None:
            self.net.close()
        self.ctx.term()

    def _stats_snapshot(self) -> dict[str, Any]:
        snap = self.counters.snapshot(self._outside("drops"))
        snap["id"] = self.me
        snap["ready"] = self.ready
        if self.live is not None:
            snap["live"] = self.live.state()
        snap["extra"] = self._outside("stats")
        return snap

    def _outside(self, what: str) -> dict[str, Any]:
        """What the user's own stage class reports of itself (``drops``, ``stats``): its
        listener or publisher, or its operator."""
        end = self.outside_end or self.user
        if not callable(getattr(end, what, None)):
            return {}
        try:
            return dict(getattr(end, what)())
        except Exception as e:  # user code: a broken count must not stop the stats
            log.debug("%s.%s() failed: %s", type(end).__name__, what, e)
            return {}
