"""The supervisor-facing commands of ``arroyo``: render, up, down, status, top, scale, logs."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from arroyo.control.clibase import TOPOLOGY, main, user_errors
from arroyo.errors import ConfigError
from arroyo.runtime.stats import link_totals, run_line
from arroyo.topology import Topology, load


def _load(path: str) -> Topology:
    return load(path)


def _load_running(path: str) -> Topology:
    """The topology at ``path``; once that no longer loads, the copy ``arroyo up`` kept
    of it (``arroyo.control.rendered``), which is said in one line on stderr."""
    from arroyo.control.rendered import load_running

    topology, note = load_running(path)
    if note:
        click.echo(note, err=True)
    return topology


def _live_and_extra(rows: list[dict[str, Any]]) -> list[str]:
    """Lines for the live values (``arroyo set``) and a stage's own figures."""
    out: list[str] = []
    for r in rows:
        who = f"{r['stage']}[{r['worker']}]"
        live = r.get("live") or {}
        if live.get("version"):
            values = ", ".join(f"{k}={v}" for k, v in live["values"].items())
            where = live.get("where") or {}
            at = ""
            if where.get("seq") is not None:
                at = f", from run {where['run']} seq {where['seq']}"
            error = f"; {live['error']}" if live.get("error") else ""
            out.append(f"{who}: live {values} (version {live['version']}{at}{error})")
        extra = {k: v for k, v in (r.get("extra") or {}).items() if not isinstance(v, dict | list)}
        if extra:
            out.append(f"{who}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    return ["", *out] if out else []


@main.command()
@TOPOLOGY
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead.")
@user_errors
def render(topology: str, output: str | None) -> None:
    """Write the supervisord.conf for TOPOLOGY (default RUN_DIR/supervisord.conf); with
    [hosts], one per host and the Supvisors rules file (RUN_DIR/hosts/HOST/)."""
    from arroyo.control.render import write_config

    topo = _load(topology)
    if topo.multihost:
        from arroyo.control.hostconf import write_host_configs

        for path in write_host_configs(topo):
            click.echo(str(path))
        return
    path = write_config(topo, Path(output) if output else None)
    click.echo(str(path))


@main.command()
@TOPOLOGY
@click.argument("host", default="", envvar="ARROYO_HOST")
@user_errors
def host(topology: str, host: str) -> None:
    """Start HOST's supervisord with Supvisors (run once on every host of TOPOLOGY);
    HOST defaults to the [hosts] entry whose address is on this machine."""
    from arroyo.control.cluster import start_host
    from arroyo.runtime.net import machine_host

    topo = _load(topology)
    if not topo.multihost:
        msg = f"{topo.path}: no [hosts] section: `arroyo up` runs a one-host topology"
        raise ConfigError(msg)
    conf = start_host(topo, host)
    _warn_ephemeral(topo, host or machine_host(topo))
    click.echo(str(conf))


def _warn_ephemeral(topo: Topology, host: str) -> None:
    """A port this host listens on that the kernel may give an outgoing connection."""
    from arroyo.hosts import bound_ports, ephemeral_clashes

    ports = bound_ports(topo.hosts, topo.supervisor_port, topo.links, host)
    clashes, span = ephemeral_clashes(ports)
    if clashes:
        listed = ", ".join(map(str, clashes))
        click.echo(
            f"{topo.path}: warning: host {host} listens on port(s) {listed}, inside this"
            f" machine's ephemeral range {span}: an outgoing connection may hold one when"
            " a stage binds it; choose port_range and supervisor_port below it",
            err=True,
        )


def _reset_scale(topo: Topology, chains: tuple[str, ...]) -> None:
    """Return the CHAINS' stages to their INI worker counts (``up --reset-scale``)."""
    from arroyo.control.scaled import reset_scale

    for line in reset_scale(topo, chains):
        click.echo(line)


def _scale_notes(topo: Topology) -> None:
    """Name every stage that runs at a count kept from an earlier ``arroyo scale``."""
    from arroyo.control.scaled import scale_notes

    for line in scale_notes(topo):
        click.echo(line)


@main.command()
@TOPOLOGY
@click.argument("chains", nargs=-1)
@click.option(
    "--reset-scale",
    is_flag=True,
    show_envvar=True,
    help="Return every stage of CHAINS to its INI worker count (forget `arroyo scale`).",
)
@user_errors
def up(topology: str, chains: tuple[str, ...], reset_scale: bool) -> None:
    """Start supervisord if needed and the CHAINS (default all); wait until RUNNING.
    A worker count kept from an earlier `arroyo scale` is used, and said."""
    from arroyo.control.render import paths
    from arroyo.control.supervise import up as do_up

    topo = _load(topology)
    if reset_scale:
        _reset_scale(topo, chains)
    if topo.multihost:
        from arroyo.control import cluster

        cluster.up(topo, chains, say=lambda line: click.echo(line, err=True))
        click.echo(f"{topo.name}: running on {', '.join(topo.hosts)} (arroyo status)")
        _scale_notes(topo)
        return
    problems = do_up(topo, chains, say=lambda line: click.echo(line, err=True))
    _scale_notes(topo)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        sys.exit(1)
    click.echo(f"{topo.name}: running (supervisorctl -c {paths(topo).conf} status)")


@main.command()
@TOPOLOGY
@click.argument("chains", nargs=-1)
@click.option(
    "--hosts",
    is_flag=True,
    show_envvar=True,
    help="With [hosts]: end every host's supervisord as well (every chain stops).",
)
@user_errors
def down(topology: str, chains: tuple[str, ...], hosts: bool) -> None:
    """Stop CHAINS (default all) sources first; supervisord exits when nothing runs
    (with [hosts], --hosts ends every host's supervisord)."""
    from arroyo.control.strays import describe
    from arroyo.control.supervise import down as do_down

    topo = _load_running(topology)
    if topo.multihost:
        _down_cluster(topo, chains, end_hosts=hosts)
    else:
        strays = do_down(topo, chains)
        if strays:
            n = len(strays)
            click.echo(
                f"stopped {n} process{'es' * (n > 1)} outside supervisord: {describe(strays)}"
            )
    click.echo("stopped")


def _down_cluster(topo: Topology, chains: tuple[str, ...], end_hosts: bool) -> None:
    """Multi-host ``down``: exit 1 with one line naming what still runs (or which host
    did not answer) when the cluster would not stop within the wait."""
    from arroyo.control import clusterdown

    if end_hosts and chains:
        given = " ".join(chains)
        msg = (
            f"--hosts ends every host's supervisord, so every chain stops: give no CHAINS ({given})"
        )
        raise ConfigError(msg)

    def say(line: str) -> None:
        click.echo(line, err=True)

    survey = clusterdown.down(topo, chains, say=say)
    problems = [] if survey.clean else [survey.describe()]
    if end_hosts:
        problems = clusterdown.shutdown_hosts(topo, say=say)
    if problems:
        click.echo("; ".join(problems), err=True)
        sys.exit(1)
    if len(survey.absent) == len(topo.hosts):
        click.echo(f"no supervisord runs on any host ({', '.join(topo.hosts)})")


def _fmt_bytes(n: Any) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.0f}M"


