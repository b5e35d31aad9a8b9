"""The dashboard's HTTP API without a browser: read-only for all, changes need the token."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from arroyo.topology import load

pytest.importorskip("aiohttp")

TOPO = """
[topology]
name = dash
run_dir = run

[chain:main]
stages = det, hits, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 1
shape = 4, 4

[stage:hits]
role = operator
class = stages.reduce:ThresholdFilter
threshold = 1
input = det
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = hits
"""


@pytest.fixture
def dashboard(topo) -> Iterator[tuple[Any, str, str]]:
    from arroyo.control.web import serve

    topology = load(topo(TOPO))
    server, token = serve(topology, port=0)
    try:
        yield topology, server.url, token
    finally:
        server.stop()


def _call(url: str, body: dict | bytes | None = None, token: str = "") -> tuple[int, dict]:
    """GET ``url``, or POST ``body`` (a dict as JSON, or bytes as they are)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("X-Arroyo-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(60)
def test_state_is_open_and_changes_need_the_token(dashboard) -> None:
    topology, url, token = dashboard
    status, state = _call(url + "api/state")
    assert status == 200 and state["running"] is False and state["rows"] == []
    stages = {s["name"]: s for s in state["graph"]["stages"]}
    assert stages["hits"]["live_options"] == ["threshold", "min_pixels"]
    assert stages["hits"]["workers"] == 2 and stages["hits"]["scalable"]
    assert [(x["source"], x["target"]) for x in state["graph"]["links"]] == [
        ("det", "hits"),
        ("hits", "sink"),
    ]

    for wrong in ("", "not-the-token"):
        status, answer = _call(url + "api/scale", {"stage": "hits", "workers": 3}, wrong)
        assert (status, answer["ok"]) == (403, False)
    assert not (topology.run_dir / "workers.json").exists(), "a refused scale changed nothing"

    status, answer = _call(url + "api/set", {"stage": "hits", "values": {"threshold": "x"}}, token)
    assert status == 400 and "expected a number" in answer["error"]
    status, answer = _call(url + "api/set", {"stage": "hits", "values": {"threshold": "7"}}, token)
    assert status == 200 and "not running" in answer["result"]
    status, answer = _call(url + "api/chain", {"chain": "nope", "action": "stop"}, token)
    assert status == 400

    path = topology.run_dir / "web-token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"stage": "hits", "workers": 1e400}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": -1}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": 0}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": 257}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": 2.5}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": true}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": "abc"}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": null}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": NaN}', "workers must be a whole number from 1 to 256"),
        (b'{"stage": "hits", "workers": 1' + b"0" * 400 + b"}", "workers must be a whole"),
        (b'{"workers": 3}', "missing 'stage'"),
        (b'{"stage": ["hits"], "workers": 3}', "stage must be a string"),
        (b"[" * 30_000 + b"]" * 30_000, "expected a JSON body"),
        (b'{"stage": "hits", "values": {"threshold": 1e400}}', "threshold = inf: expected a"),
        (b'{"stage": "hits", "values": {"threshold": -1e400}}', "threshold = -inf: expected a"),
        (b'{"stage": "hits", "values": {"threshold": "abc"}}', "threshold = abc: expected a"),
        (b'{"stage": "hits", "values": {"threshold": [1]}}', "values: threshold must be a"),
        (b'{"stage": "hits", "values": [["threshold", "1"]]}', "values must be a JSON object"),
        (b'{"chain": "main", "action": 1e400}', "action must be start or stop"),
    ],
)
def test_values_of_the_wrong_type_or_out_of_range_answer_400(dashboard, body, reason) -> None:
    topology, url, token = dashboard
    path = "api/set" if b"values" in body else "api/chain" if b"chain" in body else "api/scale"
    status, answer = _call(url + path, body, token)
    assert (status, answer["ok"]) == (400, False), answer
    assert reason in answer["error"] and "\n" not in answer["error"], answer["error"]
    assert not (topology.run_dir / "workers.json").exists(), "a refused scale changed nothing"
    assert not (topology.run_dir / "live").exists(), "a refused set changed nothing"


def test_the_page_is_served_with_plotly_from_the_package(dashboard) -> None:
    _, url, _ = dashboard
    page = urllib.request.urlopen(url, timeout=20).read().decode()
    assert 'src="/static/plotly.min.js"' in page
    head = urllib.request.urlopen(url + "static/plotly.min.js", timeout=20).read(300)
    assert b"plotly.js" in head


@pytest.mark.timeout(120)
def test_chain_stop_and_start_go_through_down_and_up(sup) -> None:
    from arroyo.control import supervise
    from arroyo.control.web import serve

    path = sup(frames=100_000, rate=100)
    topology = load(path)
    assert supervise.up(topology) == []
    server, token = serve(topology, port=0)
    try:
        status, answer = _call(server.url + "api/chain", {"chain": "main", "action": "stop"}, token)
        assert (status, answer["result"]) == (200, "main: stopped")
        assert not supervise.is_running(topology), "down shut supervisord down"
        status, answer = _call(
            server.url + "api/chain", {"chain": "main", "action": "start"}, token
        )
        assert (status, answer["result"]) == (200, "main: running")
        rows = supervise.status_rows(topology)
        assert {r["stage"] for r in rows if r["state"] == "RUNNING"} == {"det", "work", "sink"}
    finally:
        server.stop()
