"""RabbitListener and RabbitPublisher against the real RabbitMQ at 127.0.0.1:5672.

Every queue and exchange a test uses is named ``arroyo-test-UUID...`` and deleted
afterwards, failed or not. The broker is shared, so no test here restarts it: a cut
connection is made with ``rabbitmqctl close_connection`` on this test's connections
only (they are named after their queue or exchange). test_rabbitmq_restart.py
restarts a node of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.errors import ConfigError
from arroyo.io.codecs import get_codec
from arroyo.io.frames import decode_value
from arroyo.message import Event, Start
from arroyo.testing import make_run
from tests.brokers import arrays_run, listening
from tests.conftest import in_ci, read_jsonl, runs_of, wait_for

try:
    import pika
except ImportError:
    if in_ci():
        pytest.fail("pika is required under CI (pip install 'arroyo[rabbitmq]')", pytrace=False)
    pytest.skip("pika is not installed (pip install 'arroyo[rabbitmq]')", allow_module_level=True)

from arroyo.io.rabbitmq import RabbitListener, RabbitPublisher  # (needs pika)

pytestmark = pytest.mark.timeout(60)

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/%2F"


def _connect() -> pika.BlockingConnection:
    params = pika.URLParameters(URL)
    params.connection_attempts = 1
    params.socket_timeout = 2
    return pika.BlockingConnection(params)


def _broker_problem() -> str | None:
    try:
        _connect().close()
    except Exception as e:  # whatever pika raises for a broker that is not there
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    """The shared broker; started with ``rabbitmq-server -detached`` if it is down."""
    problem = _broker_problem()
    server = shutil.which("rabbitmq-server")
    if problem is not None and server is not None:
        subprocess.run([server, "-detached"], capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + 40
        while problem is not None and time.monotonic() < deadline:
            time.sleep(0.5)
            problem = _broker_problem()
    if problem is not None:
        why = f"no RabbitMQ at {HOST}:{PORT} ({problem})"
        if in_ci():
            pytest.fail(f"RabbitMQ is required under CI: {why}", pytrace=False)
        pytest.skip(why)


def rabbitmqctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        if in_ci():
            pytest.fail("rabbitmqctl is required under CI", pytrace=False)
        pytest.skip("rabbitmqctl not found on PATH")
    done = subprocess.run(
        [ctl, "-q", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


class Amqp:
    """This test's names and a plain pika client; deletes every queue and exchange
    named with ``prefix`` at the end."""

    def __init__(self) -> None:
        self.prefix = f"arroyo-test-{uuid.uuid4().hex}"
        self.connection = _connect()
        self.channel = self.connection.channel()
        self.exchanges: list[str] = []

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def queue(self, suffix: str, durable: bool = False, **arguments: Any) -> str:
        name = self.name(suffix)
        self.channel.queue_declare(name, durable=durable, arguments=arguments or None)
        return name

    def exchange(self, suffix: str, kind: str = "topic") -> str:
        name = self.name(suffix)
        self.channel.exchange_declare(name, kind, durable=True)
        self.exchanges.append(name)
        return name

    def send(self, queue: str, bodies: list[bytes]) -> None:
        for body in bodies:
            self.channel.basic_publish("", queue, body)
        self.connection.process_data_events(0)

    def ready(self, queue: str) -> int:
        """Messages ready on ``queue``; -1 if there is no such queue."""
        channel = self.connection.channel()
        try:
            count = channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return -1
        channel.close()
        return count

    def take(
        self, queue: str, until: Callable[[list[Any]], bool], timeout: float = 30
    ) -> list[Any]:
        """(properties, body) of what arrives on ``queue`` until ``until(got)``."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        for method, properties, body in self.channel.consume(
            queue, auto_ack=True, inactivity_timeout=0.1
        ):
            if method is not None:
                got.append((properties, body))
            if until(got) or time.monotonic() > deadline:
                break
        self.channel.cancel()
        return got

    def unacked(self, queue: str) -> int:
        for line in rabbitmqctl(
            "list_queues", "--no-table-headers", "name", "messages_unacknowledged"
        ).splitlines():
            name, _, count = line.rpartition("\t")
            if name == queue:
                return int(count)
        raise AssertionError(f"queue {queue} not listed")

    def cut_connections(self, containing: str) -> int:
        """Close the broker's connections whose client name contains ``containing``."""
        listing = rabbitmqctl("list_connections", "--no-table-headers", "pid", "client_properties")
        cut = 0
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if containing in properties:
                rabbitmqctl("close_connection", pid, "arroyo test: connection cut")
                cut += 1
        return cut

    def cleanup(self) -> None:
        try:
            if not self.connection.is_open:
                self.connection = _connect()
            channel = self.connection.channel()
            listing = rabbitmqctl("list_queues", "--no-table-headers", "name")
            for queue in listing.split():
                if queue.startswith(self.prefix):
                    channel.queue_delete(queue)
            for exchange in self.exchanges:
                channel.exchange_delete(exchange)
        finally:
            self.connection.close()


