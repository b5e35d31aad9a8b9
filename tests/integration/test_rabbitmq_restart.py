"""The broker itself restarted mid-run: a RabbitMQ node of the test's own (the shared
one at 5672 is never restarted), listener -> operator -> publisher as stage processes,
a plain pika client producing into a durable queue and reading the far side.

What must hold: both ends reconnect, nothing the producer had handed to the broker is
lost, every duplicate at the far side is accounted for by the ends' counters
(redelivered to the listener, or sent again by the publisher), and the counters
``arroyo status`` shows match what the far side saw.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_ci, wait_for

pika = pytest.importorskip("pika", reason="pika is not installed (arroyo[rabbitmq])")

from tests.integration.test_rabbitmq import CUT, json_run, stats_of  # noqa: E402  (needs pika)
from tests.rabbitmq_server import CannotStart, RabbitServer  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RabbitServer]:
    node = RabbitServer(tmp_path / "rabbitmq")
    try:
        node.start()
    except CannotStart as e:
        if in_ci():
            pytest.fail(f"a private RabbitMQ is required under CI: {e}", pytrace=False)
        pytest.skip(f"cannot start a private RabbitMQ here: {e}")
    try:
        yield node
    finally:
        node.stop(signal.SIGKILL)


class Client:
    """A plain pika client of the private node that connects again after a restart."""

    def __init__(self, url: str) -> None:
        self.params = pika.URLParameters(url)
        self.params.connection_attempts = 1
        self.params.socket_timeout = 2

    def channel(self) -> Any:
        return pika.BlockingConnection(self.params).channel()

    def declare(self, inbox: str, outbox: str, exchange: str, key: str) -> None:
        ch = self.channel()
        ch.queue_declare(inbox, durable=True)
        ch.queue_declare(outbox, durable=True)
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_bind(outbox, exchange, key)
        ch.connection.close()

    def send(self, queue: str, bodies: list[bytes]) -> None:
        ch = self.channel()
        ch.confirm_delivery()  # the producer's own promise: the broker has them all
        persistent = pika.BasicProperties(delivery_mode=2)
        for body in bodies:
            ch.basic_publish("", queue, body, persistent)
        ch.connection.close()

    def ready(self, queue: str) -> int:
        """Messages ready on ``queue``; -1 while the node does not answer."""
        try:
            ch = self.channel()
        except pika.exceptions.AMQPError:
            return -1
        try:
            return int(ch.queue_declare(queue, durable=True, passive=True).method.message_count)
        finally:
            ch.connection.close()

    def take(self, queue: str, until: Callable[[list[bytes]], bool], timeout: float) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        ch = self.channel()
        for method, _, body in ch.consume(queue, auto_ack=True, inactivity_timeout=0.2):
            if method is not None:
                got.append(body)
            if until(got) or time.monotonic() > deadline:
                break
        ch.connection.close()
        return got


def counters(tmp_path: Path, key: str) -> dict[str, Any]:
    """The stage's counters as ``arroyo status`` reads them (its stats file)."""
    stats = stats_of(tmp_path, key)
    return {**stats.get("extra", {}), "drops": stats.get("drops")}


def test_broker_restarted_mid_run_loses_nothing_and_status_matches(server, topo, stages, tmp_path):
    events = 3000
    client = Client(server.url)
    client.declare("p.in", "p.out", "p.x", "frames.pilatus")
    client.send("p.in", json_run(0, events))
    # the chain of the cut-connection test, on a durable queue, persistent
    path = topo(CUT.replace("URL", server.url).replace("PREFIX", "p").replace("DURABLE", "true"))
    for key in ("pub", "slow", "lis"):
        stages.start(path, key)
    wait_for(lambda: client.ready("p.out") >= 500, timeout=30)  # both ends busy
    assert client.ready("p.in") > 0, "the run ended before the restart"
    t0 = time.monotonic()
    server.stop(signal.SIGTERM)
    server.start()
    print(f"broker down and up again in {time.monotonic() - t0:.1f}s")

    def stop_seen(got: list[bytes]) -> bool:
        return any(json.loads(body)["kind"] == "stop" for body in got[-50:])

    got = client.take("p.out", stop_seen, timeout=60)
    records = [json.loads(body) for body in got]
    copies = Counter(r["metadata"]["i"] for r in records if r["kind"] == "event")
    assert sorted(copies) == list(range(events)), stages.dump()  # nothing lost
    wait_for(lambda: client.ready("p.in") == 0, timeout=10)  # every one acknowledged
    assert all(c == 0 for c in stages.stop_all(["lis.0", "slow.0", "pub.0"]).values())

    lis, pub = counters(tmp_path, "lis.0"), counters(tmp_path, "pub.0")
    assert lis["reconnects"] >= 1 and pub.get("sent"), (lis, pub)
    assert lis["drops"] == {} and pub["drops"] == {}, (lis, pub)
    twice = sum(n - 1 for n in copies.values())
    # what the listener took: every message once, plus those the broker gave again
    assert events + 2 <= lis["received"] <= events + 2 + lis["duplicates"], lis
    # what the far side holds: every confirmed message, plus at most those sent again
    assert pub["sent"] <= len(records) <= pub["sent"] + pub["resent"], (len(records), pub)
    assert twice <= lis["duplicates"] + pub["resent"], (twice, lis, pub)
    for key in ("lis.0", "pub.0"):
        assert "retrying with backoff" in stages.log(key), stages.log(key)
        assert "connected again" in stages.log(key), stages.log(key)
    print(f"far side: {len(records)} messages, {twice} duplicates; listener {lis}; publisher {pub}")
