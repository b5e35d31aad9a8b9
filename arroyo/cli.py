"""Command line: ``arroyo`` (drive a topology) and ``arroyo-stage`` (run one stage process).

Every user mistake ends in one line on stderr per problem and exit code 2, never a
traceback. Every option has an ``ARROYO_*`` environment fallback.
"""

from __future__ import annotations

import logging
import sys
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
    """Turn configuration mistakes into one line per problem and exit code 2."""

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


@main.command()
@TOPOLOGY
@user_errors
def check(topology: str) -> None:
    """Validate TOPOLOGY and print its graph; exit 2 listing every problem."""
    from arroyo.topology import describe, load

    click.echo(describe(load(topology)))


@main.command()
@TOPOLOGY
@click.option("--inline", is_flag=True, required=True, help="Run every stage in this process.")
@click.option("--log-level", default="INFO", show_envvar=True, help="Logging level.")
@user_errors
def run(topology: str, inline: bool, log_level: str) -> None:
    """Run the whole graph of TOPOLOGY in one process with in-memory links."""
    from arroyo.inline import run_inline
    from arroyo.topology import load

    setup_logging("inline", log_level)
    run_inline(load(topology))


@click.command(context_settings=CONTEXT)
@TOPOLOGY
@click.argument("stage")
@click.option(
    "--worker", type=int, default=0, show_envvar=True, help="Worker index of this process."
)
@click.option("--log-level", default="INFO", show_envvar=True, help="Logging level.")
@user_errors
def stage_main(topology: str, stage: str, worker: int, log_level: str) -> None:
    """Run one worker process of STAGE from TOPOLOGY in the foreground."""
    from arroyo.runtime import StageProcess
    from arroyo.topology import load

    setup_logging(f"{stage}[{worker}]", log_level)
    topo = load(topology)
    sys.exit(StageProcess(topo, stage, worker).run())


from arroyo import cli_supervise  # noqa: E402,F401  (registers up/down/status/... on main)
