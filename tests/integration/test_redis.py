"""RedisListener and RedisPublisher against a real Redis.

The shared Redis at 127.0.0.1:6379 is only ever read and written under keys unique to
one test (deleted afterwards); the restart test runs a redis-server of its own.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from arroyo.errors import WireError
from arroyo.io.codecs import get_codec
from arroyo.message import Event, Message, Start, Stop
from arroyo.testing import make_run
from tests.brokers import listening
from tests.conftest import Stages, in_ci, read_jsonl, wait_for

try:
    import redis
except ImportError:
    if in_ci():
        pytest.fail("redis-py is required under CI (pip install 'arroyo[redis]')", pytrace=False)
    pytest.skip("redis-py is not installed (pip install 'arroyo[redis]')", allow_module_level=True)

from arroyo.io.frames import decode_value, pack_frames, unpack_frames
from arroyo.io.redis import (  # (needs redis-py, checked just above)
    RedisListener,
    RedisPublisher,
    safe_url,
)

pytestmark = pytest.mark.timeout(60)

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


def _shared_redis_problem() -> str | None:
    try:
        redis.Redis(host=HOST, port=PORT, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as e:
        return f"{type(e).__name__}: {e}"
    return None


_problem = _shared_redis_problem()
if _problem is not None:
    if in_ci():
        pytest.fail(f"Redis at {HOST}:{PORT} is required under CI: {_problem}", pytrace=False)
    pytest.skip(f"no Redis at {HOST}:{PORT} ({_problem})", allow_module_level=True)


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if in_ci():
            pytest.fail(f"{name} is required under CI", pytrace=False)
        pytest.skip(f"{name} not found on PATH")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis(host=HOST, port=PORT)
    yield c
    c.close()


@pytest.fixture
def key(client: redis.Redis) -> Iterator[str]:
    """A channel/stream name no other test uses; every key containing it is deleted."""
    tag = uuid.uuid4().hex
    yield f"arroyo-test:{tag}"
    for k in list(client.scan_iter(match=f"*{tag}*")):
        client.delete(k)


def wait_subscribed(client: redis.Redis, channel: str) -> None:
    wait_for(lambda: client.pubsub_numsub(channel)[0][1] >= 1, timeout=10)


def odd_payloads() -> list[Message]:
    """Events whose arrays exercise dtype, byte order, layout and shape handling."""
    rng = np.random.default_rng(7)
    big = rng.normal(size=(64, 48)).astype(">f8")
    return [
        Start(data={"sample": "LaB6", "exposure_s": 0.1}, run=3),
        Event(metadata={"i": 0}, payload=rng.integers(0, 4000, (128, 128)).astype("<u2"), run=3),
        Event(metadata={"i": 1}, payload=big, run=3, seq=1),
        Event(metadata={"i": 2}, payload=big[::3, ::2], run=3, seq=2),  # not contiguous
        Event(metadata={"i": 3}, payload=np.array(2.5, dtype="<f4"), run=3, seq=3),  # 0-d
        Event(metadata={"i": 4}, payload=rng.random(7) > 0.5, run=3, seq=4),
        Event(
            metadata={"i": 5, "tags": ["a", "b"]},
            payload={"image": rng.random((3, 5)).astype("c8"), "mask": np.zeros(3, "u1")},
            run=3,
            seq=5,
        ),
        Event(metadata={"i": 6}, payload=b"\x00raw bytes\xff", run=3, seq=6),
        Event(metadata={"i": 7}, run=3, seq=7),
        Stop(data={"frames": 8}, run=3, seq=8),
    ]


def assert_same_messages(got: list[Message], sent: list[Message]) -> None:
    assert len(got) == len(sent), f"{len(got)} messages arrived, {len(sent)} were sent"
    for g, s in zip(got, sent, strict=True):
        assert g == s, f"arrived {g!r}\n   sent {s!r}"
        if isinstance(g, Event) and isinstance(g.payload, np.ndarray):
            assert g.payload.flags.aligned


# -- framing of the arroyo codec into one value ------------------------------------------


def test_frames_round_trip_aligned_and_garbage_is_a_wire_error():
    frames = [b"h", b"", np.arange(5, dtype="<i8"), memoryview(b"xyz"), np.zeros((2, 3), ">f4")]
    value = bytes(pack_frames(frames))
    assert value[:4] == b"AYF1"
    out = unpack_frames(value)
    assert [bytes(f) for f in out] == [
        b"h",
        b"",
        np.arange(5, dtype="<i8").tobytes(),
        b"xyz",
        np.zeros((2, 3), ">f4").tobytes(),
    ]
    assert all((f.obj is value) for f in out)  # views, not copies
    for bad in [b"", b"AYF1", b"JUNKJUNK", value[:-1], value + b"\x00", value[:12]]:
        with pytest.raises(WireError):
            unpack_frames(bad)
    too_many = b"AYF1" + (10**6).to_bytes(4, "little")
    with pytest.raises(WireError, match="frames"):
        unpack_frames(too_many)


# -- in-process round trips ----------------------------------------------------------------


def test_channel_round_trip_with_arrays(client, key):
    sent = odd_payloads() + make_run(frames=20, shape=(32, 32), dtype="uint16", run=4)
    with listening(RedisListener(key=key, url=URL, mode="channel")) as sink:
        wait_subscribed(client, key)
        pub = RedisPublisher(key=key, url=URL, mode="channel")
        pub.setup()
        for m in sent:
            pub.publish(m)
        pub.close()
        wait_for(lambda: len(sink.messages) >= len(sent), timeout=10)
    assert_same_messages(sink.messages, sent)
    assert pub.sent == len(sent) and pub.dropped == 0


def test_stream_round_trip_with_arrays_acks_everything(client, key):
    sent = odd_payloads() + make_run(frames=250, shape=(16, 16), dtype="float32", run=5)
    pub = RedisPublisher(key=key, url=URL, mode="stream", maxlen=10_000)
    pub.setup()
    for m in sent:
        pub.publish(m)
    pub.close()
    assert client.xlen(key) == len(sent)
    listener = RedisListener(key=key, url=URL, mode="stream", from_start=True, batch=64)
    with listening(listener) as sink:
        wait_for(lambda: len(sink.messages) >= len(sent), timeout=10)
    assert_same_messages(sink.messages, sent)
    assert client.xpending(key, "arroyo")["pending"] == 0
    assert listener.dropped == 0
    assert not list(client.scan_iter(match=f"arroyo:written:{key}:*"))  # close() tidies up


def test_restarted_listener_reads_what_it_never_acknowledged(client, key):
    pub = RedisPublisher(key=key, url=URL, mode="stream", codec="json")
    for i in range(12):
        pub.publish(Event(metadata={"i": i}))
    pub.close()
    client.xgroup_create(key, "g", id="0")
    # A consumer read 5 entries, then died before acknowledging them.
    client.xreadgroup("g", "old", {key: ">"}, count=5)
    # Restarted under the same name: its own pending entries come first, in order.
    listener = RedisListener(
        key=key, url=URL, mode="stream", codec="json", group="g", consumer="old", batch=3
    )
    with listening(listener) as sink:
        wait_for(lambda: len(sink.messages) >= 12, timeout=10)
    assert [m.metadata["i"] for m in sink.messages] == list(range(12))
    # Under a new name (the default is HOSTNAME-PID): claimed once they are idle long enough.
    for i in range(12, 16):
        client.xadd(key, {"data": f'{{"metadata": {{"i": {i}}}}}'})
    client.xreadgroup("g", "crashed", {key: ">"}, count=2)
    listener = RedisListener(
        key=key, url=URL, mode="stream", codec="json", group="g", claim_idle_ms=200
    )
    with listening(listener) as sink:
        wait_for(lambda: len(sink.messages) >= 4, timeout=10)
    assert sorted(m.metadata["i"] for m in sink.messages) == [12, 13, 14, 15]
    assert client.xpending(key, "g")["pending"] == 0


def test_undecodable_values_are_counted_and_acknowledged(client, key):
    client.xgroup_create(key, "arroyo", id="$", mkstream=True)
    client.xadd(key, {"data": b"not an arroyo value"})
    client.xadd(key, {"other": b"no data field"})
    # read by this consumer, then deleted before it was delivered
    gone = client.xadd(key, {"data": b"trimmed"})
    client.xreadgroup("arroyo", "me", {key: ">"}, count=3)
    client.xdel(key, gone)
    pub = RedisPublisher(key=key, url=URL, mode="stream")
    pub.publish(Event(metadata={"ok": True}, payload=np.arange(3)))
    pub.close()
    listener = RedisListener(key=key, url=URL, mode="stream", consumer="me")
    with listening(listener) as sink:
        wait_for(lambda: len(sink.messages) >= 1, timeout=10)
        wait_for(lambda: client.xpending(key, "arroyo")["pending"] == 0, timeout=5)
    assert listener.dropped == 3
    assert listener.drops() == {"undecodable": 1, "no_field": 1, "deleted": 1}
    assert [m.metadata for m in sink.messages] == [{"ok": True}]


def test_passwords_stay_out_of_log_lines():
    assert safe_url("redis://:s3cret@db:6380/1") == "redis://:***@db:6380/1"
    assert safe_url("redis://me:s3cret@db/0") == "redis://me:***@db/0"
    assert safe_url(URL) == URL
    assert "s3cret" not in RedisListener(key="k", url="redis://:s3cret@db:6380/1").name


def test_lost_replies_cause_no_duplicates(client, key, monkeypatch):
    # Publisher: Redis applied a MULTI/EXEC but the connection broke before the reply.
    pub = RedisPublisher(key=key, url=URL, mode="stream", codec="json")
    pub.setup()
    real_send = pub._send
    sends = {"n": 0}

    def reply_lost(client_, chunk):
        real_send(client_, chunk)
        sends["n"] += 1
        if sends["n"] == 3:
            raise redis.ConnectionError("connection broke before the reply (test)")

    monkeypatch.setattr(pub, "_send", reply_lost)
    for i in range(10):
        pub.publish(Event(metadata={"i": i}))
    pub.close()
    assert pub.dropped == 0
    values = [fields[b"data"] for _, fields in client.xrange(key)]
    assert [int(v.split(b'"i": ')[1].split(b"}")[0]) for v in values] == list(range(10))

    # Listener: delivered a batch, then the XACK never reached Redis.
    real_xack = redis.Redis.xack
    acks = {"n": 0}

    def ack_lost(self, *args, **kwargs):
        acks["n"] += 1
        if acks["n"] == 2:
            raise redis.ConnectionError("connection broke before XACK (test)")
        return real_xack(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "xack", ack_lost)
    listener = RedisListener(
        key=key, url=URL, mode="stream", codec="json", batch=3, from_start=True
    )
    with listening(listener) as sink:
        wait_for(lambda: len(sink.messages) >= 10, timeout=10)
        wait_for(lambda: client.xpending(key, "arroyo")["pending"] == 0, timeout=5)
        time.sleep(0.3)  # room for a duplicate to show up
    assert acks["n"] > 2, "the lost XACK was never followed by another"
    assert [m.metadata["i"] for m in sink.messages] == list(range(10))


def test_unreachable_redis_stop_is_prompt_and_drops_are_counted():
    url = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
    for mode in ("channel", "stream"):
        listener = RedisListener(key="nowhere", url=url, mode=mode)
        with listening(listener):
            time.sleep(0.5)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0
    pub = RedisPublisher(key="nowhere", url=url, mode="stream", buffer=5, close_timeout=0.3)
    pub.setup()
    t0 = time.monotonic()
    for i in range(8):
        pub.publish(Event(metadata={"i": i}))
    assert time.monotonic() - t0 < 1.0, "publish() must not wait for an unreachable Redis"
    assert pub.dropped == 3
    assert pub.drops() == {"buffer_full": 3}
    pub.close()
    assert pub.dropped == 8
    assert pub.drops() == {"buffer_full": 3, "unreachable": 5}
    assert time.monotonic() - t0 < 8.0


def test_stop_is_prompt_while_waiting_for_messages(key):
    for mode in ("channel", "stream"):
        with listening(RedisListener(key=key, url=URL, mode=mode, block_ms=200)):
            time.sleep(0.4)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 1.0


# -- real stage processes and redis-cli ------------------------------------------------


FROM_REDIS = """
[topology]
name = from-redis
run_dir = run

