"""The dashboard (``arroyo web``) in a real browser, on a running topology."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import arroyo_bin

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture
def dashboard(web_topology, tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """The web topology running, and ``arroyo web`` serving it: (path, url, token)."""
    path = web_topology(frames=100_000, runs=1, rate=100, workers=1)
    log = (tmp_path / "web.log").open("w")
    proc = subprocess.Popen(
        [arroyo_bin("arroyo"), "web", str(path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()  # dashboard: URL#token=TOKEN
        assert line.startswith("dashboard: "), (line, (tmp_path / "web.log").read_text())
        url, _, token = line.removeprefix("dashboard: ").partition("#token=")
        yield path, url, token
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _hits_workers(path: Path) -> int:
    rows = supervise.status_rows(load(path))
    return sum(1 for r in rows if r["stage"] == "hits" and r["state"] == "RUNNING")


def test_the_dashboard_lists_every_worker_and_scales_only_with_the_token(
    chromium, dashboard, tmp_path: Path
) -> None:
    path, url, token = dashboard
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_function(
        "arroyo.state && arroyo.state.rows.some(r => r.stage === 'sink' && r.rate_in > 50)",
        timeout=30_000,
    )
    page.wait_for_function("arroyo.refreshes >= 2", timeout=30_000)
    rows = page.locator("#workers tbody tr")
    listed = {(r.get_attribute("data-stage"), r.get_attribute("data-worker")) for r in rows.all()}
    assert listed == {(s, "0") for s in ("det", "prof", "hits", "sink", "viewer")}
    sink_rate = page.locator("#workers tr[data-stage=sink] td.rate").inner_text()
    assert float(sink_rate) > 50
    assert page.locator("#graph .scatterlayer .point").count() == 5
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    scale_row = page.locator("#stages tr[data-stage=hits]")
    scale_row.locator("input.n").fill("2")
    scale_row.locator("button.scale").click()  # no token yet
    page.wait_for_function("arroyo.lastAction && arroyo.lastAction.status === 403", timeout=30_000)
    assert "token required" in page.locator("#message").inner_text()
    assert _hits_workers(path) == 1

    page.fill("#token", token)
    page.dispatch_event("#token", "change")
    scale_row.locator("button.scale").click()
    page.wait_for_function("arroyo.lastAction && arroyo.lastAction.ok", timeout=60_000)
    assert _hits_workers(path) == 2
    page.wait_for_selector("#workers tr[data-stage=hits][data-worker='1']", timeout=30_000)

    # a live option, set from the page: the same path as `arroyo set`
    live_row = page.locator("#stages tr[data-stage=viewer]")
    live_row.locator("select.key").select_option("scale")
    live_row.locator("input.value").fill("sideways")
    live_row.locator("button.set").click()
    page.wait_for_function("arroyo.lastAction && arroyo.lastAction.status === 400", timeout=30_000)
    assert "expected one of 'linear', 'log'" in page.locator("#message").inner_text()
    live_row.locator("input.value").fill("log")
    live_row.locator("button.set").click()
    page.wait_for_function("arroyo.lastAction && arroyo.lastAction.ok", timeout=30_000)
    assert "viewer[0]: applied" in page.locator("#message").inner_text()
    page.wait_for_selector("#workers tr[data-stage=viewer] >> text=scale=log (v1)", timeout=30_000)
    page.screenshot(path=str(tmp_path / "dashboard-scaled.png"), full_page=True)
