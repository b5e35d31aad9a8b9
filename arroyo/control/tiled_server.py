"""The Tiled server of ``scripts/demo --tiled``: a real ``tiled serve config`` on the
host and port of the topology's TiledWriter ``url``, its catalog and data in
``RUN_DIR/tiled/`` (made afresh by each demo), with a streaming cache in memory, which
the Tiled listener's websocket subscriptions need.

The server runs in a session of its own, so that the Ctrl-C that stops the demo does
not reach it: it must outlive the chain's clean stop, whose last writes (each run's
``stop``) go to it. ``stop`` always ends it: SIGTERM, then SIGKILL after a bounded
wait. A server a killed demo left behind is found by its pid file and ended at the
next start. Its API key is random per start, alphanumeric (Tiled refuses ``_`` and
``-``), and kept in ``RUN_DIR/tiled/api-key`` (mode 0600), never printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from arroyo.errors import ArroyoError, ConfigError
from arroyo.topology import Topology

READY_SECONDS = 60.0  # 3-8 s here; generous on two busy cores
STOP_SECONDS = 10.0  # then SIGKILL
# What the Tiled demo imports or runs, and what installs it.
NEEDS = (
    ("tiled.client", "the Tiled client", "arroyo[tiled]"),
    ("pyarrow", "pyarrow", "arroyo[tiled]"),
    ("pyFAI", "pyFAI", "arroyo[pyfai]"),
    ("tiled.server", "the Tiled server", "tiled[server]"),
)


def require() -> None:
    """``ConfigError`` (one line: what is missing, what to install) unless every part
    of the Tiled demo is installed."""
    missing = [(what, extra) for module, what, extra in NEEDS if not _installed(module)]
    if missing:
        whats = ", ".join(dict.fromkeys(what for what, _ in missing))
        extras = " ".join(f"'{extra}'" for extra in dict.fromkeys(e for _, e in missing))
        msg = f"the Tiled demo needs {whats}: pip install {extras}"
        raise ConfigError(msg)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # (its parent package is missing)
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class TiledServer:
    """One ``tiled serve config`` process serving ``url`` from ``folder``; the
    containers of ``node`` (a path, empty: none) are made once it answers."""

    def __init__(self, url: str, folder: Path, node: str = "") -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            msg = f"the Tiled demo serves http://HOST:PORT itself; cannot serve {url!r}"
            raise ConfigError(msg)
        self.url = f"http://{parts.hostname}:{parts.port}"
        self.host, self.port = parts.hostname, parts.port
        self.folder, self.node = folder, node.strip("/")
        self.key = secrets.token_hex(16)
        self.pidfile = folder / "server.pid"
        self.log = folder / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:  # (no key)
        return f"TiledServer(url={self.url!r}, folder={str(self.folder)!r})"

    def start(self, fresh: bool = True) -> None:
        """The server started and answering, ``node`` made; ``ArroyoError`` (the log's
        tail) if it does not come up. ``fresh``: a new catalog (else the folder's, as a
        server stopped and started again serves the same data)."""
        stop_stray(self.folder)
        if not _port_free(self.host, self.port):
            msg = f"cannot serve Tiled at {self.url}: the port is in use (another Tiled demo?)"
            raise ConfigError(msg)
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)
        for sub in ("data", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        config = self._config()
        env = {**os.environ, "TMPDIR": str(self.folder / "tmp")}  # Tiled never cleans it
        cmd = [sys.executable, "-m", "tiled", "serve", "config", str(config)]
        cmd += ["--host", self.host, "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C is the demo's: it stops this last
            )  # fmt: skip
        self.pidfile.write_text(str(self.proc.pid))
        deadline = time.monotonic() + READY_SECONDS
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                msg = f"the Tiled server did not start ({self.log}): {' '.join(tail)}"
                raise ArroyoError(msg)
            time.sleep(0.2)
        self._make_node()

    def _config(self) -> Path:
        """The server's YAML: one writable SQLite catalog at the root, arrays as files
        and tables in SQLite beside it, streaming cache in memory. Mode 0600 (the key)."""
        key_file = self.folder / "api-key"
        config = self.folder / "config.yml"
        for path in (key_file, config):
            path.touch(mode=0o600)
        key_file.write_text(self.key)
        config.write_text(
            f"authentication:\n  single_user_api_key: {self.key}\n"
            f"trees:\n  - path: /\n    tree: catalog\n    args:\n"
            f"      uri: sqlite:///{self.folder / 'catalog.db'}\n"
            f"      init_if_not_exists: true\n"
            f"      writable_storage:\n"
            f"        - {self.folder / 'data'}\n"
            f"        - sqlite:///{self.folder / 'tables.db'}\n"
            f"streaming_cache:\n  uri: memory\n"
        )
        return config

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def client(self) -> Any:
        """The plain Tiled client of the root."""
        from arroyo.io.tiled import require as tiled_client

        return tiled_client()(self.url, api_key=self.key)

    def _make_node(self) -> None:
        """The writer puts runs in an existing container: make each level of ``node``."""
        node = self.client()
        for part in self.node.split("/") if self.node else []:
            node = node[part] if part in node else node.create_container(key=part)

    def _node(self) -> Any:
        node = self.client()
        for part in self.node.split("/") if self.node else []:
            node = node[part]
        return node

    def stop(self) -> None:
        """End the server: SIGTERM, SIGKILL after ``STOP_SECONDS``."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _end(proc.pid, lambda: proc.poll() is not None, proc.wait)
        self.pidfile.unlink(missing_ok=True)

    # -- what it holds ----------------------------------------------------------------

    def runs(self) -> list[tuple[str, Any]]:
        """(key, container client) of each run under ``node``, oldest first."""
        return sorted(self._node().items(), key=lambda kv: kv[0])

    def holdings(self) -> list[str]:
        """One line per run container: events, arrays, completeness."""
        lines = []
        for key, run in self.runs():
            meta = run.metadata
            shapes = ", ".join(
                f"{k} {'x'.join(map(str, v.shape[1:]))}" for k, v in run.items() if k != "events"
            )
            where = f"{self.node}/{key}" if self.node else key
            if "stop" in meta:  # (the writer's events_written: rows that hold data)
                done = f"complete: {bool(meta.get('complete'))}"
                lines.append(f"  {where}: {meta.get('events_written')} events ({shapes}), {done}")
            else:
                lines.append(f"  {where}: ({shapes}), still open")
        return lines

    def prune(self, keep: int) -> None:
        """Delete all but the last ``keep`` closed run containers (between two rounds of
        runs, while nothing is written)."""
        runs = self.runs()
        closed = [key for key, run in runs if "stop" in run.metadata]
        old = closed[: max(0, len(closed) - keep)]
        if old:  # (external_only=False: the files of its arrays too)
            self._node().delete_contents(old, recursive=True, external_only=False)