def _fmt_uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s else "-"


def _rates(
    row: dict[str, Any], rates: Mapping[tuple[str, int], tuple[float, float]]
) -> tuple[str, str]:
    """IN/s and OUT/s as shown: ``stale`` when the figures stopped coming."""
    if row.get("stale"):
        return "stale", "stale"
    rin, rout = rates.get((row["stage"], row["worker"]), (row["rate_in"], row["rate_out"]))
    return f"{rin or 0:.0f}", f"{rout or 0:.0f}"


def status_table(
    rows: list[dict[str, Any]], rates: Mapping[tuple[str, int], tuple[float, float]] | None = None
) -> str:
    """The status table; IN/s and OUT/s are each process's own rates (the averages in
    its stats file) unless ``rates`` gives others by (stage, worker)."""
    rates = rates or {}
    head = (
        f"{'CHAIN':<10} {'STAGE':<16} {'W':>2} {'STATE':<9} {'PID':>7} {'UPTIME':>8} "
        f"{'CPU%':>5} {'RSS':>6} {'IN/s':>8} {'OUT/s':>8} {'IN':>9} {'OUT':>9} "
        f"{'ERR':>5} {'DROP':>5} RUN"
    )
    lines = [head]
    for r in rows:
        rin, rout = _rates(r, rates)
        flag = " !" if (r["errors"] or r["dropped"]) else ""
        if r.get("stale"):
            age = r.get("stats_age")
            flag += f" (stats {age:.0f}s old)" if age is not None else " (no stats yet)"
        cpu = f"{r['cpu_percent']:.0f}" if r["cpu_percent"] is not None else "-"
        lines.append(
            f"{r['chain']:<10} {r['stage']:<16} {r['worker']:>2} {r['state']:<9} "
            f"{r['pid'] or '-':>7} {_fmt_uptime(r['uptime']):>8} {cpu:>5} "
            f"{_fmt_bytes(r['rss_bytes']):>6} {rin:>8} {rout:>8} {r['received']:>9} "
            f"{r['sent']:>9} {r['errors']:>5} {r['dropped']:>5} {r['current_run'] or '-'}{flag}"
        )
    unmanaged = [r for r in rows if r["state"] == "UNMANAGED"]
    if unmanaged:
        lines.append(
            f"{len(unmanaged)} UNMANAGED: stage processes of this topology that no "
            "supervisord knows (left by a killed supervisord, or started by hand); "
            "`arroyo down` stops them"
        )
    lines += _stalled(rows)
    totals = link_totals(rows)
    if totals:
        lines.append("")
        lines.append(f"{'LINK':<32} {'SENT':>10} {'RECEIVED':>10} {'DIFF':>8} DROPS")
        for t in totals:
            counts = {**t["dropped"], "auth_refused": t.get("auth_refused", 0)}
            drops = ", ".join(f"{k}={v}" for k, v in counts.items() if v) or "-"
            lines.append(
                f"{t['link']:<32} {t['sent']:>10} {t['received']:>10} {t['difference']:>8} {drops}"
            )
    lines += _live_and_extra(rows)
    runs = [(r["stage"], run) for r in rows for run in r["runs"][-3:]]
    if runs:
        lines.append("")
        lines += [f"{stage}: {run_line(run)}" for stage, run in runs]
    return "\n".join(lines)


