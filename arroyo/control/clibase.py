"""What every ``arroyo`` command shares: the click group, the TOPOLOGY argument, and
the wrapper that turns a user's mistake into one line and exit code 2.

Every user mistake ends in one line on stderr per problem and exit code 2, never a
traceback. Every option has an ``ARROYO_*`` environment fallback.
"""

from __future__ import annotations

import logging
import sys
import xmlrpc.client
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from arroyo import __version__
from arroyo.errors import ConfigError, TopologyError

CONTEXT = {
    "auto_envvar_prefix": "ARROYO",
    "show_default": True,
    "help_option_names": ["-h", "--help"],
}
F = TypeVar("F", bound=Callable[..., Any])
TOPOLOGY = click.argument("topology", type=click.Path(dir_okay=False), envvar="ARROYO_TOPOLOGY")


def user_errors(func: F) -> F:
    """Turn configuration mistakes into one line per problem and exit code 2, and a
    supervisord that refuses a request or stops answering into one line and exit 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TopologyError as e:
            for problem in e.problems:
                click.echo(problem, err=True)
            sys.exit(2)
        except ConfigError as e:
            click.echo(str(e), err=True)
            sys.exit(2)
        except xmlrpc.client.Fault as e:
            click.echo(f"supervisord refused the request: {e.faultString}", err=True)
            sys.exit(1)
        except xmlrpc.client.ProtocolError as e:
            click.echo(f"supervisord did not answer: {e.errmsg}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def setup_logging(prefix: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s {prefix} %(levelname)s %(name)s: %(message)s",
    )


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="arroyo")
def main() -> None:
    """Arroyo: run stream-processing stage graphs for scientific facilities."""
