"""What the RabbitMQ listener and publisher (``arroyo.io.rabbitmq``) share: pika,
imported when a stage is made, connection parameters, and how to read the broker's
refusals."""

from __future__ import annotations

import logging
import os
from typing import Any

from arroyo.errors import ConfigError
from arroyo.io.broker import safe_url
from arroyo.io.retry import describe_error, quiet

log = logging.getLogger("arroyo.rabbitmq")

EXTRA = "pip install 'arroyo[rabbitmq]'"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
CONNECT_TIMEOUT = 5.0  # s: a socket that does not answer counts as a failed attempt
MAX_KEY = 255  # bytes: AMQP's limit for a routing key (a "short string")
# Broker refusals that no retry mends: the stage's settings are wrong.
ACCESS_REFUSED, NOT_FOUND, PRECONDITION_FAILED = 403, 404, 406


def require() -> Any:
    """The pika module, or ``ConfigError`` naming the extra."""
    try:
        import pika
    except ImportError as e:
        msg = f"arroyo.io.rabbitmq needs pika, which is not installed: {EXTRA}"
        raise ConfigError(msg) from e
    quiet("pika")  # (its logs of each failed connection: our backoff says it in one line)
    return pika


def parameters(pika: Any, url: str, heartbeat: int, name: str) -> Any:
    """Connection parameters from ``url``: one attempt, no hidden retries (ours have
    backoff and logging), a heartbeat, and ``name`` shown by ``rabbitmqctl``."""
    try:
        params = pika.URLParameters(url)
    except Exception as e:  # pika raises several kinds for a URL it cannot read
        msg = f"cannot read url {safe_url(url)}: {describe_error(e)}"
        raise ValueError(msg) from e
    params.heartbeat = heartbeat
    params.connection_attempts = 1
    params.socket_timeout = CONNECT_TIMEOUT
    params.stack_timeout = 2 * CONNECT_TIMEOUT
    params.client_properties = {"connection_name": f"{name} pid {os.getpid()}"}
    return params


def refusal(error: Exception) -> int:
    """The AMQP reply code of a channel the broker closed (0 for anything else)."""
    return int(getattr(error, "reply_code", 0) or 0)


def refused_for_good(pika: Any, error: Exception) -> bool:
    """A refusal at connect or declare time that no retry mends: bad credentials, no
    permission (403), a declaration unlike the existing one (406)."""
    errors = pika.exceptions
    bad_login = (errors.AuthenticationError, errors.ProbableAuthenticationError)
    return isinstance(error, bad_login) or refusal(error) in (ACCESS_REFUSED, PRECONDITION_FAILED)


def check_names(exchange: str, exchange_type: str, queue: str = "") -> None:
    for what, name in (("queue", queue), ("exchange", exchange)):
        if len(name.encode()) > MAX_KEY:
            msg = f"{what} is longer than {MAX_KEY} bytes"
            raise ValueError(msg)
    if exchange_type and not exchange:
        msg = f"exchange_type = {exchange_type} declares an exchange: name it (exchange = ...)"
        raise ValueError(msg)


def close_quietly(connection: Any) -> None:
    if connection is None:
        return
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # a broken connection may fail to close; it is gone anyway
        log.debug("closing the connection failed", exc_info=True)
