"""A broker listener acknowledges a message only once the next stage has taken it
(arroyo.runtime.handoff), not a set time after ``deliver`` returned: while the next
stage is frozen, the broker keeps what Arroyo has not taken, and when the listener and
the next stage are both killed, it delivers that again.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from tests.conftest import read_jsonl, wait_for

pytest.importorskip("pika", reason="pika is not installed (arroyo[rabbitmq])")

from tests.integration.test_rabbitmq import (  # (needs pika)
    KILLED,
    URL,
    amqp,  # noqa: F401  (the fixture)
    broker,  # noqa: F401  (the autouse fixture: the shared broker, started if need be)
    json_run,
)

pytestmark = pytest.mark.timeout(90)
PREFETCH = 50  # KILLED's: listener -> Delay (0.2-0.6 ms an event) -> a sink


def test_what_the_next_stage_has_not_taken_stays_with_the_broker(amqp, topo, stages, tmp_path):  # noqa: F811
    events = 4000
    inbox = amqp.queue("in")
    path = topo(KILLED.replace("URL", URL).replace("PREFIX", amqp.prefix))
    assert f"prefetch = {PREFETCH}" in KILLED
    amqp.send(inbox, json_run(0, events))
    stages.start(path, "sink")
    slow = stages.start(path, "slow")
    lis = stages.start(path, "lis")
    out = tmp_path / "out.jsonl"

    def seen() -> Counter[int]:
        return Counter(r["metadata"]["i"] for r in read_jsonl(out) if r["kind"] == "Event")

    wait_for(lambda: len(seen()) >= 50, timeout=30)
    slow.send_signal(signal.SIGSTOP)  # the next stage takes nothing more
    time.sleep(1.0)  # (well past the ack_delay_ms a listener waits without a check)
    # the listener holds its prefetch window, unacknowledged: the rest stays queued
    assert amqp.unacked(inbox) == PREFETCH, stages.dump()
    assert amqp.ready(inbox) > 0
    lis.send_signal(signal.SIGKILL)
    lis.wait(10)
    slow.send_signal(signal.SIGKILL)  # and what it held is gone with it
    slow.wait(10)
    stages.start(path, "slow")
    stages.start(path, "lis")
    wait_for(lambda: len(seen()) == events, timeout=40)  # every event at least once
    assert sorted(seen()) == list(range(events))