[stage:lis]
role = listener
class = arroyo.io.redis:RedisListener
url = {url}
mode = channel
key = {key}
codec = json

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = lis
"""


def test_redis_cli_publish_reaches_a_chain(topo, stages, tmp_path, client, key):
    cli = need_binary("redis-cli")
    path = topo(FROM_REDIS.format(url=URL, key=key, tmp="{tmp}"))
    stages.start(path, "sink")
    stages.start(path, "lis")
    wait_subscribed(client, key)
    for body in ("this is not json", '{"kind":"event","metadata":{"x":1}}'):
        done = subprocess.run(
            [cli, "-h", HOST, "-p", str(PORT), "PUBLISH", key, body],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert done.stdout.strip() == "1", done.stdout  # one subscriber got it
    out = tmp_path / "out.jsonl"
    records = wait_for(lambda: read_jsonl(out), timeout=15)
    assert records[0]["kind"] == "Event"
    assert records[0]["metadata"] == {"x": 1}
    # the value it could not decode shows in the stage's stats (what status reads)
    stats_file = tmp_path / "run" / "stats" / "lis.0.json"

    def drops() -> dict | None:
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return stats if stats.get("drops") else None

    stats = wait_for(drops, timeout=10)
    assert stats["drops"] == {"undecodable": 1}
    assert stats["dropped"] == 1
    assert all(c == 0 for c in stages.stop_all(["lis.0", "sink.0"]).values()), stages.dump()


TO_REDIS = """
[topology]
name = to-redis
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 5
shape = 4, 4

