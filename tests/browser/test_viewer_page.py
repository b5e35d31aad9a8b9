"""The viewer stage's page in a real browser, fed by real stage processes."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from tests.browser.conftest import event_rate, stats, viewer_url
from tests.conftest import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def _record(tmp_path: Path, **figures: float) -> None:
    """Figures a test measured, printed and kept beside its screenshots."""
    print(json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1))


def test_the_page_shows_a_changing_frame_the_run_profile_and_complete_runs(
    chromium, web_topology, tmp_path: Path
) -> None:
    path = web_topology(frames=150, runs=100, rate=100)  # streams longer than the test
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(viewer_url(path) + "?name=test")
    page.wait_for_function("window.arroyo.shown >= 2", timeout=30_000)
    first_n = page.evaluate("window.arroyo.frame.n")
    shot1 = page.locator("#frame").screenshot(path=str(tmp_path / "frame-1.png"))
    page.wait_for_function(f"window.arroyo.frame.n >= {first_n + 5}", timeout=30_000)
    shot2 = page.locator("#frame").screenshot(path=str(tmp_path / "frame-2.png"))
    assert shot1 != shot2, "the frame did not change between two screenshots"

    # the profile of the run being shown, 64 bins against r
    page.wait_for_function("window.arroyo.lines && window.arroyo.lines.y.I", timeout=30_000)
    lines = page.evaluate("window.arroyo.lines")
    assert lines["x_name"] == "r" and len(lines["y"]["I"]) == 64 == len(lines["x"])
    assert lines["run"] in [r["run"] for r in page.evaluate("window.arroyo.runs")]
    assert page.locator("#lines .scatterlayer .trace path.js-line").count() >= 1

    # the run list: a finished run says complete
    page.wait_for_selector("#runs td.state-complete", timeout=30_000)
    page.screenshot(path=str(tmp_path / "viewer.png"))
    runs = page.evaluate("window.arroyo.runs")
    done = [r for r in runs if r["state"] == "complete"]
    assert done and all(r["missing"] == 0 for r in done)

    # the page's own settings: log scale and another colour map, drawn by the server
    page.select_option("#colormap", "inferno")
    page.select_option("#scale", "log")
    page.wait_for_function(
        "arroyo.frame.colormap === 'inferno' && arroyo.frame.scale === 'log'", timeout=30_000
    )
    page.screenshot(path=str(tmp_path / "viewer-log.png"))
    latencies = page.evaluate("window.arroyo.latencies")
    _record(tmp_path, latency_p50_ms=statistics.median(latencies), shown=len(latencies))


def _skips(path: Path, clients: int) -> dict[str, int] | None:
    """Frames each browser skipped so far, once the viewer counts ``clients`` of them."""
    extra = stats(path, "viewer").get("extra", {})
    by_client = extra.get("skipped_by_client", {})
    return by_client if len(by_client) == clients else None


def _open(chromium, url: str, name: str):
    context = chromium.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.goto(f"{url}?name={name}")
    page.wait_for_function("window.arroyo.shown >= 1", timeout=30_000)
    return context, page


def test_three_browsers_one_stalled_leave_the_chain_rate_alone(
    chromium, web_topology, tmp_path: Path
) -> None:
    path = web_topology(frames=100_000, runs=1, rate=200)
    url = viewer_url(path)
    wait_for(lambda: stats(path, "sink").get("rate_in", 0) > 180, timeout=30)  # at speed
    alone = event_rate(path, "sink", 4.0)

    opened = [_open(chromium, url, name) for name in ("one", "two", "stalled")]
    stalled = opened[2][1]
    cdp = opened[2][0].new_cdp_session(stalled)
    cdp.send("Debugger.enable")
    cdp.send("Debugger.pause")  # its script stops: it never reads another update
    before = wait_for(lambda: _skips(path, 3), timeout=20)
    shown_before = [page.evaluate("window.arroyo.shown") for _, page in opened[:2]]
    watched = event_rate(path, "sink", 4.0)
    time.sleep(1.2)  # one more stats write
    extra = stats(path, "viewer")["extra"]
    after = extra["skipped_by_client"]
    skipped = {name: after[name] - before[name] for name in before}  # over the window
    for _, page in opened[:2]:
        page.screenshot(path=str(tmp_path / f"viewer-{page.evaluate('arroyo.stats.you')}.png"))
    shown = [page.evaluate("window.arroyo.shown") for _, page in opened[:2]]
    latencies = [x for _, page in opened[:2] for x in page.evaluate("window.arroyo.latencies")]
    for context, _ in opened:
        context.close()

    ratio = watched / alone
    _record(
        tmp_path,
        rate_alone=alone,
        rate_with_browsers=watched,
        ratio=ratio,
        latency_p50_ms=statistics.median(latencies),
        skipped_in_window=skipped,
    )
    assert ratio > 0.9, (
        f"the chain slowed down with browsers attached: {alone:.0f} -> {watched:.0f}/s"
    )
    assert extra["clients"] == 3
    assert skipped["stalled"] > 0.8 * 200 * 4, skipped  # ~every frame of the window
    # the live pages kept drawing while the stalled one took nothing
    assert all(n - n0 >= 2 for n, n0 in zip(shown, shown_before, strict=True)), shown
    assert skipped["stalled"] >= max(skipped["one"], skipped["two"]), skipped
