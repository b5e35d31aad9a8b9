"""The NATS ends without a server: options, start positions, stream subjects, the
ack-after-hand-on window, and the missing extra."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import pytest

from arroyo.io._nats_client import start_position, stream_subjects
from arroyo.io.broker import CHECK_EVERY, HandedOn, KeyTemplate


def test_deliver_positions():
    assert start_position("new") == {"deliver_policy": "new"}
    assert start_position("all") == {"deliver_policy": "all"}
    assert start_position("seq:42") == {"deliver_policy": "by_start_sequence", "opt_start_seq": 42}
    when = start_position("time:2026-12-04T18:00:00")["opt_start_time"]
    assert when == dt.datetime(2026, 12, 4, 18, tzinfo=dt.UTC)  # no offset: UTC
    later = start_position("time:2026-12-04T18:00:00+02:00")["opt_start_time"]
    assert later.utcoffset() == dt.timedelta(hours=2)
    for bad in ("newest", "seq:0", "seq:x", "time:yesterday", "all:1", ""):
        with pytest.raises(ValueError, match="deliver must be"):
            start_position(bad)


def test_stream_subjects_of_a_subject_template():
    assert stream_subjects(KeyTemplate("frames.{detector}")) == "frames.*"
    assert stream_subjects(KeyTemplate("a.{x}.b.{run:03d}")) == "a.*.b.*"
    assert stream_subjects(KeyTemplate("frames.raw")) == "frames.raw"
    assert stream_subjects(KeyTemplate("frames.det-{detector}.x")) == "frames.>"


def test_handed_on_items_are_due_after_the_delay():
    handed: HandedOn[int] = HandedOn(0.05)
    assert handed.wait(0.2) == 0.2 and handed.due() == []
    handed.add(1)
    handed.add(2)
    assert handed.due() == [] and 0 < handed.wait(0.2) <= 0.05
    time.sleep(0.06)
    handed.add(3)
    assert handed.due() == [1, 2] and len(handed) == 1
    assert handed.all() == [3] and len(handed) == 0


def test_handed_on_items_with_a_check_are_due_once_the_next_stage_took_them():
    # the check is Listener.handed_on()'s: True once the link's credit came back
    took = {1: False, 2: False}
    handed: HandedOn[int] = HandedOn(0.0)  # (no delay: only the checks hold items back)
    handed.add(1, lambda: took[1])
    handed.add(2, lambda: took[2])
    handed.add(3)  # no check (a PUB link): due after the delay, but in order
    assert handed.due() == [] and handed.wait(0.2) == CHECK_EVERY
    took[2] = True
    assert handed.due() == []  # the oldest first: 1 is not taken yet
    took[1] = True
    assert handed.due() == [1, 2, 3] and len(handed) == 0


def test_without_nats_py_the_core_imports_and_a_stage_names_the_extra():
    code = """
import sys
sys.modules["nats"] = None  # as if it were not installed
import arroyo.io.nats as ends
from arroyo.errors import ConfigError
for make in (lambda: ends.NatsListener(subject="s", stream="S"),
             lambda: ends.NatsPublisher(subject="s")):
    try:
        make()
    except ConfigError as e:
        print(e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    named = "needs nats-py, which is not installed: pip install 'arroyo[nats]'"
    assert done.stdout.count(named) == 2


def test_options_refused_at_construction():
    pytest.importorskip("nats")
    from arroyo.io.nats import NatsListener, NatsPublisher

    with pytest.raises(ValueError, match="needs the stream's name"):
        NatsListener(subject="frames.>")
    with pytest.raises(ValueError, match="deliver must be"):
        NatsListener(subject="frames.>", stream="S", deliver="oldest")
    with pytest.raises(ValueError, match="codec 'array'"):
        NatsListener(subject="frames.>", stream="S", codec="array")
    with pytest.raises(ValueError, match="not a key template"):
        NatsPublisher(subject="frames.{")
    NatsListener(subject="frames.>", mode="core")  # core mode needs no stream


def test_loop_thread_runs_coroutines_and_callbacks_off_the_main_thread():
    import asyncio
    import threading

    from arroyo.io._asyncio_thread import LoopThread

    loop = LoopThread("test-loop")
    seen: list[str] = []

    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    async def forever() -> None:
        await asyncio.sleep(3600)

    assert loop.run(where(), 5) == "test-loop"
    loop.call(lambda: seen.append(threading.current_thread().name))
    pending = loop.submit(forever())
    with pytest.raises(TimeoutError):
        loop.run(forever(), 0.05)
    loop.stop()  # cancels what still runs, joins the thread
    assert seen == ["test-loop"] and pending.cancelled()
    loop.call(seen.append, "after stop")  # a no-op, not an error
    assert seen == ["test-loop"]