@pytest.fixture
def amqp() -> Iterator[Amqp]:
    client = Amqp()
    try:
        yield client
    finally:
        client.cleanup()


# -- in-process ends -------------------------------------------------------------------


def test_round_trip_with_arrays_and_templated_keys(amqp):
    x = amqp.exchange("x")
    sent = arrays_run(detector="eiger")
    sent += make_run(frames=200, shape=(16, 16), dtype="float32", run=4)
    sent[7].data["detector"] = "pilatus"  # the second run's Start
    listener = RabbitListener(
        queue=amqp.name("in"), url=URL, exchange=x, routing_key="frames.pilatus", prefetch=16
    )
    eiger = amqp.queue("eiger")
    amqp.channel.queue_bind(eiger, x, "frames.eiger")
    with listening(listener) as sink:
        wait_for(lambda: amqp.ready(amqp.name("in")) == 0)  # declared and bound
        pub = RabbitPublisher(routing_key="frames.{detector}", exchange=x, url=URL, persistent=True)
        pub.setup()
        for m in sent:
            pub.publish(m)
        pub.close()
        pilatus = [m for m in sent if not (isinstance(m, Event) and "detector" in m.metadata)]
        wait_for(lambda: len(sink.messages) >= len(pilatus), timeout=15)
    assert sink.messages == pilatus
    assert all(m.payload.flags.aligned for m in sink.events if isinstance(m.payload, np.ndarray))
    ((properties, body),) = amqp.take(eiger, lambda got: len(got) >= 1)
    assert properties.delivery_mode == 2 and properties.type == "event"
    assert decode_value(get_codec("arroyo"), body) == [sent[4]]
    assert pub.sent == len(sent) and pub.drops() == {}
    assert listener.stats() == {
        "received": len(pilatus), "duplicates": 0, "reconnects": 0, "queue_lost": 0
    }  # fmt: skip


def test_undecodable_messages_are_counted_and_acknowledged(amqp):
    queue = amqp.queue("in")
    good = [json.dumps({"kind": "event", "metadata": {"i": i}}).encode() for i in range(2000)]
    bad = [b"not json {" if i % 2 else b"[" * 100 + b"]" * 100 for i in range(10_000)]
    bodies = [b for pair in zip(bad[::5], good, strict=False) for b in pair]
    bodies += [b for i, b in enumerate(bad) if i % 5]  # the rest of the bad ones
    amqp.send(queue, bodies)
    listener = RabbitListener(queue=queue, url=URL, durable=False, codec="json", prefetch=500)
    with listening(listener) as sink:
        wait_for(lambda: listener.received >= len(bodies), timeout=30)
    assert [m.metadata["i"] for m in sink.messages] == list(range(2000))
    assert listener.drops() == {"undecodable": 5000, "too_deep": 5000}
    assert amqp.ready(queue) == 0  # every one acknowledged: none came back at close


