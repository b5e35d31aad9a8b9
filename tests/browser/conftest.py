"""Browser tests: Debian's Chromium driven by Playwright, against real stage processes.

Chromium is /usr/bin/chromium from Debian's ``chromium`` package (``.ci/run`` installs
it; Playwright never downloads a browser here). Without it the tests skip with the
reason, except under CI, where they fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import in_ci, wait_for
from tests.integration.conftest import stage_procs, supervisord_procs

CHROMIUM = Path("/usr/bin/chromium")
# As root, in a sandbox with no network: see the machine notes in docs/web.md.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

WEB_TOPO = """
[topology]
name = web
run_dir = run

[chain:main]
stages = det, prof, hits, sink, viewer

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
runs = {runs}
shape = 256, 256
rate_hz = {rate}

[stage:prof]
role = operator
class = stages.reduce:RadialProfile
bins = 64
input = det (pub)
scalable = false

[stage:hits]
role = operator
class = stages.reduce:ThresholdFilter
threshold = 0
input = det
workers = {workers}

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = hits

[stage:viewer]
role = publisher
class = arroyo.io.viewer:LiveViewer
port = 0
max_fps = 10
input = det (pub), prof
"""


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI needs the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} not found (Debian package chromium: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _unavailable(f"playwright is not installed ({e})")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def web_topology(topo) -> Iterator[Callable[..., Path]]:
    """Writes WEB_TOPO, starts it under supervisord; brings it down afterwards."""
    made: list[Path] = []

    def up(frames: int = 200, runs: int = 1, rate: float = 100, workers: int = 1) -> Path:
        path = topo(WEB_TOPO.format(frames=frames, runs=runs, rate=rate, workers=workers))
        made.append(path)
        assert supervise.up(load(path)) == []
        return path

    yield up
    for path in made:
        conf = supervise.paths(load(path)).conf
        try:
            supervise.down(load(path), timeout=60)
        finally:
            for p in supervisord_procs(conf) + stage_procs(path):
                p.kill()


def stats(path: Path, stage: str, worker: int = 0) -> dict[str, Any]:
    try:
        return json.loads((load(path).run_dir / "stats" / f"{stage}.{worker}.json").read_text())
    except (OSError, ValueError):
        return {}


def viewer_url(path: Path) -> str:
    return wait_for(lambda: stats(path, "viewer").get("extra", {}).get("url"), timeout=30)


def event_rate(path: Path, stage: str, seconds: float) -> float:
    """Events per second ``stage`` received over about ``seconds``, from its stats file
    (its own clock and counts, rewritten once a second)."""
    import time

    first = wait_for(lambda: stats(path, stage).get("time") and stats(path, stage), timeout=20)
    time.sleep(seconds)
    last = wait_for(lambda: (s := stats(path, stage)).get("time", 0) > first["time"] and s, 20)
    return (last["received"] - first["received"]) / (last["time"] - first["time"])
