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

from arroyo.control import supervise
from arroyo.control.status import CpuMeter
from arroyo.topology import load
from tests.conftest import read_jsonl, wait_for
from tests.integration.conftest import arroyo

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


# -- a bursty chain: one frame every 2.5 s, on which the worker spends ~0.1 s of CPU ----


@pytest.fixture
def bursty(sup, tmp_path) -> Iterator[tuple[Any, str]]:
    """The chain running with its dashboard, once the first event reached the sink."""
    from arroyo.control.web import serve

    path = sup(frames=1000, rate=0.4, work="stages.basic:Burn\nrounds = 100000")
    topology = load(path)
    assert supervise.up(topology) == []
    server, _ = serve(topology, port=0)
    try:
        wait_for(lambda: any(r["kind"] == "Event" for r in read_jsonl(tmp_path / "out.jsonl")))
        yield topology, server.url
    finally:
        server.stop()


def _snapshots(url: str, n: int, after: float = 0.0) -> list[dict]:
    """The next ``n`` snapshots of the dashboard taken after time ``after`` (a new one
    comes every STATE_MAX_AGE at most)."""
    out: list[dict] = []
    while len(out) < n:
        last = out[-1]["time"] if out else after

        def newer(last: float = last) -> dict | None:
            state = _call(url + "api/state")[1]
            return state if state["time"] > last else None

        out.append(wait_for(newer))
    return out


def _rows(state: dict, stage: str) -> list[dict]:
    return [r for r in state["rows"] if r["stage"] == stage]


@pytest.mark.timeout(120)
def test_a_bursty_worker_shows_its_cpu_in_every_snapshot_and_in_top(bursty) -> None:
    """Once the dashboard has watched for its CPU window, every snapshot shows the
    bursts (a 0.1 s sample per snapshot caught one about once in twelve)."""
    topology, url = bursty
    first = _snapshots(url, 1)[0]
    watched = first["time"] + CpuMeter.WINDOW
    while _snapshots(url, 1)[0]["time"] < watched:
        pass
    cpu = [_rows(s, "work")[0]["cpu_percent"] for s in _snapshots(url, 5)]
    assert all(c and c > 0 for c in cpu), cpu

    top = arroyo("top", str(topology.path), "--count", "7", "--interval", "1").stdout
    last = top.split("arroyo top ")[-1].splitlines()
    work = next(line.split() for line in last if line.split()[1:2] == ["work"])
    assert float(work[6]) > 0, top[-2000:]  # CPU% of the last table


@pytest.mark.timeout(120)
def test_a_bursty_chain_shows_its_rates_in_every_snapshot(bursty) -> None:
    _, url = bursty
    first = _snapshots(url, 1)[0]
    for state in _snapshots(url, 5, after=first["time"] + CpuMeter.WINDOW):  # the rates' too
        rates = (
            _rows(state, "det")[0]["rate_out"],
            _rows(state, "work")[0]["rate_in"],
            _rows(state, "sink")[0]["rate_in"],
        )
        assert all(r and r > 0 for r in rates), rates
