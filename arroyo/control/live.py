"""``arroyo set``: change live options of a running stage (see ``arroyo.runtime.live``).

The same ``set_values`` serves the command line and the dashboard: it checks every
value with the INI converters, stores them in run_dir for the stage's workers, and
waits until each running worker reports where the change took effect.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from arroyo.control.clibase import TOPOLOGY, main, user_errors
from arroyo.errors import TopologyError
from arroyo.runtime.live import set_live
from arroyo.topology import Topology, load


def parse_assignments(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``KEY=VALUE`` words to a dict; TopologyError naming every word that is not one."""
    values: dict[str, str] = {}
    bad = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            bad.append(f"{item!r}: expected KEY=VALUE")
        values[key.strip()] = value
    if bad:
        raise TopologyError(bad)
    return values


def applied_line(who: str, live: dict[str, Any]) -> str:
    where = live.get("where") or {}
    if live.get("error"):
        return f"{who}: {live['error']}"
    if where.get("seq") is not None:
        return f"{who}: applied from run {where['run']} seq {where['seq']}"
    return f"{who}: applied while idle"


def wait_live(
    topology: Topology, stage: str, version: int, timeout: float
) -> tuple[list[str], list[str]]:
    """Wait until every running worker of ``stage`` reports live ``version``; returns a
    line per worker that did, and the names of those that did not in time."""
    from arroyo.control.supervise import status_rows

    deadline = time.monotonic() + timeout
    while True:
        running = [
            r for r in status_rows(topology) if r["stage"] == stage and r["state"] == "RUNNING"
        ]
        if not running:
            return [f"{stage}: not running; its workers take the values when they start"], []
        done, late = [], []
        for r in running:
            live, who = r.get("live") or {}, f"{stage}[{r['worker']}]"
            if live.get("version", 0) >= version:
                done.append(applied_line(who, live))
            else:
                late.append(who)
        if not late or time.monotonic() > deadline:
            return done, late
        time.sleep(0.2)


def set_values(
    topology: Topology, stage: str, values: dict[str, str], wait: float = 10.0
) -> tuple[int, list[str], list[str]]:
    """Check and store ``values`` for ``stage``, then wait up to ``wait`` seconds for its
    workers: (version, one line per worker that applied it, workers that did not)."""
    version = set_live(topology, stage, values)
    if wait <= 0:
        return version, [], []
    done, late = wait_live(topology, stage, version, wait)
    return version, done, late


@main.command(name="set")
@TOPOLOGY
@click.argument("stage")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option(
    "--wait",
    type=float,
    default=10.0,
    show_envvar=True,
    help="Seconds to wait for every running worker to apply it (0: do not wait).",
)
@user_errors
def set_command(topology: str, stage: str, assignments: tuple[str, ...], wait: float) -> None:
    """Change live options of STAGE on every worker while it runs.

    Values are converted like the INI's; a key that is not live or a bad value is
    refused (exit 2) and nothing changes. Each worker applies the change between two
    messages and logs the run and sequence number; the change is kept in run_dir, so
    a restarted worker has it, until `arroyo down`. Exit 1 if a running worker did not
    apply it within --wait seconds."""
    topo = load(topology)
    values = parse_assignments(assignments)
    version, done, late = set_values(topo, stage, values, wait)
    text = ", ".join(f"{k}={v.strip()}" for k, v in values.items())
    click.echo(f"{stage}: {text} (version {version})")
    for line in done:
        click.echo(line)
    if late:
        click.echo(f"{stage}: not applied within {wait:g}s by {', '.join(late)}", err=True)
        sys.exit(1)