def test_publisher_counts_what_the_broker_refuses(amqp):
    x = amqp.exchange("nobody-bound")
    pub = RabbitPublisher(routing_key="frames.{detector}", exchange=x, url=URL)
    pub.publish(Event(metadata={"detector": "eiger"}))
    pub.publish(Event(metadata={"i": 1}))  # no detector, no Start
    pub.publish(Start(data={"detector": "pilatus"}, run=2))
    pub.publish(Event(metadata={"i": 2}, run=2))  # the Start gives the detector
    full = amqp.queue("full", **{"x-max-length": 2, "x-overflow": "reject-publish"})
    refused = RabbitPublisher(routing_key=full, url=URL, codec="json")
    for i in range(5):
        refused.publish(Event(metadata={"i": i}))
    pub.close()
    refused.close()
    assert pub.drops() == {"unroutable": 3, "no_routing_key": 1}
    assert refused.drops() == {"nacked": 3} and refused.sent == 2
    assert amqp.ready(full) == 2


def test_unreachable_broker_publish_does_not_wait_and_stop_is_prompt():
    url = "amqp://guest:guest@127.0.0.1:1/%2F"  # nothing listens there
    listener = RabbitListener(queue="nowhere", url=url)
    with listening(listener):
        time.sleep(0.5)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    pub = RabbitPublisher(routing_key="nowhere", url=url, buffer_mb=0.001, close_timeout=0.3)
    pub.setup()
    t0 = time.monotonic()
    for i in range(8):
        pub.publish(Event(metadata={"i": i}, payload=b"x" * 300))
    assert time.monotonic() - t0 < 1.0, "publish() must not wait for an unreachable broker"
    full, buffered = pub.drops()["buffer_full"], pub.stats()["buffered"]
    assert full >= 1 and buffered >= 1 and full + buffered == 8
    pub.close()
    assert pub.drops() == {"buffer_full": full, "unreachable": buffered}


def test_deleted_queue_is_declared_again(amqp):
    queue = amqp.name("in")
    listener = RabbitListener(queue=queue, url=URL, durable=False, codec="json")
    body = [json.dumps({"metadata": {"i": i}}).encode() for i in range(20)]
    with listening(listener) as sink:
        wait_for(lambda: listener.connection is not None)
        amqp.send(queue, body[:10])
        wait_for(lambda: len(sink.messages) >= 10)
        amqp.channel.queue_delete(queue)
        wait_for(lambda: listener.stats()["queue_lost"] == 1 and listener.connection)
        wait_for(lambda: amqp.ready(queue) == 0)  # (passive: fails until it is back)
        amqp.send(queue, body[10:])
        wait_for(lambda: len(sink.messages) >= 20)
    assert [m.metadata["i"] for m in sink.messages] == list(range(20))


# -- real stage processes ------------------------------------------------------------


def stats_of(tmp_path: Path, key: str) -> dict[str, Any]:
    path = tmp_path / "run" / "stats" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def json_run(scan: int, events: int, start_at: int = 0) -> list[bytes]:
    """One run as a foreign producer would send it with ``codec = json``."""
    bodies = [json.dumps({"kind": "start", "data": {"detector": "pilatus", "scan": scan}})]
    bodies += [
        json.dumps({"kind": "event", "metadata": {"scan": scan, "i": i}})
        for i in range(start_at, start_at + events)
    ]
    bodies.append(json.dumps({"kind": "stop", "data": {"scan": scan}}))
    return [b.encode() for b in bodies]


def arroyo_records(got: list[Any]) -> list[dict[str, Any]]:
    """What a plain consumer read from a ``codec = arroyo`` publisher, as the records
    ``tests.conftest.runs_of`` checks."""
    codec = get_codec("arroyo")
    records = []
    for _, body in got:
        for m in decode_value(codec, body):
            record = {"kind": type(m).__name__, "run": m.run, "seq": m.seq}
            if isinstance(m, Event):
                record["metadata"] = m.metadata
            else:
                record["data"] = m.data  # type: ignore[attr-defined]
            records.append(record)
    return records


CHAIN = """
[topology]
name = rmq
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.rabbitmq:RabbitListener
url = URL
queue = PREFIX.in
durable = false
codec = json
prefetch = 200

[stage:work]
role = operator
class = stages.basic:Delay
input = lis
workers = 2
min_ms = 0
max_ms = 0

[stage:pub]
role = publisher
class = arroyo.io.rabbitmq:RabbitPublisher
input = work
url = URL
exchange = PREFIX.x
exchange_type = topic
routing_key = frames.{detector}
persistent = true
"""