[stage:pub]
role = publisher
class = arroyo.io.redis:RedisPublisher
input = det
url = {url}
mode = stream
key = {key}
codec = json
maxlen = 1000
"""


def test_a_chain_writes_a_stream_redis_cli_can_read(topo, stages, client, key):
    cli = need_binary("redis-cli")
    path = topo(TO_REDIS.format(url=URL, key=key))
    stages.start(path, "pub")
    stages.start(path, "det")
    wait_for(lambda: client.exists(key) and client.xlen(key) >= 7, timeout=15)
    done = subprocess.run(
        [cli, "-h", HOST, "-p", str(PORT), "XRANGE", key, "-", "+"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert '"kind": "start"' in done.stdout
    for frame in range(5):
        assert any(f'"metadata": {{"frame": {frame}, "pool": {frame}}}' in x for x in lines), (
            done.stdout
        )
    assert '"kind": "stop"' in done.stdout
    assert all(c == 0 for c in stages.stop_all(["det.0", "pub.0"]).values()), stages.dump()


# -- a Redis restart in the middle of a stream -------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own, with an append-only file fsynced per write."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.dir = directory
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"server.{self.starts}.log").open("wb")
        options = f"--port {self.port} --bind {HOST} --appendonly yes --appendfsync always"
        self.proc = subprocess.Popen(
            [self.binary, *options.split(), "--save", "", "--dir", str(self.dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        c = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1)
        try:
            wait_for(self._answers(c), timeout=10)
        finally:
            c.close()

    def _answers(self, c: redis.Redis):
        def ping() -> bool:
            assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
            try:
                return bool(c.ping())
            except redis.RedisError:
                return False

        return ping

    def stop(self) -> None:
        """SIGTERM: redis-server fsyncs its append-only file and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0

    def messages(self, stream: str) -> list[Message]:
        """Every entry of ``stream``, decoded (arroyo codec)."""
        c = redis.Redis(host=HOST, port=self.port)
        try:
            entries = c.xrange(stream)
        finally:
            c.close()
        return [
            m for _, fields in entries for m in decode_value(get_codec("arroyo"), fields[b"data"])
        ]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def check_once(frames_seen: list[int], frames: int, where: str, dump: str = "") -> None:
    """Every frame number 0..frames-1 exactly once; duplicates are counted, not hidden."""
    got = Counter(frames_seen)
    missing = sorted(set(range(frames)) - set(got))
    duplicates = {frame: n for frame, n in got.items() if n > 1}
    extra = sum(duplicates.values()) - len(duplicates)
    assert not missing and not duplicates, (
        f"{where}: {len(missing)} frames missing (first: {missing[:10]}), {extra} duplicates "
        f"(frame: count, first: {dict(list(duplicates.items())[:10])})\n{dump}"
    )


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(need_binary("redis-server"), tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


RESTART = """
[topology]
name = restart
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
shape = 16, 16
rate_hz = 600

[stage:pub]
role = publisher
class = arroyo.io.redis:RedisPublisher
input = det
url = {url}
mode = stream
key = frames

[stage:lis]
role = listener
class = arroyo.io.redis:RedisListener
url = {url}
mode = stream
key = frames
from_start = true

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = lis
"""


def test_redis_restart_mid_stream_loses_nothing(topo, stages: Stages, tmp_path, private_redis):
    frames = 2000
    private_redis.start()
    path = topo(RESTART.format(frames=frames, url=private_redis.url, tmp="{tmp}"))
    out = tmp_path / "out.jsonl"
    for name in ("sink", "lis", "pub", "det"):
        stages.start(path, name)

    def events() -> list[dict]:
        return [r for r in read_jsonl(out) if r["kind"] == "Event"]

    def source_stop() -> list[dict]:  # the detector's own Stop (not one made on the way)
        return [r for r in read_jsonl(out) if r["kind"] == "Stop" and "frames" in r["data"]]

    wait_for(lambda: len(events()) >= 300, timeout=20)
    private_redis.stop()
    at_stop = len(events())
    time.sleep(1.0)  # meanwhile the publisher buffers and the listener backs off
    private_redis.start()
    wait_for(source_stop, timeout=30)
    assert at_stop < frames, "the stream ended before Redis went down: nothing was tested"

    # What the publisher wrote: every frame exactly once.
    stream = private_redis.messages("frames")
    check_once([m.metadata["frame"] for m in stream if isinstance(m, Event)], frames, "stream")
    assert sum(isinstance(m, Stop) for m in stream) == 1
    # What the listener delivered: every frame exactly once, then the source's Stop.
    check_once([r["metadata"]["frame"] for r in events()], frames, "sink", stages.dump())
    final = source_stop()
    assert len(final) == 1 and final[0]["data"] == {"frames": frames}, final
    assert read_jsonl(out)[-1] == final[0]
    # Start is not counted here (nor the Stop's seq, which counts events since the
    # last Start): the runtime's links have been seen to hand a run's Start over again
    # when their handshake happens twice at start-up, on det->pub and on lis->sink
    # alike, which is not Redis's doing. The frames above measure the Redis hop.
    assert all(c == 0 for c in stages.stop_all(["det.0", "pub.0", "lis.0", "sink.0"]).values())
    for stage in ("pub.0", "lis.0"):
        assert "retrying with backoff" in stages.log(stage), stages.log(stage)
        assert "connected again" in stages.log(stage), stages.log(stage)
    assert "dropped" not in stages.log("pub.0") and "dropped" not in stages.log("lis.0")
