"""NatsListener and NatsPublisher against a real NATS server with JetStream.

The shared server is the one at 127.0.0.1:4222 (started by the fixture with
``nats-server -js`` when it is not running and the binary is there). The test that
restarts a server starts a private one on a random port with a store of its own, and
always kills it. Every stream and subject a test uses is named ``arroyotestHEX...``
and deleted afterwards, failed or not.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.io.codecs import get_codec
from arroyo.io.frames import decode_value
from arroyo.message import Event, Message, Start, Stop
from arroyo.testing import make_run
from tests.brokers import arrays_run, listening
from tests.conftest import in_ci, need_extra, read_jsonl, runs_of, wait_for

need_extra("nats", "nats")

import nats  # noqa: E402  (after the check above)
import nats.js.api  # noqa: E402
import nats.js.errors  # noqa: E402

from arroyo.io.nats import NatsListener, NatsPublisher  # noqa: E402

pytestmark = pytest.mark.timeout(60)

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"


async def _client(url: str) -> Any:
    return await nats.connect(
        url,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        connect_timeout=2,
    )


def _server_problem(url: str) -> str | None:
    async def ping() -> None:
        nc = await _client(url)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    try:
        asyncio.run(ping())
    except Exception as e:  # whatever nats-py raises for a server that is not there
        return f"{type(e).__name__}: {e}"
    return None


def _no_server(why: str) -> None:
    if in_ci():
        pytest.fail(f"NATS with JetStream is required under CI: {why}", pytrace=False)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A ``nats-server -js`` of this test's own, on ``port`` with its store in ``store``."""

    def __init__(self, store: Path, port: int) -> None:
        self.store = store
        self.port = port
        self.url = f"nats://{HOST}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            _no_server("nats-server is not on PATH")
        log = (self.store.parent / f"nats-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "-a", HOST, "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while (problem := _server_problem(self.url)) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                _no_server(f"nats-server on port {self.port} did not start: {problem}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self.proc = None


@pytest.fixture(scope="module", autouse=True)
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The server at 127.0.0.1:4222; started here if it is down and can be."""
    started = None
    if _server_problem(URL) is not None:
        if shutil.which("nats-server") is None:
            _no_server(f"no NATS at {URL} and no nats-server to start")
        started = NatsServer(tmp_path_factory.mktemp("nats") / "store", PORT)
        started.start()
    yield
    if started is not None:
        started.stop(signal.SIGTERM)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Js:
    """This test's names and a plain nats-py client; deletes every stream named with
    ``prefix`` at the end. Each call is one connection (``asyncio.run``)."""

    def __init__(self, url: str = URL) -> None:
        self.url = url
        self.prefix = f"arroyotest{uuid.uuid4().hex[:12]}"

    def stream(self, suffix: str) -> str:
        return f"{self.prefix}_{suffix}"

    def subject(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def create(self, suffix: str, subjects: str, **config: Any) -> str:
        async def go() -> None:
            nc = await _client(self.url)
            js = nc.jetstream()
            await js.add_stream(name=self.stream(suffix), subjects=[subjects], **config)
            await nc.close()

        asyncio.run(go())
        return self.stream(suffix)

    def send(self, subject: str, bodies: list[bytes], core: bool = False) -> None:
        """Publish ``bodies`` as a burst (PubAcks awaited together), then close."""

        async def go() -> None:
            nc = await _client(self.url)
            if core:
                for body in bodies:
                    await nc.publish(subject, body)
            else:
                js = nc.jetstream()
                for i in range(0, len(bodies), 500):
                    acks = [await js.publish_async(subject, b) for b in bodies[i : i + 500]]
                    await asyncio.gather(*acks)
            await nc.close()  # at once: close flushes what is still buffered

        asyncio.run(go())

    def read(
        self, stream: str, until: Callable[[list[Any]], bool], timeout: float = 30
    ) -> list[Any]:
        """(subject, data) of the messages of ``stream`` from its start, until
        ``until(got)`` or ``timeout``."""

        async def go() -> list[Any]:
            nc = await _client(self.url)
            js = nc.jetstream()
            got: list[Any] = []
            deadline = time.monotonic() + timeout
            sub = None
            config = nats.js.api.ConsumerConfig(ack_policy=nats.js.api.AckPolicy.NONE)
            while time.monotonic() < deadline and not (got and until(got)):
                try:
                    if sub is None:
                        sub = await js.pull_subscribe(">", stream=stream, config=config)
                    for msg in await sub.fetch(500, timeout=0.2):
                        got.append((msg.subject, msg.data))
                except (TimeoutError, nats.js.errors.NotFoundError):
                    await asyncio.sleep(0.05)
            await nc.close()
            return got

        return asyncio.run(go())

    def consumer(self, stream: str, durable: str) -> Any:
        """The consumer's info; None while it does not exist."""

        async def go() -> Any:
            nc = await _client(self.url)
            try:
                return await nc.jetstream().consumer_info(stream, durable)
            except nats.js.errors.NotFoundError:
                return None
            finally:
                await nc.close()

        return asyncio.run(go())

    def delete_consumer(self, stream: str, durable: str) -> None:
        async def go() -> None:
            nc = await _client(self.url)
            await nc.jetstream().delete_consumer(stream, durable)
            await nc.close()

        asyncio.run(go())

    def cleanup(self) -> None:
        async def go() -> None:
            nc = await _client(self.url)
            js = nc.jetstream()
            for info in await js.streams_info():
                if info.config.name.startswith(self.prefix):
                    await js.delete_stream(info.config.name)
            await nc.close()

        try:
            asyncio.run(go())
        except Exception as e:  # a private server may be gone already
            print(f"cleanup of {self.prefix} at {self.url}: {e}")


@pytest.fixture
def js() -> Iterator[Js]:
    client = Js()
    try:
        yield client
    finally:
        client.cleanup()


def json_run(scan: int, events: int) -> list[bytes]:
    """One run as a foreign producer would send it with ``codec = json``."""
    bodies = [json.dumps({"kind": "start", "data": {"detector": "pilatus", "scan": scan}})]
    bodies += [
        json.dumps({"kind": "event", "metadata": {"scan": scan, "i": i}}) for i in range(events)
    ]
    bodies.append(json.dumps({"kind": "stop", "data": {"scan": scan}}))
    return [b.encode() for b in bodies]


def arroyo_records(got: list[Any]) -> list[dict[str, Any]]:
    """What a plain consumer read from a ``codec = arroyo`` publisher, as the records
    ``tests.conftest.runs_of`` checks."""
    codec = get_codec("arroyo")
    records = []
    for _, data in got:
        for m in decode_value(codec, data):
            record = {"kind": type(m).__name__, "run": m.run, "seq": m.seq}
            if isinstance(m, Event):
                record["metadata"] = m.metadata
            else:
                record["data"] = m.data  # type: ignore[attr-defined]
            records.append(record)
    return records


def stats_of(tmp_path: Path, key: str) -> dict[str, Any]:
    path = tmp_path / "run" / "stats" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- in-process ends -------------------------------------------------------------------


def test_round_trip_with_arrays_and_a_2mib_frame_dropped_as_too_large(js, caplog):
    stream = js.stream("in")
    sent = arrays_run() + make_run(frames=100, shape=(16, 16), dtype="float32", run=4)
    sent[7].data["detector"] = "pilatus"  # the second run's Start
    listener = NatsListener(subject=js.subject("frames.*"), stream=stream, deliver="all")
    pub = NatsPublisher(subject=js.subject("frames.{detector}"), stream=stream)
    big = Event(metadata={"i": 99}, payload=np.ones((1024, 1024), "<u2"), run=3, seq=5)
    with listening(listener) as sink:
        for m in sent[:6]:
            pub.publish(m)
        pub.publish(big)  # 2 MiB of pixels: over the server's 1 MB max_payload
        for m in sent[6:]:
            pub.publish(m)
        pub.close()
        wait_for(lambda: len(sink.messages) >= len(sent), timeout=15)
    assert sink.messages == sent
    assert all(m.payload.flags.aligned for m in sink.events if isinstance(m.payload, np.ndarray))
    assert pub.drops() == {"too_large": 1}
    assert pub.stats()["sent"] == len(sent) and pub.max_payload == 1 << 20
    (line,) = [r.getMessage() for r in caplog.records if "too_large" in r.getMessage()]
    assert "2097" in line and "max_payload of 1048576 bytes" in line, line
    assert listener.stats() == {
        "received": len(sent), "duplicates": 0, "reconnects": 0, "consumer_lost": 0
    }  # fmt: skip


def test_undecodable_messages_are_counted_and_acknowledged(js):
    stream = js.create("in", js.subject("in"))
    good = [json.dumps({"kind": "event", "metadata": {"i": i}}).encode() for i in range(2000)]
    bad = [b"not json {" if i % 2 else b"[" * 100 + b"]" * 100 for i in range(10_000)]
    bodies = [b for pair in zip(bad[::5], good, strict=True) for b in pair]
    bodies += [b for i, b in enumerate(bad) if i % 5]  # the rest of the bad ones
    js.send(js.subject("in"), bodies)
    listener = NatsListener(
        subject=js.subject("in"), stream=stream, deliver="all", codec="json", durable="d"
    )
    with listening(listener) as sink:
        wait_for(lambda: listener.received >= len(bodies), timeout=40)
        wait_for(lambda: js.consumer(stream, "d").num_ack_pending == 0, timeout=10)
    assert [m.metadata["i"] for m in sink.messages] == list(range(2000))
    assert listener.drops() == {"undecodable": 5000, "too_deep": 5000}
    info = js.consumer(stream, "d")
    assert info.num_pending == 0 and info.num_ack_pending == 0  # all acked: none comes back


def test_late_joiners_replay_by_all_seq_and_time(js):
    stream = js.create("in", js.subject("in"))
    js.send(js.subject("in"), json_run(1, 50))  # stream sequences 1..52
    time.sleep(0.05)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.05)
    js.send(js.subject("in"), json_run(2, 50))  # 53..104

    def replay(deliver: str) -> list[Message]:
        listener = NatsListener(
            subject=js.subject("in"), stream=stream, deliver=deliver, codec="json",
            durable=f"late{abs(hash(deliver))}",
        )  # fmt: skip
        with listening(listener) as sink:
            wait_for(lambda: sink.messages and isinstance(sink.messages[-1], Stop), timeout=10)
        return sink.messages

    def scans(messages: list[Message]) -> list[int]:
        return [m.data["scan"] for m in messages if isinstance(m, Start)]

    everything = replay("all")
    assert scans(everything) == [1, 2] and len(everything) == 104
    assert scans(replay("seq:53")) == [2]
    assert scans(replay(f"time:{between.isoformat()}")) == [2]
    assert len(replay("seq:60")) == 104 - 59  # from the middle of run 2


def test_publisher_counts_what_the_server_refuses(js):
    stream = js.create(
        "full", js.subject("full.*"), max_msgs=3, discard=nats.js.api.DiscardPolicy.NEW
    )
    pub = NatsPublisher(subject=js.subject("full.{detector}"), stream=stream, codec="json")
    pub.publish(Event(metadata={"i": 0}))  # no detector, no Start
    for i in range(5):
        pub.publish(Event(metadata={"detector": "eiger", "i": i}))
    pub.close()
    assert pub.drops() == {"no_subject": 1, "refused": 2}
    assert pub.stats()["sent"] == 3


def test_unreachable_server_publish_does_not_wait_and_stop_is_prompt():
    url = f"nats://{HOST}:{free_port()}"  # nothing listens there
    listener = NatsListener(subject="nowhere", stream="NOWHERE", url=url)
    with listening(listener):
        time.sleep(0.5)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.5
    pub = NatsPublisher(subject="nowhere", url=url, buffer_mb=0.001, close_timeout=0.3)
    pub.setup()
    t0 = time.monotonic()
    for i in range(8):
        pub.publish(Event(metadata={"i": i}, payload=b"x" * 300))
    assert time.monotonic() - t0 < 1.0, "publish() must not wait for an unreachable server"
    full, buffered = pub.drops()["buffer_full"], pub.stats()["buffered"]
    assert full >= 1 and buffered >= 1 and full + buffered == 8
    pub.close()
    assert pub.drops() == {"buffer_full": full, "unreachable": buffered}


def test_deleted_consumer_is_created_again(js):
    stream = js.create("in", js.subject("in"))
    body = [json.dumps({"metadata": {"i": i}}).encode() for i in range(20)]
    listener = NatsListener(
        subject=js.subject("in"), stream=stream, deliver="all", codec="json", durable="d"
    )
    with listening(listener) as sink:
        js.send(js.subject("in"), body[:10])
        wait_for(lambda: len(sink.messages) >= 10)
        js.delete_consumer(stream, "d")
        js.send(js.subject("in"), body[10:])
        wait_for(lambda: len(sink.messages) >= 30, timeout=15)
    # created again at deliver = all: the stream's first ten come again, then the rest
    assert [m.metadata["i"] for m in sink.messages] == list(range(10)) + list(range(20))
    assert listener.stats()["consumer_lost"] == 1


def test_core_burst_sent_and_closed_at_once_arrives_whole(js):
    """nats-py's event loop runs in its own thread and only queues what it reads, so a
    burst that a producer sends and closes at once is read as fast as it comes, however
    slowly the stage hands it on (DESIGN §7)."""
    subject = js.subject("burst")
    listener = NatsListener(subject=subject, mode="core", codec="raw", buffer=100_000)
    n = 20_000
    with listening(listener) as sink:
        wait_for(lambda: listener._nc is not None)
        js.send(subject, [b"%d" % i for i in range(n)], core=True)
        wait_for(lambda: len(sink.messages) >= n, timeout=30)
    assert [int(m.payload) for m in sink.messages] == list(range(n))
    assert listener.drops() == {}


# -- real stage processes ------------------------------------------------------------

CHAIN = """
[topology]
name = nats
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.nats:NatsListener
url = URL
stream = PREFIX_in
subject = PREFIX.in
deliver = all
codec = json
prefetch = 500

[stage:work]
role = operator
class = stages.basic:Delay
input = lis
workers = 2
min_ms = 0
max_ms = 0

[stage:pub]
role = publisher
class = arroyo.io.nats:NatsPublisher
input = work
url = URL
stream = PREFIX_out
subject = PREFIX.out.{detector}
"""


def start_chain(stages: Any, path: Path, keys: list[str]) -> None:
    for key in keys:
        for worker in range(2 if key == "work" else 1):
            stages.start(path, key, worker)


def test_five_runs_through_listener_two_workers_and_publisher(js, topo, stages, tmp_path):
    runs, events = 5, 1000
    js.create("in", js.subject("in"))
    path = topo(CHAIN.replace("URL", URL).replace("PREFIX", js.prefix))
    start_chain(stages, path, ["pub", "work", "lis"])
    for scan in range(runs):
        bodies = json_run(scan, events)
        bodies.insert(500, b"this is not json")  # counted at the listener, dropped
        js.send(js.subject("in"), bodies)

    def stops(got: list[Any]) -> bool:
        return sum(r["kind"] == "Stop" for r in arroyo_records(got[-5:])) >= 1 and (
            sum(r["kind"] == "Stop" for r in arroyo_records(got)) >= runs
        )

    got = js.read(js.stream("out"), stops, timeout=45)
    records = arroyo_records(got)
    done = runs_of(records)
    assert len(done) == runs, stages.dump()
    assert {subject for subject, _ in got} == {js.subject("out.pilatus")}
    for scan, (run, count, stop) in enumerate(done):
        of_run = [r for r in records if r["run"] == run and r["kind"] == "Event"]
        assert sorted(r["metadata"]["i"] for r in of_run) == list(range(events))
        assert {r["metadata"]["scan"] for r in of_run} == {scan}
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
name = nats-kill
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.nats:NatsListener
url = URL
stream = PREFIX_in
subject = PREFIX.in
deliver = all
durable = kill
codec = json
prefetch = 100
ack_wait_s = 2

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
    """What one listener process logged as delivered more than once (its streaks)."""
    return sum(int(n) for n in re.findall(r"(\d+) message\(s\) came again", text))


def acked_up_to(js: Js, stream: str) -> int:
    info = js.consumer(stream, "kill")
    return -1 if info is None else info.ack_floor.stream_seq


BURST = """
[topology]
name = nats-burst
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.nats:NatsListener
url = URL
mode = core
subject = PREFIX.burst
codec = json
buffer = 100000

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = lis
"""


def test_core_burst_into_a_stage_process_arrives_whole(js, topo, stages, tmp_path):
    """The same through a real stage: a producer that sends a run of 20,000 messages
    on a core subject and closes at once; the stage hands on every one."""
    events = 20_000
    path = topo(BURST.replace("URL", URL).replace("PREFIX", js.prefix))
    stages.start(path, "sink")
    stages.start(path, "lis")
    out = tmp_path / "out.jsonl"
    probe = json.dumps({"kind": "event", "metadata": {"probe": 1}}).encode()

    def subscribed() -> bool:  # (core NATS keeps nothing for a listener not there yet)
        js.send(js.subject("burst"), [probe], core=True)
        return bool(read_jsonl(out))

    wait_for(subscribed, timeout=20, interval=0.2)
    js.send(js.subject("burst"), json_run(7, events), core=True)
    wait_for(lambda: any(r["kind"] == "Stop" for r in read_jsonl(out)[-3:]), timeout=30)
    assert all(c == 0 for c in stages.stop_all(["lis.0", "sink.0"]).values())
    records = [r for r in read_jsonl(out) if "probe" not in r.get("metadata", {})]
    ((_, count, stop),) = runs_of(records)
    assert count == events and stop["data"] == {"scan": 7}, stop
    assert [r["metadata"]["i"] for r in records if r["kind"] == "Event"] == list(range(events))
    assert stats_of(tmp_path, "lis.0")["drops"] == {}


def test_killed_listener_redelivers_and_counts_duplicates(js, topo, stages, tmp_path):
    events = 3000
    stream = js.create("in", js.subject("in"))
    path = topo(KILLED.replace("URL", URL).replace("PREFIX", js.prefix))
    js.send(js.subject("in"), json_run(0, events))
    stages.start(path, "sink")
    stages.start(path, "slow")
    lis = stages.start(path, "lis")
    pending: list[int] = []  # unacknowledged at each kill: JetStream delivers them again
    counted: list[int] = []  # what each listener process counted as delivered again
    for floor in (events // 4, events // 2, 3 * events // 4):
        wait_for(lambda f=floor: acked_up_to(js, stream) >= f, 20)
        lis.send_signal(signal.SIGSTOP)  # frozen: its acks stop
        time.sleep(0.2)
        pending.append(js.consumer(stream, "kill").num_ack_pending)
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
        pytest.fail(f"{len(missing)} missing: {missing[:20]}...; pending {pending}")
    assert all(c == 0 for c in stages.stop_all(["lis.0", "slow.0", "sink.0"]).values())
    counted.append(redelivered_in_log(stages.log("lis.0")))
    assert stats_of(tmp_path, "lis.0")["extra"]["duplicates"] == counted[-1]
    copies = seen()
    twice = sum(n - 1 for n in copies.values())
    assert sorted(copies) == list(range(events))  # every message at least once
    assert all(n > 0 for n in pending), pending  # each kill was mid-run
    # each process counted what JetStream held unacknowledged at the kill before it
    assert counted == [0, *pending], (counted, pending)
    assert twice <= sum(pending), (twice, pending)  # no duplicate goes uncounted
    print(f"unacknowledged at the kills: {pending}; duplicates downstream: {twice}")


RESTART = """
[topology]
name = nats-restart
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.nats:NatsListener
url = URL
stream = PREFIX_in
subject = PREFIX.in
deliver = all
codec = json
prefetch = 50
ack_wait_s = ACK_WAIT

[stage:slow]
role = operator
class = stages.basic:Delay
input = lis
min_ms = 0.5
max_ms = 1

[stage:pub]
role = publisher
class = arroyo.io.nats:NatsPublisher
input = slow
url = URL
stream = PREFIX_out
subject = PREFIX.out.{detector}
codec = json
"""


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "crash"])
def test_private_server_restarted_mid_stream_loses_nothing(
    crash, private_server, topo, stages, tmp_path
):
    """A restart (SIGTERM) loses nothing and every duplicate is counted. A crash
    (SIGKILL) loses nothing either, but the server may lose its record of recent
    deliveries and acks: messages come again without being flagged, so only "nothing
    lost" is checked (docs/brokers.md, "NATS faults")."""
    events = 3000
    js = Js(private_server.url)
    js.create("in", js.subject("in"))
    js.send(js.subject("in"), json_run(0, events))
    text = RESTART.replace("URL", private_server.url).replace("PREFIX", js.prefix)
    path = topo(text.replace("ACK_WAIT", "2" if crash else "30"))
    for key in ("pub", "slow", "lis"):
        stages.start(path, key)
    wait_for(lambda: len(js.read(js.stream("out"), lambda got: len(got) >= 500, 1)) >= 500, 20)
    private_server.stop(signal.SIGKILL if crash else signal.SIGTERM)
    time.sleep(0.5)
    private_server.start()  # same port, same store: streams and consumers come back

    def stop_seen(got: list[Any]) -> bool:
        return any(json.loads(data)["kind"] == "stop" for _, data in got[-50:])

    got = js.read(js.stream("out"), stop_seen, timeout=40)
    js.cleanup()
    records = [json.loads(data) for _, data in got]
    copies = Counter(r["metadata"]["i"] for r in records if r["kind"] == "event")
    assert sorted(copies) == list(range(events)), stages.dump()  # nothing lost
    assert all(c == 0 for c in stages.stop_all(["lis.0", "slow.0", "pub.0"]).values())
    lis, pub = stats_of(tmp_path, "lis.0"), stats_of(tmp_path, "pub.0")
    twice = sum(n - 1 for n in copies.values())
    if not crash:
        assert twice <= lis["extra"]["duplicates"], (twice, lis, pub)
        # the counters `arroyo status` shows against what the far side saw: the
        # listener took every message once plus those it counted again; the stream
        # holds every message the publisher counted sent (it drops what it had)
        taken = lis["extra"]["received"] - lis["extra"]["duplicates"]
        assert taken == events + 2, lis
        assert pub["extra"]["sent"] == len(records) + pub["extra"]["deduplicated"], pub
    assert lis["extra"]["reconnects"] >= 1 and pub["extra"]["reconnects"] >= 1, (lis, pub)
    assert lis["drops"] == {} and pub["drops"] == {}
    for key in ("lis.0", "pub.0"):
        assert "retrying with backoff" in stages.log(key), stages.log(key)
        assert "connected again" in stages.log(key), stages.log(key)
    print(f"server {'crash' if crash else 'restart'}: {twice} duplicates downstream; "
          f"listener {lis['extra']}; publisher {pub['extra']}")  # fmt: skip
