"""``arroyo set``: change live options of a running stage (see ``arroyo.runtime.live``).

The same ``set_values`` serves the command line and the dashboard: it checks every
value with the INI converters, stores them in run_dir for the stage's workers, and
waits until each running worker reports where the change took effect.
"""

from __future__ import annotations

import fcntl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click

from arroyo.control.clibase import TOPOLOGY, main, user_errors
from arroyo.errors import TopologyError
from arroyo.runtime.live import live_path, read_live, set_live, write_live
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


@dataclass
class Outcome:
    """What the running workers of a stage did with one version of its live values."""

    version: int
    applied: list[str] = field(default_factory=list)  # one line per worker
    refused: dict[str, str] = field(default_factory=dict)  # worker -> the stage's reason
    late: list[str] = field(default_factory=list)  # workers that said nothing in time
    idle: str = ""  # set when no worker runs: they take the values when they start

    @property
    def refused_by_all(self) -> bool:
        return bool(self.refused) and not self.applied and not self.late


def wait_live(topology: Topology, stage: str, version: int, timeout: float) -> Outcome:
    """Wait until every running worker of ``stage`` reports live ``version`` (applied
    or refused), or ``timeout``; those that did not are ``late``."""
    from arroyo.control.supervise import status_rows

    deadline = time.monotonic() + timeout
    while True:
        running = [
            r for r in status_rows(topology) if r["stage"] == stage and r["state"] == "RUNNING"
        ]
        outcome = Outcome(version)
        if not running:
            outcome.idle = f"{stage}: not running; its workers take the values when they start"
            return outcome
        for r in running:
            live, who = r.get("live") or {}, f"{stage}[{r['worker']}]"
            if live.get("version", 0) < version:
                outcome.late.append(who)
            elif live.get("error"):
                # "version N refused: Error: text" (arroyo.runtime.live): the reason
                outcome.refused[who] = live["error"].partition(" refused: ")[2] or live["error"]
            else:
                outcome.applied.append(applied_line(who, live))
        if not outcome.late or time.monotonic() > deadline:
            return outcome
        time.sleep(0.2)


def set_values(
    topology: Topology, stage: str, values: dict[str, str], wait: float = 10.0
) -> Outcome:
    """Check and store ``values`` for ``stage``, then wait up to ``wait`` seconds for its
    workers. Values that every running worker refused are taken back from the store,
    so a worker that starts later does not build its object with them."""
    before = read_live(topology.run_dir, stage)[1]
    version = set_live(topology, stage, values)
    if wait <= 0:
        return Outcome(version)
    outcome = wait_live(topology, stage, version, wait)
    if outcome.refused_by_all:
        _take_back(topology, stage, version, before, {k.strip() for k in values})
    return outcome


def _take_back(
    topology: Topology, stage: str, version: int, before: dict[str, str], keys: set[str]
) -> None:
    """Store ``keys`` as they were ``before`` ``version``, under that same version: the
    running workers have seen it and ignore the rewrite. Left alone if another set
    came since (that one stands)."""
    path = live_path(topology.run_dir, stage)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored_version, stored = read_live(topology.run_dir, stage)
        if stored_version != version:
            return
        kept = {k: v for k, v in stored.items() if k not in keys}
        kept.update({k: before[k] for k in keys if k in before})
        write_live(topology.run_dir, stage, version, kept)


def refusal_line(topology: Topology, stage: str, values: dict[str, str], outcome: Outcome) -> str:
    """One line for values every worker refused: file, section, keys and values, why."""
    text = ", ".join(f"{k.strip()} = {v.strip()}" for k, v in values.items())
    who = ", ".join(outcome.refused)
    reasons = "; ".join(dict.fromkeys(outcome.refused.values()))
    return f"{topology.path}: [stage:{stage}] {text}: refused by every worker ({who}): {reasons}"


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
    refused (exit 2) and nothing changes; so is a change every running worker refuses
    (the stage's own check). Each worker applies the change between two messages and
    logs the run and sequence number; the change is kept in run_dir, so a restarted
    worker has it, until `arroyo down`. Exit 1 if some running workers refused it or
    did not apply it within --wait seconds."""
    topo = load(topology)
    values = parse_assignments(assignments)
    outcome = set_values(topo, stage, values, wait)
    if outcome.refused_by_all:
        click.echo(refusal_line(topo, stage, values, outcome), err=True)
        sys.exit(2)
    text = ", ".join(f"{k}={v.strip()}" for k, v in values.items())
    click.echo(f"{stage}: {text} (version {outcome.version})")
    for line in [*outcome.applied, outcome.idle]:
        if line:
            click.echo(line)
    for who, reason in outcome.refused.items():
        click.echo(f"{who}: refused: {reason}", err=True)
    if outcome.late:
        click.echo(f"{stage}: not applied within {wait:g}s by {', '.join(outcome.late)}", err=True)
    if outcome.refused or outcome.late:
        sys.exit(1)