def _stalled(rows: list[dict[str, Any]]) -> list[str]:
    return [
        f"{r['stage']}/{r['worker']} STALLED: {r['stalled']}; its share of the open run is "
        "closed incomplete, and the other workers carry the stream"
        for r in rows
        if r["state"] == "STALLED"
    ]


def host_table(rows: list[dict[str, Any]]) -> str:
    """The multi-host status: one row per process with the host it runs on."""
    lines = [f"{'CHAIN':<10} {'STAGE':<16} {'W':>2} {'STATE':<9} {'HOST':<12} {'IN':>9} {'OUT':>9}"]
    for r in rows:
        where = ",".join(r["hosts"]) or "-"
        lines.append(
            f"{r['chain']:<10} {r['stage']:<16} {r['worker']:>2} {r['state']:<9} {where:<12} "
            f"{r.get('received', '-'):>9} {r.get('sent', '-'):>9}"
        )
    totals = [t for t in link_totals(rows) if t["dropped"] or t.get("auth_refused")]
    for t in totals:
        counts = {**t["dropped"], "auth_refused": t.get("auth_refused", 0)}
        text = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
        lines.append(f"link {t['link']}: {text}")
    lines += _stalled(rows)
    return "\n".join(lines)


@main.command()
@TOPOLOGY
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of process objects.")
@user_errors
def status(topology: str, as_json: bool) -> None:
    """One row per process: supervisor state, psutil figures and stage counters."""
    from arroyo.control.supervise import status_rows

    topo = _load_running(topology)
    if topo.multihost:
        from arroyo.control import cluster

        host_rows = cluster.status_rows(topo)
        if as_json:
            click.echo(json.dumps(host_rows, indent=1))
        else:
            click.echo(host_table(host_rows))
        return
    rows = status_rows(topo)
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    click.echo(status_table(rows) if rows else "not running")
    _scale_notes(topo)