def test_five_runs_through_listener_two_workers_and_publisher(amqp, topo, stages, tmp_path):
    runs, events = 5, 1000
    inbox = amqp.queue("in")
    outbox = amqp.queue("out")
    amqp.channel.queue_bind(outbox, amqp.exchange("x"), "frames.pilatus")
    path = topo(CHAIN.replace("URL", URL).replace("PREFIX", amqp.prefix))
    for key in ("pub", "work", "lis"):
        for worker in range(2 if key == "work" else 1):
            stages.start(path, key, worker)
    for scan in range(runs):
        bodies = json_run(scan, events)
        bodies.insert(500, b"this is not json")  # counted at the listener, dropped
        amqp.send(inbox, bodies)

    def stops(got: list[Any]) -> bool:
        return sum(p.type == "stop" for p, _ in got) >= runs

    got = amqp.take(outbox, stops, timeout=45)
    done = runs_of(arroyo_records(got))
    assert len(done) == runs, stages.dump()
    for scan, (run, count, stop) in enumerate(done):
        events_of_run = [r for r in arroyo_records(got) if r["run"] == run and r["kind"] == "Event"]
        assert sorted(r["metadata"]["i"] for r in events_of_run) == list(range(events))
        assert {r["metadata"]["scan"] for r in events_of_run} == {scan}
        assert count == events and stop["seq"] == events
        assert stop["data"] == {"scan": scan}, stop  # no "incomplete" in it
    assert all(c == 0 for c in stages.stop_all(["lis.0", "work.0", "work.1", "pub.0"]).values())
    lis, pub = stats_of(tmp_path, "lis.0"), stats_of(tmp_path, "pub.0")
    assert lis["drops"] == {"undecodable": runs}
    assert lis["extra"]["received"] == runs * (events + 3) and lis["extra"]["duplicates"] == 0
    assert pub["extra"]["sent"] == runs * (events + 2) and pub["drops"] == {}
    reports = pub["runs"]
    assert [(r["received"], r["complete"]) for r in reports] == [(events, True)] * runs, reports


KILLED = """
[topology]
name = rmq-kill
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.rabbitmq:RabbitListener
url = URL
queue = PREFIX.in
durable = false
codec = json
prefetch = 50

[stage:slow]
role = operator
class = stages.basic:Delay
input = lis
min_ms = 0.2
max_ms = 0.6

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = slow
"""


def redelivered_in_log(text: str) -> int:
    """What one listener process logged as flagged redelivered (its streak lines)."""
    return sum(int(n) for n in re.findall(r"(\d+) message\(s\) came again, flagged", text))


