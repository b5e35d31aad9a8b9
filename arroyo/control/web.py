"""The dashboard: ``arroyo web TOPOLOGY`` serves the whole graph live in a browser.

Read-only for anyone who can reach it (127.0.0.1 by default); what changes state
(scale a stage, stop or start a chain, set live options) needs the token printed at
start, also kept in ``RUN_DIR/web-token`` (mode 0600) for the run_dir's owner. Those
actions call the very functions the CLI calls (``supervise.scale``, ``up``, ``down``,
``live.set_values``), on a worker thread, one at a time.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from arroyo.control.clibase import TOPOLOGY, main, user_errors
from arroyo.errors import ArroyoError, TopologyError
from arroyo.topology import MAX_WORKERS, Topology, load

if TYPE_CHECKING:  # asyncio and the rest load with the server, not with every command
    import asyncio

log = logging.getLogger("arroyo.web")

TOKEN_HEADER = "X-Arroyo-Token"
STATE_MAX_AGE = 0.8  # seconds a status snapshot is shared between browsers


def token_path(topology: Topology) -> Path:
    return topology.run_dir / "web-token"


def make_token(topology: Topology) -> str:
    import secrets

    token = secrets.token_urlsafe(18)
    path = token_path(topology)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def graph(topology: Topology) -> dict[str, Any]:
    """Stages with their level (columns of the drawing) and links."""
    from arroyo.control.render import worker_count

    stages = []
    for name, spec in topology.stages.items():
        cls_live: tuple[str, ...] = ()
        try:
            cls_live = tuple(getattr(spec.load_class(), "live_options", ()))
        except Exception:  # an unimportable class: shown, just without live options
            cls_live = ()
        stages.append(
            {
                "name": name,
                "role": spec.role,
                "class": spec.class_path,
                "chain": spec.chain,
                "workers": worker_count(topology, name),
                "scalable": spec.scalable,
                "device": spec.device,
                "live_options": list(cls_live),
                "inputs": list(spec.inputs),
            }
        )
    links = [
        {"name": link.name, "source": link.source, "target": link.target, "pattern": link.pattern}
        for link in topology.links
    ]
    return {"name": topology.name, "chains": topology.chains, "stages": stages, "links": links}


class Dashboard:
    def __init__(self, topology: Topology, token: str) -> None:
        self.topology = topology
        self.token = token
        self._state: dict[str, Any] | None = None
        self._state_at = 0.0
        self._state_lock: asyncio.Lock | None = None
        self._action_lock: asyncio.Lock | None = None
        from arroyo.control.status import CpuMeter

        self._cpu = CpuMeter()  # kept: each snapshot shows the CPU of the last seconds

    def make_app(self) -> Any:
        from aiohttp import web

        from arroyo.io import _webserve

        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/", self.index)
        app.router.add_get("/api/state", self.state)
        app.router.add_post("/api/scale", self.scale)
        app.router.add_post("/api/chain", self.chain)
        app.router.add_post("/api/set", self.set_live)
        app.router.add_get("/favicon.ico", _no_icon)
        _webserve.add_assets(app)
        return app

    async def index(self, request: Any) -> Any:
        from aiohttp import web

        from arroyo.io import _webserve

        text = _webserve.page("arroyo.control", "dashboard.html")
        return web.Response(text=text, content_type="text/html")

    async def state(self, request: Any) -> Any:
        import asyncio

        from aiohttp import web

        if self._state_lock is None:
            self._state_lock = asyncio.Lock()
        async with self._state_lock:
            if self._state is None or time.monotonic() - self._state_at > STATE_MAX_AGE:
                loop = asyncio.get_running_loop()
                self._state = await loop.run_in_executor(None, self._snapshot)
                self._state_at = time.monotonic()
        return web.json_response(self._state, dumps=_dumps)

    def _snapshot(self) -> dict[str, Any]:
        from arroyo.control import supervise
        from arroyo.runtime.stats import link_totals

        try:
            rows = supervise.status_rows(self.topology, self._cpu)
            error = ""
        except Exception as e:  # supervisord going away mid-read: show, retry next time
            rows, error = [], f"{type(e).__name__}: {e}"
        return {
            "time": time.time(),
            "running": supervise.is_running(self.topology),
            "graph": graph(self.topology),
            "rows": rows,
            "links": link_totals(rows),
            "error": error,
        }

    # -- actions (token required) ----------------------------------------------------

    def _allowed(self, request: Any) -> bool:
        import hmac

        given = request.headers.get(TOKEN_HEADER, "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def _act(self, request: Any, action: Any) -> Any:
        import asyncio

        from aiohttp import web

        if not self._allowed(request):
            return web.json_response({"ok": False, "error": "token required"}, status=403)
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: hostile nesting
            return web.json_response({"ok": False, "error": "expected a JSON body"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"ok": False, "error": "expected a JSON object"}, status=400)
        if self._action_lock is None:
            self._action_lock = asyncio.Lock()
        async with self._action_lock:
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(None, action, body)
            except (ArroyoError, ValueError, KeyError, TypeError) as e:
                return web.json_response({"ok": False, "error": _one_line(e)}, status=400)
        self._state = None  # the next refresh shows the change
        log.info("%s %s: %s", request.path, body, result)
        return web.json_response({"ok": True, "result": result})

    async def scale(self, request: Any) -> Any:
        from arroyo.control import supervise

        def action(body: dict[str, Any]) -> str:
            stage, workers = _text(body, "stage"), _workers(body)
            old, new = supervise.scale(self.topology, stage, workers)
            return f"{stage}: {old} -> {new} workers"

        return await self._act(request, action)

    async def chain(self, request: Any) -> Any:
        from arroyo.control import supervise

        def action(body: dict[str, Any]) -> str:
            chain, what = _text(body, "chain"), body.get("action")
            if chain not in self.topology.chains:
                msg = f"no chain {chain!r}"
                raise ValueError(msg)
            if what == "stop":
                supervise.down(self.topology, (chain,))
                return f"{chain}: stopped"
            if what == "start":
                problems = supervise.up(self.topology, (chain,))
                if problems:
                    raise ValueError("; ".join(problems))
                return f"{chain}: running"
            msg = f"action must be start or stop, not {_show(what)}"
            raise ValueError(msg)

        return await self._act(request, action)

    async def set_live(self, request: Any) -> Any:
        from arroyo.control.live import refusal_line, set_values

        def action(body: dict[str, Any]) -> str:
            stage, values = _text(body, "stage"), _values(body)
            outcome = set_values(self.topology, stage, values, wait=5.0)
            if outcome.refused_by_all:
                raise ValueError(refusal_line(self.topology, stage, values, outcome))
            lines = [*outcome.applied, outcome.idle]
            lines += [f"{w}: not yet applied" for w in outcome.late]
            refused = [f"{w}: refused: {why}" for w, why in outcome.refused.items()]
            text = ", ".join(f"{k}={v}" for k, v in values.items())
            tail = "; ".join(line for line in refused + lines if line)
            summary = f"{stage}: {text} (version {outcome.version}){': ' + tail if tail else ''}"
            if refused:  # some workers took it, others did not: not a success
                raise ValueError(summary)
            return summary

        return await self._act(request, action)


# -- what the actions accept: JSON of the right type and range, or 400 with a reason --


def _show(value: Any) -> str:
    """``value`` as the JSON it came as, cut short for an error line."""
    import json

    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(body: dict[str, Any], key: str) -> str:
    if key not in body:
        msg = f"missing {key!r}"
        raise ValueError(msg)
    if not isinstance(body[key], str):
        msg = f"{key} must be a string, not {_show(body[key])}"
        raise ValueError(msg)
    return str(body[key])


def _workers(body: dict[str, Any]) -> int:
    """A worker count: a JSON integer in range (not 2.5, true, "3" or 1e400)."""
    value = body.get("workers")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        msg = f"workers must be a whole number from 1 to {MAX_WORKERS}, not {_show(value)}"
        raise ValueError(msg)
    return value


def _values(body: dict[str, Any]) -> dict[str, str]:
    """Live values as the INI text the converters take: strings, numbers and booleans
    (a number that the converter refuses, 1e400 say, is refused there, by name)."""
    values = body.get("values")
    if not isinstance(values, dict):
        msg = f"values must be a JSON object of option: value, not {_show(values)}"
        raise ValueError(msg)
    out = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            msg = f"values: {key} must be a string or a number, not {_show(value)}"
            raise ValueError(msg)
    return out


def _one_line(error: Exception) -> str:
    if isinstance(error, TopologyError):
        return "; ".join(error.problems)
    return str(error)


async def _no_icon(request: Any) -> Any:
    from aiohttp import web

    return web.Response(status=204)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=str)


def serve(topology: Topology, host: str = "127.0.0.1", port: int = 8764) -> tuple[Any, str]:
    """Start the dashboard in a background thread; returns (server, token)."""
    from arroyo.io import _webserve

    _webserve.require_web()
    token = make_token(topology)
    dash = Dashboard(topology, token)
    server = _webserve.BackgroundServer(dash.make_app, host, port, "arroyo-dashboard")
    server.start()
    return server, token


@main.command()
@TOPOLOGY
@click.option("--host", default="127.0.0.1", show_envvar=True, help="Address to listen on.")
@click.option("--port", type=int, default=8764, show_envvar=True, help="Port (0: any free).")
@user_errors
def web(topology: str, host: str, port: int) -> None:
    """Serve the dashboard of TOPOLOGY until Ctrl-C.

    Anyone who can reach it may look; scaling, stopping and starting chains and setting
    live options need the token printed here (also in RUN_DIR/web-token)."""
    topo = load(topology)
    server, token = serve(topo, host, port)
    click.echo(f"dashboard: {server.url}#token={token}")
    click.echo(f"token: {token} (also in {token_path(topo)})", err=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