@main.command()
@TOPOLOGY
@click.option(
    "--interval", type=float, default=1.0, show_envvar=True, help="Seconds between refreshes."
)
@click.option("--count", type=int, default=0, show_envvar=True, help="Refreshes (0: until Ctrl-C).")
@user_errors
def top(topology: str, interval: float, count: int) -> None:
    """The status table refreshed live until Ctrl-C: rates are each process's own
    over its last seconds, CPU % over this command's last seconds of readings."""
    from arroyo.control.status import CpuMeter
    from arroyo.control.supervise import status_rows

    topo = _load_running(topology)
    if topo.multihost:
        msg = f"{topo.path}: `arroyo top` covers one host; use `arroyo status` with [hosts]"
        raise ConfigError(msg)
    cpu = CpuMeter()
    n = 0
    tty = sys.stdout.isatty()
    try:
        while True:
            table = status_table(status_rows(topo, cpu))
            if tty:
                click.clear()
                table = "\n".join(
                    click.style(line, fg="red")
                    if line.endswith(" !") or "INCOMPLETE" in line
                    else line
                    for line in table.splitlines()
                )
            click.echo(f"arroyo top {topo.name}  {time.strftime('%H:%M:%S')}\n{table}")
            n += 1
            if count and n >= count:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@main.command()
@TOPOLOGY
@click.argument("stage")
@click.argument("workers", type=int)
@user_errors
def scale(topology: str, stage: str, workers: int) -> None:
    """Set STAGE's worker count while everything else keeps running."""
    from arroyo.control.supervise import scale as do_scale

    topo = _load(topology)
    if topo.multihost:
        from arroyo.control import cluster

        old, new = cluster.scale(topo, stage, workers)
    else:
        old, new = do_scale(topo, stage, workers)
    click.echo(f"{stage}: {old} -> {new} workers")


@main.command()
@TOPOLOGY
@click.argument("stage")
@click.option("--worker", type=int, default=0, show_envvar=True, help="Worker index.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@user_errors
def logs(topology: str, stage: str, worker: int, follow: bool) -> None:
    """Print the log of one worker of STAGE."""
    from arroyo.control.render import paths, process_name

    topo = _load(topology)
    topo.stage(stage)
    logs_dir = paths(topo).logs
    if topo.multihost:
        from arroyo.control.hostconf import host_paths
        from arroyo.runtime.net import machine_host

        here = machine_host(topo)
        if not here:
            msg = "which host is this? set ARROYO_HOST (logs are read on the host itself)"
            raise ConfigError(msg)
        logs_dir = host_paths(topo, here).logs
    path = logs_dir / f"{process_name(stage, worker)}.log"
    if not path.exists():
        msg = f"{path}: no log yet for {stage} worker {worker}"
        raise ConfigError(msg)
    with path.open(errors="replace") as f:
        click.echo(f.read(), nl=False)
        while follow:
            line = f.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


@main.command()
@TOPOLOGY
@click.option("--host", default="127.0.0.1", show_envvar=True, help="Address to listen on.")
@click.option("--port", type=int, default=9464, show_envvar=True, help="Port (0: any free).")
@user_errors
def metrics(topology: str, host: str, port: int) -> None:
    """Serve Prometheus text-format metrics for TOPOLOGY at /metrics until Ctrl-C."""
    from arroyo.control.metrics import serve

    topo = _load(topology)
    if topo.multihost:
        msg = f"{topo.path}: `arroyo metrics` covers one host's supervisord; not with [hosts] yet"
        raise ConfigError(msg)
    server = serve(topo, host, port)
    addr, bound = server.server_address[0], server.server_address[1]
    click.echo(f"serving http://{addr!s}:{bound}/metrics")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
