"""The viewer's server with real websocket clients (no browser): latest-only fan-out."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from arroyo.io.viewer import LiveViewer
from arroyo.message import Event, Start

aiohttp = pytest.importorskip("aiohttp")


class WsClient(threading.Thread):
    """A websocket client on a loop of its own: acknowledges each update, or never
    reads anything once connected (``stalled``)."""

    def __init__(self, url: str, name: str, stalled: bool = False) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.stalled = url, name, stalled
        self.updates: list[dict] = []
        self.connected = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        url = f"{self.url}ws?name={self.name}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            self.connected.set()
            while not self.done.is_set():
                if self.stalled:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    msg = await ws.receive(timeout=0.2)
                except TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self.updates.append(json.loads(msg.data))
                await ws.send_str("ack")


@pytest.fixture
def viewer() -> Iterator[LiveViewer]:
    v = LiveViewer(port=0, max_fps=30, max_side=64)
    v.setup()
    try:
        yield v
    finally:
        v.close()


def _publish_for(v: LiveViewer | None, seconds: float, frames: list[np.ndarray]) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        event = Event(metadata={"frame": n}, payload=frames[n % len(frames)], run=1, seq=n)
        if v is not None:
            v.publish(event)
        else:
            frames[n % len(frames)].sum()  # the same work without a viewer
        n += 1
    return n / (time.perf_counter() - t0)


@pytest.mark.timeout(60)
def test_the_page_and_plotly_come_from_the_installed_packages(viewer: LiveViewer) -> None:
    url = viewer.server.url
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    assert '<script src="/static/plotly.min.js">' in page and "http" not in page.split("<body>")[0]
    js = urllib.request.urlopen(url + "static/plotly.min.js", timeout=10).read(200).decode()
    assert "plotly.js" in js


@pytest.mark.timeout(60)
def test_a_stalled_client_skips_frames_and_never_slows_publish(viewer: LiveViewer) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 1000, (256, 256), dtype=np.uint16) for _ in range(4)]
    viewer.publish(Start(run=1))
    alone = _publish_for(viewer, 1.5, frames)
    clients = [
        WsClient(viewer.server.url, n, stalled=(n == "stalled")) for n in ("a", "b", "stalled")
    ]
    for c in clients:
        c.start()
    try:
        for c in clients:
            assert c.connected.wait(10)
        time.sleep(0.3)
        before = viewer.state.frames
        watched = _publish_for(viewer, 2.0, frames)
        published = viewer.state.frames - before
        time.sleep(0.3)
        stats = viewer.stats()
    finally:
        for c in clients:
            c.done.set()
        for c in clients:
            c.join(10)
    print(f"publish rate alone {alone:.0f}/s, with 3 clients {watched:.0f}/s")
    assert watched > 0.5 * alone, (alone, watched)  # generous: the clients share this CPU
    by_client = stats["skipped_by_client"]
    assert by_client["stalled"] >= published - 1, stats
    assert all(len(c.updates) >= 3 for c in clients[:2])
    frames_seen = [u["frame"]["n"] for u in clients[0].updates if "frame" in u]
    assert frames_seen == sorted(set(frames_seen)), "newest first, never an old frame again"
    assert stats["skipped"] == sum(by_client.values())
    assert stats["clients"] == 3


def test_a_hostile_browser_message_is_ignored_and_the_client_still_served(
    viewer: LiveViewer,
) -> None:
    """A browser's message is foreign input: one nested 30,000 deep is ignored, and
    the same connection's next settings still apply."""

    async def main() -> dict:
        url = f"{viewer.server.url}ws?name=hostile"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            await ws.send_str("[" * 30_000 + "]" * 30_000)  # under the 64 KiB limit
            await ws.send_str(json.dumps({"settings": {"scale": "log"}}))
            viewer.publish(Start(run=1))
            # a frame now and then: the server may register this client after the first
            for _ in range(40):
                viewer.publish(Event(run=1, payload=np.ones((8, 8), np.uint16)))
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    continue
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                update = json.loads(msg.data)
                if "frame" in update:
                    return update
                await ws.send_str("ack")  # the server sends the next update after an ack
            raise AssertionError("no frame in 20 s")

    update = asyncio.run(main())
    assert update["frame"]["run"] == 1
