"""``arroyo runs PATH`` (what a recorder's folder holds) and ``arroyo replay PATH --to
ENDPOINT`` (play it to a ZMQ endpoint): docs/storage.md."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from arroyo.control.clibase import main, setup_logging, user_errors
from arroyo.errors import ConfigError

PATH = click.argument("path", type=click.Path(), envvar="ARROYO_RECORDINGS")


def _folder(path: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        msg = f"{path}: no such folder or recording"
        raise ConfigError(msg)
    return folder


def _why(row: dict[str, Any]) -> str:
    """Why a run is not complete ("" when it is)."""
    if row["complete"]:
        return ""
    if not row["stop"]:
        tail = f", {row['damaged']} tail" if row["damaged"] else ""
        return f"no Stop (the recorder stopped mid-run{tail})"
    return "marked incomplete upstream"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The lines ``arroyo runs`` prints for ``recfile.summaries`` rows."""
    lines = [f"{'RUN':>6} {'EVENTS':>8} {'BYTES':>14} COMPLETE {'START':<19} {'SECONDS':>9}  FILE"]
    for r in rows:
        if "error" in r:
            lines.append(f"{'?':>6} {'':>8} {'':>14} {'?':<8} {'':<19} {'':>9}  {r['file']}  "
                         f"unreadable: {r['error']}")  # fmt: skip
            continue
        done = "yes" if r["complete"] else "no"
        lines.append(
            f"{r['run']:>6} {r['events']:>8} {r['bytes']:>14,} {done:<8} "
            f"{_when(r['start_ns']):<19} {r['duration_s']:>9.2f}  {r['file']}  {_why(r)}".rstrip()
        )
    return lines


@main.command()
@PATH
@click.option(
    "--json", "as_json", is_flag=True, show_envvar=True, help="One JSON list, for machines."
)
@user_errors
def runs(path: str, as_json: bool) -> None:
    """List the runs a recorder's folder PATH (or one .arec file) holds: run, events,
    bytes, start time, duration and whether the run is complete."""
    from arroyo.io.recfile import summaries

    rows = summaries(_folder(path))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for line in table(rows):
        click.echo(line)


REPLAY_TOPOLOGY = """
[topology]
name = replay
run_dir = {run_dir}

[stage:replay]
role = listener
class = arroyo.io.recording:Replay
path = {path}
runs = {runs}
pace = {pace}
loop = {loop}
run_ids = {run_ids}

[stage:out]
role = publisher
class = arroyo.io.zmq:ZMQPublisher
input = replay
endpoint = {to}
bind = {bind}
"""


@main.command()
@PATH
@click.option(
    "--to", "to", required=True, show_envvar=True, help="ZMQ endpoint to send the runs to."
)
@click.option(
    "--connect", is_flag=True, show_envvar=True, help="Connect to --to instead of binding it."
)
@click.option(
    "--runs",
    "runs_",
    default="all",
    envvar="ARROYO_REPLAY_RUNS",
    show_envvar=True,
    help="Run ids and ranges (1-3,7) or all.",
)
@click.option("--pace", default="max", show_envvar=True, help="max, recorded, or a factor like 2x.")
@click.option(
    "--loop", is_flag=True, show_envvar=True, help="Play the selection again until Ctrl-C."
)
@click.option("--run-ids", type=click.Choice(["new", "recorded"]), default="new",
              show_envvar=True, help="Number the runs anew, or keep the recorded ids.")  # fmt: skip
@click.option("--log-level", default="INFO", show_envvar=True, help="Logging level.")
@user_errors
def replay(
    path: str, to: str, connect: bool, runs_: str, pace: str, loop: bool, run_ids: str,
    log_level: str,
) -> None:  # fmt: skip
    """Play the recorded runs of PATH to a ZMQ PUSH socket at --to (Arroyo wire
    format), in this process; Ctrl-C stops."""
    from arroyo.runtime.inline import run_inline
    from arroyo.topology import load

    folder = _folder(path).resolve()
    setup_logging("replay", log_level)
    with tempfile.TemporaryDirectory(prefix="arroyo-replay-") as tmp:
        ini = Path(tmp) / "replay.ini"
        ini.write_text(REPLAY_TOPOLOGY.format(
            run_dir=tmp, path=folder, runs=runs_, pace=pace, loop=loop, run_ids=run_ids,
            to=to, bind=not connect))  # fmt: skip
        run_inline(load(ini))