def _end(pid: int, gone: Callable[[], bool], wait: Callable[[], Any]) -> None:
    """SIGTERM, then SIGKILL if ``gone`` is still false after ``STOP_SECONDS``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not gone():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        wait()


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def stop_stray(folder: Path) -> bool:
    """End a server that a killed demo left serving ``folder`` (its pid file names a
    live ``tiled serve`` of that folder's config); True if there was one."""
    pidfile = folder / "server.pid"
    try:
        proc = psutil.Process(int(pidfile.read_text().strip()))
        ours = str(folder / "config.yml") in proc.cmdline()
    except (OSError, ValueError, psutil.Error):
        ours = False
    if ours:
        _end(proc.pid, lambda: _gone(proc), proc.wait)
    pidfile.unlink(missing_ok=True)
    return ours


class TiledDemo:
    """What ``scripts/demo --tiled`` adds to the demo: the server of the topology's
    TiledWriter, started before the chain (with ``TILED_API_KEY`` set in the
    environment that supervisord and so every stage inherits), its old runs pruned
    between rounds, and at the end what it holds, printed before it stops."""

    def __init__(self, topology: Topology) -> None:
        require()
        writers = [s for s in topology.stages.values() if s.class_path.endswith(":TiledWriter")]
        if len(writers) != 1:
            msg = f"{topology.path}: the Tiled demo needs one TiledWriter stage"
            raise ConfigError(msg)
        options = writers[0].options
        node = str(options.get("node", ""))
        self.server = TiledServer(str(options["url"]), topology.run_dir / "tiled", node)
        self.key_before: str | None = None
        self.started = False

    def start(self) -> None:
        self.server.start()
        self.started = True
        self.key_before = os.environ.get("TILED_API_KEY")
        os.environ["TILED_API_KEY"] = self.server.key
        node = f"node {self.server.node}, " if self.server.node else ""
        print(f"tiled:     {self.server.url} ({node}API key in {self.server.folder}/api-key)")

    def prune(self, keep: int) -> None:
        try:
            self.server.prune(keep)
        except Exception as e:  # (a demo that cannot prune goes on)
            print(f"could not prune the runs in Tiled: {type(e).__name__}: {e}", file=sys.stderr)

    def stop(self) -> None:
        """Print what Tiled holds, stop the server, restore the environment."""
        try:
            if self.started:
                lines = self.server.holdings()
                print(f"Tiled holds {len(lines)} runs at {self.server.url}:")
                print("\n".join(lines))
        except Exception as e:  # (what it holds is a courtesy; the stop is not)
            print(f"could not read Tiled: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            self.server.stop()
            if self.started and self.key_before is None:
                os.environ.pop("TILED_API_KEY", None)
            elif self.started and self.key_before is not None:
                os.environ["TILED_API_KEY"] = self.key_before
            self.started = False
