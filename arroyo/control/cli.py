"""Command line: ``arroyo`` (drive a topology) and ``arroyo-stage`` (run one stage process).

Every user mistake ends in one line on stderr per problem and exit code 2, never a
traceback. Every option has an ``ARROYO_*`` environment fallback. The group and its
helpers live in ``clibase``; the supervisor-facing commands in ``commands``.
"""

from __future__ import annotations

import os
import sys

import click

from arroyo.control import commands, live, recordings, web
from arroyo.control.clibase import CONTEXT, TOPOLOGY, main, setup_logging, user_errors

__all__ = ["commands", "live", "main", "recordings", "stage_main", "web"]


@main.command()
@TOPOLOGY
@user_errors
def check(topology: str) -> None:
    """Validate TOPOLOGY and print its graph; exit 2 listing every problem."""
    from arroyo.topology import describe, load

    click.echo(describe(load(topology)))


@main.command()
@TOPOLOGY
@click.option("--force", is_flag=True, help="Replace existing keys (peers must get the new ones).")
@user_errors
def keys(topology: str, force: bool) -> None:
    """Make a CURVE key pair per host of TOPOLOGY (secret keys mode 0600)."""
    from arroyo.control.keys import make_keys
    from arroyo.topology import load

    for host, path, made in make_keys(load(topology), force):
        click.echo(f"{host:<16} {path} {'(new)' if made else '(kept)'}")


@main.command()
@TOPOLOGY
@click.option("--inline", is_flag=True, required=True, help="Run every stage in this process.")
@click.option("--log-level", default="INFO", show_envvar=True, help="Logging level.")
@user_errors
def run(topology: str, inline: bool, log_level: str) -> None:
    """Run the whole graph of TOPOLOGY in one process with in-memory links."""
    from arroyo.runtime.inline import run_inline
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
    from arroyo.runtime import threads

    threads.one_thread()  # before the stage's code can import an OpenMP library
    from arroyo.runtime.parent import follow_parent
    from arroyo.runtime.process import StageProcess
    from arroyo.topology import load

    setup_logging(f"{stage}[{worker}]", log_level)
    # Under supervisord (which sets SUPERVISOR_ENABLED), a stage ends with it.
    if os.environ.get("SUPERVISOR_ENABLED") and not follow_parent():
        click.echo("the supervisord that started this stage is gone: not starting", err=True)
        sys.exit(0)
    topo = load(topology)
    sys.exit(StageProcess(topo, stage, worker).run())


@main.command()
@click.option(
    "--endpoint",
    default="tcp://127.0.0.1:31001",
    show_envvar=True,
    help="Where to bind the PUSH socket (a DCU's Stream V2 port is 31001).",
)
@click.option(
    "--format",
    default="dectris-stream2",
    show_envvar=True,
    help="dectris-stream2, dectris-stream1 or htype.",
)
@click.option("--dtype", default="uint16", show_envvar=True, help="uint8, uint16 or uint32.")
@click.option("--shape", default="512,512", show_envvar=True, help="ROWS,COLUMNS of a frame.")
@click.option("--compression", default="bslz4", show_envvar=True, help="none, lz4 or bslz4.")
@click.option(
    "--channels",
    default="1",
    show_envvar=True,
    help="Channels (energy thresholds) per image; several: dectris-stream2 only.",
)
@click.option("--images", default="100", show_envvar=True, help="Images per series.")
@click.option("--series", default="1", show_envvar=True, help="Series to play, one after another.")
@click.option("--rate", default="max", show_envvar=True, help="Images per second, or max.")
@click.option(
    "--drop",
    default="",
    show_envvar=True,
    help="Image ids never sent, in every series (e.g. 3,7,10-12).",
)
@click.option(
    "--repeat-series-id",
    is_flag=True,
    show_envvar=True,
    help="Every series has the same series_id (each its own series_unique_id).",
)
@click.option("--no-end", is_flag=True, show_envvar=True, help="Send no end message.")
@click.option("--seed", default="0", show_envvar=True, help="Seed of the frames.")
@click.option(
    "--header-detail",
    default="basic",
    show_envvar=True,
    help="all (flatfield, pixel mask, count-rate table too), basic or none.",
)
@click.option("--user-data", default="", show_envvar=True, help="JSON for user_data.")
@click.option(
    "--no-pixel-mask",
    is_flag=True,
    show_envvar=True,
    help="pixel_mask_enabled false: gaps read 0, hot pixels their counts (not NODATA).",
)
@click.option("--series-id", default="1", show_envvar=True, help="The first series_id.")
@click.option(
    "--hwm",
    default="100",
    show_envvar=True,
    help="Messages queued for a slow peer before sending blocks.",
)
@click.option(
    "--linger",
    default="30",
    show_envvar=True,
    help="Seconds to wait at the end for the queue to reach the peer.",
)
@user_errors
def simulate(**options: str) -> None:
    """Play detector series like a DECTRIS DCU: bind a PUSH socket and send, in the
    detector's own format, once a peer connects; one line per series on stdout.
    SIGINT/SIGTERM stop it cleanly (exit 0)."""
    from arroyo.io.simulate import run_simulator

    sys.exit(run_simulator(options))
