"""A real Tiled server for tests: the demo's ``arroyo.control.tiled_server`` on a
random port.

``TiledServer(tmp_path).start()`` serves a catalog kept under ``tmp_path``, so a
stopped server started again serves the same data, with a streaming cache in memory
(websocket subscriptions; it does not survive a restart, as Tiled's memory cache does
not). TMPDIR points under ``tmp_path`` too (Tiled never deletes its temporary data).
``stop()`` terminates it and kills it after a bounded wait. A server that cannot start
is a failure under CI and a skip with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from arroyo.control import tiled_server
from arroyo.errors import ArroyoError
from tests.conftest import in_ci

# Clients in the test process give up at once on a dead server (tiled reads this at
# import: the test modules import this module before tiled).
os.environ.setdefault("TILED_RETRY_ATTEMPTS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TiledServer(tiled_server.TiledServer):
    """One ``tiled serve config`` process over a catalog kept in ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"http://127.0.0.1:{free_port()}", folder)

    def start(self, fresh: bool = False) -> None:
        try:
            super().start(fresh=fresh)
        except ArroyoError as e:
            if in_ci():
                pytest.fail(str(e), pytrace=False)
            pytest.skip(str(e))


@contextlib.contextmanager
def running(folder: Path) -> Iterator[TiledServer]:
    """A started ``TiledServer`` in ``folder``, always stopped when the block ends
    (tests make a fixture of it: ``with running(tmp_path / "tiled") as server``)."""
    server = TiledServer(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
