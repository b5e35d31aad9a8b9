"""Command line: ``arroyo`` (drive a topology) and ``arroyo-stage`` (run one stage process).

Every user mistake ends in one line on stderr per problem and exit code 2, never a
traceback. Every option has an ``ARROYO_*`` environment fallback.
"""

from __future__ import annotations

import click

from arroyo import __version__

CONTEXT = {"auto_envvar_prefix": "ARROYO", "show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="arroyo")
def main() -> None:
    """Arroyo: run stream-processing stage graphs for scientific facilities."""


@click.command(context_settings=CONTEXT)
@click.argument("topology", type=click.Path(dir_okay=False))
@click.argument("stage")
@click.option("--worker", type=int, default=0, show_envvar=True, help="Worker index of this process.")
def stage_main(topology: str, stage: str, worker: int) -> None:
    """Run one worker process of STAGE from TOPOLOGY in the foreground."""
    raise SystemExit(0)
