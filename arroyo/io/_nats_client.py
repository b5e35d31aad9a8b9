"""What the NATS ends (``arroyo.io.nats``) share: the lazy import of nats-py, one
connection attempt without nats-py's own reconnects, the stream a JetStream end may
create, and the start positions of a consumer."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from typing import Any, Literal

from arroyo.errors import ConfigError
from arroyo.io.broker import KeyTemplate
from arroyo.io.retry import describe_error, quiet

log = logging.getLogger("arroyo.nats")

EXTRA = "pip install 'arroyo[nats]'"
DEFAULT_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT = 2.0  # s: a server that does not answer counts as a failed attempt
DEFAULT_MAX_PAYLOAD = 1 << 20  # the server's default, until it tells its own
HEADROOM = 256  # bytes of a message's max_payload taken by our Nats-Msg-Id header
Mode = Literal["jetstream", "core"]


def require() -> Any:
    """The nats module (with ``nats.js``), or ``ConfigError`` naming the extra."""
    try:
        import nats
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError as e:
        msg = f"arroyo.io.nats needs nats-py, which is not installed: {EXTRA}"
        raise ConfigError(msg) from e
    quiet("nats")  # (its logs of each failed connection: our backoff says it in one line)
    return nats


def start_position(deliver: str) -> dict[str, Any]:
    """ConsumerConfig fields for ``deliver``: ``new``, ``all``, ``last``, ``seq:N`` or
    ``time:ISO8601`` (UTC when the time has no offset)."""
    kind, _, arg = deliver.partition(":")
    if not arg and kind in ("new", "all", "last"):
        return {"deliver_policy": kind}
    try:
        if kind == "seq" and int(arg) >= 1:
            return {"deliver_policy": "by_start_sequence", "opt_start_seq": int(arg)}
        if kind == "time":
            when = dt.datetime.fromisoformat(arg)
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return {"deliver_policy": "by_start_time", "opt_start_time": when}
    except ValueError:
        pass
    msg = (
        "deliver must be new, all, last, seq:N (N >= 1) or time:ISO8601 "
        f"(time:2026-12-04T18:00:00Z), not {deliver!r}"
    )
    raise ValueError(msg)


def stream_subjects(template: KeyTemplate) -> str:
    """The subjects a stream must take for a publisher's templated subject: each
    ``{field}`` token becomes ``*``; a field inside a token makes the rest ``>``."""
    tokens = []
    for token in template.template.split("."):
        if "{" not in token:
            tokens.append(token)
        elif token.startswith("{") and token.endswith("}") and token.count("{") == 1:
            tokens.append("*")
        else:
            tokens.append(">")
            break
    return ".".join(tokens)


async def connect(nats: Any, url: str, name: str, lost: asyncio.Event | None = None) -> Any:
    """One connection attempt, without nats-py's own reconnects (ours have backoff and
    logging: a lost connection closes the client, and the end connects anew). ``lost``
    is set when the connection goes."""

    async def quiet(error: Exception) -> None:
        log.debug("%s: %s", name, describe_error(error))

    async def gone() -> None:
        if lost is not None:
            lost.set()

    return await nats.connect(
        url,
        name=f"{name} pid {os.getpid()}",
        allow_reconnect=False,
        max_reconnect_attempts=1,  # one attempt (0 would try for ever), at once:
        reconnect_time_wait=0,
        connect_timeout=CONNECT_TIMEOUT,
        error_cb=quiet,
        disconnected_cb=gone,
        closed_cb=gone,
    )


async def ensure_stream(nats: Any, js: Any, stream: str, subjects: str) -> None:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(name=stream, subjects=[subjects])
        except nats.js.errors.BadRequestError:
            await js.stream_info(stream)  # made by another end meanwhile: fine
            return
        log.info("created JetStream stream %s for subjects %s", stream, subjects)


async def close_quietly(nc: Any) -> None:
    if nc is None or nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.close(), CONNECT_TIMEOUT)
    except Exception:  # a broken connection may fail to close; it is gone anyway
        log.debug("closing a NATS connection failed", exc_info=True)


def retryable(nats: Any) -> tuple[type[Exception], ...]:
    """Failures after which the same call may work later (server away, restarting)."""
    return (nats.errors.Error, OSError, TimeoutError)