def test_killed_listener_redelivers_and_counts_duplicates(amqp, topo, stages, tmp_path):
    events = 4000
    inbox = amqp.queue("in")
    path = topo(KILLED.replace("URL", URL).replace("PREFIX", amqp.prefix))
    amqp.send(inbox, json_run(0, events))
    stages.start(path, "sink")
    stages.start(path, "slow")
    lis = stages.start(path, "lis")
    requeued: list[int] = []  # unacknowledged at each kill: the broker redelivers them
    counted: list[int] = []  # what each listener process counted as redelivered
    for left in (3 * events // 4, events // 2, events // 4):
        wait_for(lambda left=left: 0 <= amqp.ready(inbox) <= left, timeout=20)
        lis.send_signal(signal.SIGSTOP)  # frozen: its acks stop, the window fills
        time.sleep(0.3)
        requeued.append(amqp.unacked(inbox))
        lis.send_signal(signal.SIGKILL)
        lis.wait(10)
        counted.append(redelivered_in_log(stages.log("lis.0")))  # (read before restarting)
        lis = stages.start(path, "lis")
    out = tmp_path / "out.jsonl"

    def seen() -> Counter[int]:
        return Counter(r["metadata"]["i"] for r in read_jsonl(out) if r["kind"] == "Event")

    try:
        wait_for(lambda: len(seen()) == events, timeout=30)
    except AssertionError:
        missing = sorted(set(range(events)) - set(seen()))
        stats = {k: stats_of(tmp_path, k) for k in ("lis.0", "slow.0", "sink.0")}
        links = {k: (s.get("drops"), s.get("links")) for k, s in stats.items()}
        pytest.fail(f"{len(missing)} missing: {missing[:20]}...; requeued {requeued}; {links}")
    assert all(c == 0 for c in stages.stop_all(["lis.0", "slow.0", "sink.0"]).values())
    counted.append(redelivered_in_log(stages.log("lis.0")))
    assert stats_of(tmp_path, "lis.0")["extra"]["duplicates"] == counted[-1]
    copies = seen()
    twice = sum(n - 1 for n in copies.values())
    assert sorted(copies) == list(range(events))  # every message at least once
    assert all(n > 0 for n in requeued), requeued  # each kill was mid-run
    # each process counted exactly what the broker requeued at the kill before it
    assert counted == [0, *requeued], (counted, requeued)
    assert twice <= sum(requeued), (twice, requeued)  # no duplicate goes uncounted
    print(f"requeued at the kills: {requeued}; duplicates downstream: {twice}")


# (test_rabbitmq_restart runs the same chain with a durable queue, persistent)
CUT = """
[topology]
name = rmq-cut
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.rabbitmq:RabbitListener
url = URL
queue = PREFIX.in
durable = DURABLE
codec = json
prefetch = 20

[stage:slow]
role = operator
class = stages.basic:Delay
input = lis
min_ms = 0.5
max_ms = 1

[stage:pub]
role = publisher
class = arroyo.io.rabbitmq:RabbitPublisher
input = slow
url = URL
exchange = PREFIX.x
routing_key = frames.{detector}
persistent = DURABLE
codec = json
"""


def test_cut_connections_reconnect_and_lose_nothing(amqp, topo, stages, tmp_path):
    events = 4000
    inbox = amqp.queue("in")
    outbox = amqp.queue("out")
    amqp.channel.queue_bind(outbox, amqp.exchange("x"), "frames.pilatus")
    path = topo(CUT.replace("URL", URL).replace("PREFIX", amqp.prefix).replace("DURABLE", "false"))
    for key in ("pub", "slow", "lis"):
        stages.start(path, key)
    amqp.send(inbox, json_run(0, events))
    wait_for(lambda: amqp.ready(outbox) >= 400, timeout=20)  # both ends busy
    assert amqp.cut_connections(amqp.prefix) == 2  # the listener's and the publisher's

    def stop_seen(got: list[Any]) -> bool:
        return any(p.type == "stop" for p, _ in got)

    got = amqp.take(outbox, stop_seen, timeout=40)
    records = [json.loads(body) for _, body in got]
    copies = Counter(r["metadata"]["i"] for r in records if r["kind"] == "event")
    assert sorted(copies) == list(range(events)), stages.dump()  # nothing lost
    assert all(c == 0 for c in stages.stop_all(["lis.0", "slow.0", "pub.0"]).values())
    lis, pub = stats_of(tmp_path, "lis.0"), stats_of(tmp_path, "pub.0")
    twice = sum(n - 1 for n in copies.values())
    assert twice <= lis["extra"]["duplicates"] + pub["extra"]["resent"], (twice, lis, pub)
    assert lis["extra"]["reconnects"] == 1 and lis["drops"] == {} and pub["drops"] == {}
    for key in ("lis.0", "pub.0"):
        assert "retrying with backoff" in stages.log(key), stages.log(key)
        assert "connected again" in stages.log(key), stages.log(key)


def test_an_existing_queue_is_waited_for_and_a_mismatch_is_a_config_error(amqp):
    queue = amqp.name("later")
    listener = RabbitListener(queue=queue, url=URL, declare=False, codec="json")
    with listening(listener) as sink:
        time.sleep(0.4)  # NOT_FOUND, retried with backoff
        assert listener.connection is None
        amqp.queue("later")
        amqp.send(queue, [b'{"metadata": {"i": 1}}'])
        wait_for(lambda: len(sink.messages) == 1, timeout=15)
    assert listener.stats()["reconnects"] == 1
    # declared durable here, not durable by the test above: the broker refuses (406)
    mismatch = RabbitListener(queue=queue, url=URL, durable=True)
    with pytest.raises(ConfigError, match="PRECONDITION_FAILED"):
        mismatch.start()
    mismatch.close()
