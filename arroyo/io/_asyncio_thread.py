"""An asyncio event loop in a thread of its own, for a connector whose client library
is asyncio-only (nats-py).

Arroyo's hot loop stays synchronous (DESIGN §7): the stage's main thread never runs
the event loop. It hands the loop coroutines (``submit``, ``run``) or plain callbacks
(``call``), and the loop hands messages back through a ``queue.Queue``. So a slow
``deliver`` never stalls the client's socket reads, pings or acknowledgements, and a
busy loop never holds the main thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("arroyo.io")

T = TypeVar("T")


class LoopThread:
    """One event loop, run by one daemon thread from ``start()`` to ``stop()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.loop is not None:
            return
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.loop is not None
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; its result comes in the future."""
        self.start()
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for its result (``TimeoutError`` after
        ``timeout`` seconds, the coroutine cancelled)."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Call ``function(*args)`` on the loop soon; never waits."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(function, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self.run(_cancel_all(), timeout)
        except Exception:  # a loop that cannot even cancel its tasks is stopped anyway
            log.debug("%s: cancelling the loop's tasks failed", self.name, exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self.loop = self._thread = None


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
