"""The viewer's page looks back (issue 21): step through the kept frames of the current
run and of an earlier one, pause, return to live; empty states; axes with units."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from arroyo.io.viewer import LiveViewer
from arroyo.message import Event, Start, Stop
from stages.synthetic import POOL_SIZE
from tests.browser.conftest import viewer_url

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

FRAME = "window.arroyo.frame"


def _frame(page) -> dict:
    return page.evaluate(FRAME)


def test_the_page_steps_back_in_the_run_shows_an_earlier_run_and_returns_to_live(
    chromium, web_topology, tmp_path: Path
) -> None:
    # 60 frames a run at 20 Hz: the ring (200 events) holds the last three runs
    path = web_topology(frames=60, runs=100, rate=20)
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(viewer_url(path) + "?name=lookback")
    # live, 6 to 25 frames into a run (so that five back is in it, and the run still
    # goes on when the click lands), with an earlier run kept
    page.wait_for_function(
        f"""{FRAME} && arroyo.view.live && {FRAME}.index >= 6 && {FRAME}.index <= 25
        && arroyo.runs.some((r) => r.run < {FRAME}.run && r.count > r.first)""",
        timeout=30_000,
    )
    page.click("#pause")
    page.wait_for_function(
        f"!arroyo.view.live && {FRAME}.index === arroyo.view.index", timeout=10_000
    )
    paused = _frame(page)
    run, index, seq = paused["run"], paused["index"], paused["seq"]
    assert index >= 5, paused

    # five back: two with the keyboard, three with the button
    page.locator("body").click(position={"x": 5, "y": 5})
    for _ in range(2):
        page.keyboard.press("ArrowLeft")
    for _ in range(3):
        page.click("#back")
    page.wait_for_function(f"{FRAME}.index === {index - 5}", timeout=10_000)
    back = _frame(page)
    assert (back["run"], back["seq"]) == (run, seq - 5), (paused, back)
    assert back["digest"] != paused["digest"], "the image did not change"
    label = page.text_content("#shown")
    assert f"run {run} " in label and f"seq {seq - 5} " in label and "paused" in label, label
    # the 1-D panel follows the chosen frame: its profile, same run and seq
    page.wait_for_function(f"arroyo.lines && arroyo.lines.seq === {seq - 5}", timeout=10_000)
    assert page.evaluate("arroyo.lines.run") == run
    page.screenshot(path=str(tmp_path / "back-five.png"))

    # the chain goes on while this page stays put
    frames_then = page.evaluate("arroyo.stats.frames")
    page.wait_for_function(f"arroyo.stats.frames >= {frames_then + 5}", timeout=20_000)
    assert _frame(page) == back

    # an earlier run, from the run list: its last kept frame
    runs = {r["run"]: r for r in page.evaluate("arroyo.runs")}
    before = max(r for r in runs if r < run)
    page.click(f'#runs tr[data-run="{before}"]')
    page.wait_for_function(f"{FRAME}.run === {before}", timeout=10_000)
    earlier = _frame(page)
    assert earlier["index"] == runs[before]["count"] - 1 == 59, (earlier, runs[before])
    assert earlier["seq"] == 59
    if back["seq"] % POOL_SIZE != 59 % POOL_SIZE:  # (the source cycles through its frames)
        assert earlier["digest"] != back["digest"]
    page.screenshot(path=str(tmp_path / "earlier-run.png"))

    # live again: it follows new frames
    page.click("#live")
    page.wait_for_function(f"arroyo.view.live && {FRAME}.run >= {run}", timeout=10_000)
    n = _frame(page)["n"]
    page.wait_for_function(f"{FRAME}.n >= {n + 3} && arroyo.view.live", timeout=20_000)
    assert "live" in page.text_content("#shown")


@pytest.fixture
def viewer() -> Iterator[LiveViewer]:
    v = LiveViewer(port=0, max_fps=30, max_side=64, keep_frames=3)
    v.setup()
    try:
        yield v
    finally:
        v.close()


def _text(page, selector: str) -> str:
    return (page.text_content(selector) or "").strip()


def test_empty_panels_say_what_is_awaited_and_axes_carry_units(
    chromium, viewer: LiveViewer, tmp_path: Path
) -> None:
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.goto(viewer.server.url + "?name=empty")
    page.wait_for_function("window.arroyo.updates >= 1", timeout=20_000)
    assert page.is_visible("#frame-empty") and _text(page, "#frame-empty") == (
        "waiting for the first frame"
    )
    assert _text(page, "#lines-empty") == "waiting for the first event"
    assert _text(page, "#series-empty") == "no scalars yet"
    assert page.is_visible("#runs-empty") and _text(page, "#runs-empty") == "no runs yet"
    page.screenshot(path=str(tmp_path / "empty.png"))

    # a whole run of frames alone: no 1-D data, no scalars in this chain
    viewer.publish(Start(run=1))
    for seq in range(6):
        viewer.publish(Event(payload=np.full((32, 32), seq, np.uint16), run=1, seq=seq))
    viewer.publish(Stop(run=1, seq=6))
    page.wait_for_function("arroyo.stats.stops === 1 && arroyo.frame", timeout=20_000)
    assert not page.is_visible("#frame-empty") and not page.is_visible("#runs-empty")
    assert _text(page, "#lines-empty").startswith("no 1-D data in this chain")
    assert _text(page, "#series-empty").startswith("no scalars in this chain")
    assert page.text_content("#frame .g-xtitle") == "column (px)"
    assert page.text_content("#frame .g-ytitle") == "row (px)"

    # a run with a profile against q in nm^-1 (the Start's units) and scalars
    viewer.publish(Start(run=2, data={"units": {"q": "nm^-1"}, "unit": "photons"}))
    q = np.linspace(0.1, 2.0, 50)
    for seq in range(3):
        meta = {"roi": 3.5 + seq, "roi_unit": "counts"}
        viewer.publish(Event(metadata=meta, payload=np.eye(32) * seq, run=2, seq=seq))
        viewer.publish(Event(metadata=meta, payload={"q": q, "I": q * seq}, run=2, seq=seq))
    page.wait_for_function("arroyo.lines && arroyo.lines.run === 2 && arroyo.lines.seq === 2")
    page.wait_for_function("arroyo.event && arroyo.event.seq === 2 && arroyo.frame.seq === 2")
    assert page.text_content("#lines .g-xtitle") == "q (nm^-1)"
    assert page.text_content("#lines .g-ytitle") == "I"
    assert "photons" in (page.text_content("#frame .colorbar") or "")
    assert not page.is_visible("#lines-empty") and not page.is_visible("#series-empty")
    row = _text(page, "#event tbody tr")
    assert "roi" in row and "5.5" in row and "counts" in row, row

    # back to seq 1 of run 2: the table and the line plot follow
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("arroyo.event.seq === 1 && arroyo.lines.seq === 1 && !arroyo.view.live")
    assert "4.5" in _text(page, "#event tbody tr")
    # the other controls: first, last, the frame box, the slider
    for how, seq in (("#first", 0), ("#last", 2), ("box", 1), ("slider", 0)):
        if how == "box":
            page.fill("#index", str(seq))
            page.press("#index", "Enter")
        elif how == "slider":
            page.fill("#slider", str(seq))
        else:
            page.click(how)
        page.wait_for_function(f"arroyo.frame.seq === {seq} && arroyo.event.seq === {seq}")
        assert page.evaluate("arroyo.view.index") == seq and "paused" in _text(page, "#shown")
    # run 1's frames are no longer kept (a ring of 3 events): the page says so
    page.click('#runs tr[data-run="1"]')
    page.wait_for_function("arroyo.view.run === 1 && !!arroyo.view.why")
    assert page.is_visible("#frame-empty")
    assert _text(page, "#frame-empty").startswith("frame no longer kept (the ring holds the last 3")
    page.screenshot(path=str(tmp_path / "gone.png"))
