"""Poison messages from the outside world: a foreign header nested 100,000 deep, an
integer msgpack cannot carry, a string that is not Unicode. Each is one counted drop
at the listener, which keeps its pid; the good messages around it and the run's Stop
all arrive (issue 19, item 3).

Every chain runs under the real supervisord (``arroyo up``), fed by plain pyzmq or
plain redis-py, and is read back through ``arroyo status --json``.
"""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, pids

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

DEEP = 100_000
POISON = [
    b'{"deep": ' + b"[" * DEEP + b"]" * DEEP + b"}",  # too_deep
    b'{"big": 36893488147419103232}',  # 2**65: unencodable (msgpack stops at 2**64 - 1)
    b'{"text": "\\ud800"}',  # a lone surrogate, valid JSON but not UTF-8: unencodable
]
REASONS = {"too_deep": 1, "unencodable": 2}

CHAIN = """
[topology]
name = poison
run_dir = run

[chain:main]
stages = lis, sink

[stage:lis]
role = listener
{listener}

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = lis
"""

ZMQ_LISTENER = """class = arroyo.io.zmq:ZMQListener
endpoint = {endpoint}
codec = {codec}"""

REDIS_LISTENER = """class = arroyo.io.redis:RedisListener
url = {url}
mode = stream
key = {key}
codec = json
from_start = true"""


def stream(good: Callable[[int], bytes], start: bytes, stop: bytes) -> list[bytes]:
    """Start, then five good events before each poison value and five after the last,
    then Stop: twenty good events in all."""
    values = [start]
    for block, poison in enumerate(POISON):
        values += [good(5 * block + i) for i in range(5)]
        values.append(poison)
    return [*values, *(good(15 + i) for i in range(5)), stop]


def json_good(i: int) -> bytes:
    return json.dumps({"kind": "event", "metadata": {"i": i}}).encode()


def header_good(i: int) -> bytes:
    return json.dumps({"i": i}).encode()  # a header alone: an event with metadata only


FRAMES = {
    "json": stream(json_good, b'{"kind": "start"}', b'{"kind": "stop", "data": {"n": 20}}'),
    "header": stream(header_good, b'{"kind": "start"}', b'{"kind": "stop", "n": 20}'),
}


@pytest.fixture
def chain(supervised) -> Callable[[str], Path]:
    """``chain(listener lines)``: the listener and a sink, up under supervisord."""
    return lambda listener: supervised(CHAIN.format(listener=listener, tmp="{tmp}"))


def status_row(path: Path, stage: str) -> dict[str, Any]:
    rows = json.loads(arroyo("status", str(path), "--json").stdout)
    return next(r for r in rows if r["stage"] == stage)


def log_of(path: Path, stage: str) -> str:
    logs = supervise.paths(load(path)).logs
    return (logs / f"{supervise.process_name(stage, 0)}.log").read_text(errors="replace")


def assert_survived(path: Path, pid: int, tmp_path: Path) -> None:
    """Every good event and the Stop arrived, in one whole run; the listener kept
    ``pid`` and ``arroyo status`` counts each poison value under its reason."""
    out = tmp_path / "out.jsonl"

    def stopped_or_restarted() -> bool:
        return pids(path).get("lis_0") != pid or any(r["kind"] == "Stop" for r in read_jsonl(out))

    wait_for(stopped_or_restarted, timeout=60)
    records = read_jsonl(out)
    got = [r["metadata"]["i"] for r in records if r["kind"] == "Event"]
    assert pids(path).get("lis_0") == pid, f"the listener was restarted; events: {got}"
    ((_, events, stop),) = runs_of(records)
    assert got == list(range(20)) and events == 20, got
    assert stop["data"].get("n") == 20 and not stop["data"].get("incomplete"), stop
    row = wait_for(lambda: (r := status_row(path, "lis"))["drops"] == REASONS and r, timeout=20)
    assert row["dropped"] == sum(REASONS.values()) and row["errors"] == 0, row
    log = log_of(path, "lis")
    assert "Traceback" not in log and "publish() failed" not in log, log[-3000:]
    for reason in REASONS:  # one line per reason, not one per value or a traceback
        assert log.count(f"dropped 1 ({reason})") == 1, log[-3000:]
    table = arroyo("status", str(path)).stdout.splitlines()
    fields = next(line.split() for line in table if line.split()[1:3] == ["lis", "0"])
    assert fields[13] == str(row["dropped"]) and fields[-1] == "!", table  # the DROP column


@pytest.mark.parametrize("codec", ["header", "json"])
def test_a_poison_header_is_a_counted_drop_and_the_listener_lives(chain, tmp_path, codec):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        path = chain(ZMQ_LISTENER.format(endpoint=f"tcp://127.0.0.1:{port}", codec=codec))
        pid = pids(path)["lis_0"]
        for frame in FRAMES[codec]:
            sock.send(frame)
        assert_survived(path, pid, tmp_path)
    finally:
        sock.close(0)
        ctx.term()


@pytest.fixture
def redis_key() -> Iterator[tuple[Any, str, str]]:
    """(client, url, key) on the shared Redis; skipped without one (failed under CI)."""
    shared = importlib.import_module("tests.integration.test_redis")  # skips or fails there
    client = shared.redis.Redis(host=shared.HOST, port=shared.PORT)
    key = f"arroyo-test:{uuid.uuid4().hex}"
    try:
        yield client, shared.URL, key
    finally:
        client.delete(key)
        client.close()


def test_a_poison_stream_entry_is_acknowledged_counted_and_never_loops(chain, tmp_path, redis_key):
    client, url, key = redis_key
    for value in FRAMES["json"]:
        client.xadd(key, {"data": value})
    path = chain(REDIS_LISTENER.format(url=url, key=key))  # `up` fails on a crash loop
    pid = pids(path)["lis_0"]
    assert_survived(path, pid, tmp_path)
    wait_for(lambda: client.xpending(key, "arroyo")["pending"] == 0, timeout=10)
    assert client.xlen(key) == len(FRAMES["json"])  # read and acknowledged, not deleted
