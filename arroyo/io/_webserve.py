"""An aiohttp server on a thread of its own, for processes whose main loop is synchronous.

The viewer stage and the dashboard both serve from a daemon thread running its own
event loop, so that the stage's hot loop (synchronous ZeroMQ) never waits for a
browser and the browsers' sockets never wait for the hot loop. Browser assets come from
installed packages: plotly.js from the ``plotly`` wheel, nothing from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import threading
from collections.abc import Callable
from importlib.resources.abc import Traversable
from typing import Any

from arroyo.errors import ConfigError

log = logging.getLogger("arroyo.web")


def require_web() -> None:
    """ConfigError unless the ``web`` extra (aiohttp, plotly) is installed."""
    try:
        import aiohttp  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as e:
        msg = f"the web pages need the 'web' extra (pip install 'arroyo[web]'): {e}"
        raise ConfigError(msg) from e


def plotly_js() -> Traversable:
    """plotly.js as shipped inside the installed plotly package."""
    path = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
    if not path.is_file():
        msg = f"plotly.min.js not found in the installed plotly package ({path})"
        raise ConfigError(msg)
    return path


def page(package: str, name: str) -> str:
    """An HTML page shipped beside the code in ``package``."""
    return (importlib.resources.files(package) / name).read_text(encoding="utf-8")


def add_assets(app: Any) -> None:
    """Serve ``/static/plotly.min.js`` from the installed package (cached by browsers)."""
    from aiohttp import web

    asset = plotly_js()

    async def plotly_handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(str(asset), headers={"Cache-Control": "max-age=86400"})

    app.router.add_get("/static/plotly.min.js", plotly_handler)


class BackgroundServer:
    """Runs ``make_app()``'s aiohttp application on ``host:port`` in a daemon thread."""

    def __init__(self, make_app: Callable[[], Any], host: str, port: int, name: str) -> None:
        self.make_app = make_app
        self.host = host
        self.port = port
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._runner: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> None:
        """Bind and serve; ConfigError if the address cannot be bound."""
        self._thread = threading.Thread(target=self._main, daemon=True, name=self.name)
        self._thread.start()
        if not self._ready.wait(timeout):
            msg = f"{self.name}: server did not start within {timeout:.0f}s"
            raise ConfigError(msg)
        if self._error is not None:
            msg = f"{self.name}: cannot serve on {self.host}:{self.port}: {self._error}"
            raise ConfigError(msg) from self._error

    def _main(self) -> None:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            loop.run_until_complete(site.start())
            server = site._server  # the bound port when 0 was asked for
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    def call(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the server's loop soon (from any thread)."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                self.loop.call_soon_threadsafe(callback)

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop is None or self._thread is None:
            return
        self.call(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: server thread still running after %.0fs", self.name, timeout)
