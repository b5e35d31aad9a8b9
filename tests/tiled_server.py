"""A real Tiled server for tests: ``tiled serve config`` on a random port.

``TiledServer(tmp_path).start()`` serves a catalog file under ``tmp_path`` (made by
``tiled catalog init``), so a stopped server started again serves the same data,
with a streaming cache in memory (websocket subscriptions; it does not survive a
restart, as Tiled's memory cache does not);
TMPDIR points under ``tmp_path`` too (Tiled never deletes its temporary data).
``stop()`` terminates it and kills it after a bounded wait. A server that cannot
start is a failure under CI and a skip with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import arroyo_bin, in_ci

# Clients in the test process give up at once on a dead server (tiled reads this at
# import: the test modules import this module before tiled).
os.environ.setdefault("TILED_RETRY_ATTEMPTS", "1")
READY_SECONDS = 40.0  # 3-4 s here, 7.6 s the first time; generous on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TiledServer:
    """One ``tiled serve catalog`` process over a catalog kept in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = secrets.token_hex(16)  # alphanumeric: `_` or `-` stop the server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = folder / "tiled-server.log"
        self.env = {**os.environ, "TMPDIR": str(folder / "tmp"), "TILED_RETRY_ATTEMPTS": "1"}
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self.catalog = folder / "catalog.db"
        if not self.catalog.exists():
            subprocess.run(
                [arroyo_bin("tiled"), "catalog", "init", f"sqlite:///{self.catalog}"],
                env=self.env,
                check=True,
                capture_output=True,
                timeout=60,
            )

    def _config(self) -> Path:
        """The server's configuration: ``tiled serve catalog --cache`` fails in Tiled
        0.2.20 (an import only its ``--temp`` branch makes), and the listener needs
        the streaming cache, so the server is run as ``tiled serve config``."""
        config = self.folder / "config.yml"
        config.write_text(
            "authentication:\n"
            f"  single_user_api_key: {self.key}\n"
            "trees:\n"
            "  - path: /\n"
            "    tree: catalog\n"
            "    args:\n"
            f"      uri: sqlite:///{self.catalog}\n"
            "      writable_storage:\n"
            f"        - {self.folder / 'data'}\n"
            f"        - sqlite:///{self.folder / 'tables.db'}\n"
            "streaming_cache:\n"
            "  uri: memory\n"
        )
        return config

    def start(self) -> TiledServer:
        cmd = [arroyo_bin("tiled"), "serve", "config", str(self._config())]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=out)
        deadline = time.monotonic() + READY_SECONDS
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                why = f"the Tiled server did not start:\n{tail}"
                if in_ci():
                    pytest.fail(why, pytrace=False)
                pytest.skip(why)
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def client(self) -> object:
        from tiled.client import from_uri

        return from_uri(self.url, api_key=self.key)


@contextlib.contextmanager
def running(folder: Path) -> Iterator[TiledServer]:
    """A started ``TiledServer`` in ``folder``, always stopped when the block ends
    (tests make a fixture of it: ``with running(tmp_path / "tiled") as server``)."""
    server = TiledServer(folder)
    try:
        yield server.start()
    finally:
        server.stop()
