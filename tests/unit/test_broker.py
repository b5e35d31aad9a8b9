"""What the broker ends share (arroyo.io.broker), and the RabbitMQ ends without a
broker: options, routing keys, and the missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arroyo.errors import ConfigError
from arroyo.io.broker import Backlog, KeyTemplate, safe_url
from arroyo.io.retry import DropCount
from arroyo.message import Event, Start, Stop


def test_safe_url_masks_passwords_of_any_scheme():
    assert (
        safe_url("amqp://guest:guest@127.0.0.1:5672/%2F") == "amqp://guest:***@127.0.0.1:5672/%2F"
    )
    assert safe_url("redis://:s3cret@db:6380/1") == "redis://:***@db:6380/1"
    assert safe_url("amqp://host/vhost") == "amqp://host/vhost"


def test_backlog_drops_the_oldest_when_over_either_bound():
    drops = DropCount("test")
    by_count: Backlog[int] = Backlog(drops, max_messages=3)
    for i in range(5):
        by_count.append(i, 10)
    assert list(by_count) == [2, 3, 4] and by_count.nbytes == 30
    by_bytes: Backlog[int] = Backlog(drops, max_bytes=100)
    for i in range(4):
        by_bytes.append(i, 40)
    assert list(by_bytes) == [2, 3] and by_bytes.nbytes == 80
    by_bytes.append(9, 500)  # over the bound alone: kept, everything older goes
    assert list(by_bytes) == [9] and by_bytes[0] == 9
    assert drops.by_reason == {"buffer_full": 2 + 4}
    assert by_bytes.popleft() == 9 and by_bytes.nbytes == 0 and not by_bytes
    by_count.drop_all("unreachable", "test")
    assert len(by_count) == 0 and drops.by_reason["unreachable"] == 3


def test_key_template_reads_the_message_then_its_runs_start():
    key = KeyTemplate("frames.{detector}.{run:03d}")
    start = Start(data={"detector": "pilatus"}, run=7)
    assert key.render(start, {}) == "frames.pilatus.007"
    event = Event(metadata={"i": 1}, run=7)
    assert key.render(event, start.data) == "frames.pilatus.007"
    assert (
        key.render(Event(metadata={"detector": "eiger"}, run=7), start.data) == "frames.eiger.007"
    )
    with pytest.raises(KeyError, match="detector"):
        key.render(Stop(data={}, run=8), {})
    assert KeyTemplate("{kind}s").render(Stop(data={}), {}) == "stops"
    assert KeyTemplate("plain.key").render(event, {}) == "plain.key"
    for bad in ("frames.{", "frames.{}", "frames.{a.b}", "frames.{a[0]}"):
        with pytest.raises(ValueError, match="frames"):
            KeyTemplate(bad)


def test_rabbitmq_options_are_checked():
    pytest.importorskip("pika")
    from arroyo.io.rabbitmq import RabbitListener, RabbitPublisher

    with pytest.raises(ValueError, match="not a key template"):
        RabbitPublisher(routing_key="frames.{detector")
    with pytest.raises(ValueError, match="codec 'array'"):
        RabbitListener(queue="q", codec="array")  # needs dtype and shape
    with pytest.raises(ValueError, match="longer than 255"):
        RabbitListener(queue="q" * 256)
    with pytest.raises(ValueError, match="name it"):
        RabbitPublisher(routing_key="k", exchange_type="topic")
    listener = RabbitListener(queue="q", url="amqp://me:s3cret@db/%2F", codec="array",
                              dtype="uint16", shape=(4, 4))  # fmt: skip
    assert "s3cret" not in listener.name
    assert listener.params.client_properties["connection_name"].startswith(listener.name)


def test_without_pika_the_core_imports_and_a_stage_names_the_extra():
    code = """
import sys
sys.modules["pika"] = None  # as if it were not installed
import arroyo.io.rabbitmq as rabbitmq
from arroyo.errors import ConfigError
try:
    rabbitmq.RabbitListener(queue="q")
except ConfigError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'arroyo[rabbitmq]'" in done.stdout
    assert issubclass(ConfigError, Exception)
