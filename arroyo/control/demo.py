"""``scripts/demo``: run deploy/demo.ini under supervisord, show it live, summarise.

Starts the chain at the INI's worker counts (a count kept from an earlier ``arroyo
scale`` is undone, and said) and the dashboard, and the simulated detector beside it:
``arroyo simulate`` (a child process the demo always ends) plays ``SERIES`` series of
DECTRIS Stream V2 on the endpoint the INI's detector stage connects to. Prints the
viewer's and the dashboard's URLs, and the status table every second while the
detector streams and once more when every run has reached the sink; prints a summary.
Then keeps the viewer and the dashboard serving until Ctrl-C, the simulator playing
the same series again every ``--again`` seconds (``--once``: stop after the summary,
as the tests do). Ctrl-C prints the summary of every run the sink saw, brings
everything down and exits 0 (1 if a run arrived incomplete). Only the last ``--keep``
runs stay on disk.

``--tiled`` runs deploy/tiled.ini the same way, beside a Tiled server of its own
(``arroyo.control.tiled_server``): the runs go into Tiled and come back out of it to
a viewer; at the end it prints what Tiled holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arroyo.control import supervise
from arroyo.control.commands import status_table
from arroyo.control.scaled import reset_scale
from arroyo.control.tiled_server import TiledDemo
from arroyo.errors import ArroyoError, ConfigError
from arroyo.runtime.stats import run_line
from arroyo.topology import Topology, load

ROOT = Path(__file__).resolve().parents[2]  # the repository: arroyo/control/demo.py
DEMO = ROOT / "deploy" / "demo.ini"
TILED = ROOT / "deploy" / "tiled.ini"  # --tiled
AGAIN_EVERY = 10.0  # seconds between two rounds of runs while the pages are served
KEEP_RUNS = 9  # runs kept on disk: the sink's log and the writer's run folders
DASHBOARD_PORT = 8764
TILED_DASHBOARD_PORT = 8767  # beside the main demo's pages (its viewer: 8766)
ROUND_TIMEOUT = 60.0  # seconds a round of runs may take to reach the sink
RUN_FOLDER = re.compile(r"run_(\d+)(-\d+)?(\.h5)?")  # RunFolderWriter's, NexusWriter's
SERIES = 3  # series (runs) per round of the simulated detector
SIMULATE = ["--format", "dectris-stream2", "--series", str(SERIES), "--images", "200",
            "--shape", "256,256", "--dtype", "uint16", "--compression", "bslz4",
            "--rate", "400", "--no-pixel-mask", "--linger", "10"]  # fmt: skip
# --tiled: 100 frames a series, with the full header (the pyFAI stage's geometry and
# pixel mask; the gaps read NODATA, masked, as a real detector's).
TILED_SIMULATE = ["--format", "dectris-stream2", "--series", str(SERIES), "--images", "100",
                  "--shape", "256,256", "--dtype", "uint16", "--compression", "bslz4",
                  "--rate", "200", "--header-detail", "all", "--linger", "10"]  # fmt: skip


def _option_path(topology: Topology, stage: str) -> Path | None:
    if stage not in topology.stages or "path" not in topology.stages[stage].options:
        return None
    path = Path(topology.stages[stage].options["path"])
    return path if path.is_absolute() else topology.path.parent / path


@dataclass
class Tally:
    """Every run the sink's log has shown during this demo, kept in memory so that
    pruning the log loses nothing from the summary: run -> events seen, and the Stop's
    data (None while the run is open)."""

    sink: Path
    nexus: Path | None = None  # the NeXus writer's folder, if the topology has one
    events: dict[int, int] = field(default_factory=dict)
    stops: dict[int, dict[str, Any] | None] = field(default_factory=dict)

    def update(self) -> None:
        events: dict[int, int] = {}
        for rec in _records(self.sink):
            run = rec["run"]
            self.stops.setdefault(run, None)
            if rec["kind"] == "Event":
                events[run] = events.get(run, 0) + 1
            elif rec["kind"] == "Stop":
                self.stops[run] = rec.get("data") or {}
        for run, n in events.items():  # a pruned run keeps the count it had
            self.events[run] = max(n, self.events.get(run, 0))

    def closed(self) -> list[int]:
        return [run for run, stop in self.stops.items() if stop is not None]

    def complete(self) -> list[int]:
        return [r for r, s in self.stops.items() if s is not None and not s.get("incomplete")]

    def cut_short(self) -> list[int]:
        """Runs the stop itself ended: still open, or closed as interrupted."""
        return [r for r, s in self.stops.items() if s is None or s.get("interrupted")]

    def failed(self) -> list[int]:
        """Runs that arrived incomplete for a reason other than the demo's own stop."""
        cut = set(self.cut_short())
        return [r for r in self.closed() if r not in cut and r not in self.complete()]


def _records(path: Path) -> list[dict[str, Any]]:
    """The sink's JSON lines, up to one still being written."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def prune(topology: Topology, keep: int) -> None:
    """Keep the last ``keep`` runs on disk: in the sink's log, the writer's folders and
    the NeXus writer's files. Called only while no run flows (before ``up``, between
    two rounds, after ``down``):
    the log is rewritten in place because the sink keeps it open for appending (its
    next line goes to the new end), and a folder is removed only once written."""
    sink = _option_path(topology, "sink")
    folders = [_option_path(topology, stage) for stage in ("writer", "nexus")]
    with _ctrl_c_deferred():  # a log rewritten halfway would lose the runs it keeps
        if sink is not None and sink.exists():
            _prune_log(sink, keep)
        for folder in folders:
            if folder is not None and folder.is_dir():
                _prune_folders(folder, keep)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """SIGINT blocked inside the block and delivered (KeyboardInterrupt) right after."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _prune_log(sink: Path, keep: int) -> None:
    with sink.open("r+", encoding="utf-8") as f:
        lines = f.readlines()
        runs = [_run_of(line) for line in lines]
        recent = set(sorted({r for r in runs if r is not None})[-keep:])
        kept = [line for line, run in zip(lines, runs, strict=True) if run in recent]
        if len(kept) < len(lines):
            f.seek(0)
            f.writelines(kept)
            f.truncate()


def _run_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["run"])
    except (ValueError, KeyError, TypeError):
        return None


def _prune_folders(folder: Path, keep: int) -> None:
    by_run: dict[int, list[Path]] = {}
    for path in folder.iterdir():
        m = RUN_FOLDER.fullmatch(path.name)
        if m and path.is_dir() == (m.group(3) is None):
            by_run.setdefault(int(m.group(1)), []).append(path)
    for run in sorted(by_run)[:-keep]:
        for path in by_run[run]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _viewer_urls(topology: Topology, timeout: float = 10.0) -> list[str]:
    """The URLs the topology's viewer stages serve at (from their stats)."""
    names = [n for n, s in topology.stages.items() if s.class_path.endswith(":LiveViewer")]
    deadline = time.monotonic() + timeout
    while True:
        rows = supervise.status_rows(topology)
        urls = [r["extra"]["url"] for r in rows if r["stage"] in names and "url" in r["extra"]]
        if len(urls) >= len(names) or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def _serve_pages(topology: Topology, port: int) -> Any:
    """Start the dashboard beside the chain and print both URLs; None without the
    web extra (the demo then runs as before)."""
    from arroyo.control import web

    try:
        server, token = web.serve(topology, port=port)
    except ArroyoError as e:
        print(f"no dashboard: {e}", file=sys.stderr)
        return None
    for url in _viewer_urls(topology):
        print(f"viewer:    {url}")
    print(f"dashboard: {server.url}#token={token}")
    return server


class Detector:
    """The simulated DCU: one ``arroyo simulate`` child per round of ``SERIES`` series,
    bound where the topology's detector stage connects; ``end`` always ends it."""

    def __init__(self, topology: Topology, args: list[str]) -> None:
        self.endpoint = str(topology.stages["detector"].options["endpoint"])
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def play(self) -> None:
        self.end()
        arroyo = Path(sys.executable).with_name("arroyo")
        cmd = [str(arroyo) if arroyo.exists() else "arroyo", "simulate"]
        self.proc = subprocess.Popen(
            [*cmd, "--endpoint", self.endpoint, *self.args],
            stdout=subprocess.DEVNULL,  # its one line per series; the sink says more
        )

    def done(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def end(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # it stops between two messages and exits
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _start_afresh(topology: Topology, keep: int) -> None:
    """Every demo starts from its INI: nothing left running by an earlier demo (a
    killed one leaves stage processes behind), no live values of ``arroyo set``, the
    worker counts of the INI (not one kept from an earlier ``arroyo scale``), a new
    sink log."""
    supervise.down(topology)  # all of that but the counts; quick when nothing runs
    for line in reset_scale(topology):
        print(line)
    sink = _option_path(topology, "sink")
    if sink is not None:
        sink.unlink(missing_ok=True)
    prune(topology, keep)


def main(
    topology_path: Path = DEMO,
    timeout: float = 50.0,
    serve: bool = False,
    again: float = AGAIN_EVERY,
    keep: int = KEEP_RUNS,
    port: int = DASHBOARD_PORT,
    tiled: bool = False,
) -> int:
    topology = load(topology_path)
    sink = _option_path(topology, "sink")
    if sink is None or "detector" not in topology.stages:
        msg = f"{topology.path}: the demo needs a [stage:detector] and a [stage:sink] with a path"
        raise ConfigError(msg)
    tally = Tally(sink, _option_path(topology, "nexus"))
    expected_runs = SERIES
    beside = TiledDemo(topology) if tiled else None  # (without its extras: exit 2 here)
    detector = Detector(topology, TILED_SIMULATE if beside else SIMULATE)
    print(f"arroyo demo: {topology.path}")
    _start_afresh(topology, keep)
    t0 = time.monotonic()
    pages = None
    summarised = interrupted = False
    try:
        if beside is not None:
            beside.start()
        problems = supervise.up(topology)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        pages = _serve_pages(topology, port) if serve else None
        detector.play()
        _watch(topology, tally, expected_runs, t0, timeout)
        summarised = True
        if pages is not None:
            again_text = f"{expected_runs} more runs every {again:g}s"
            print(f"serving the viewer and the dashboard until Ctrl-C ({again_text})")
            _keep_streaming(detector, tally, expected_runs, again, keep, topology, beside)
    except KeyboardInterrupt:
        interrupted = True
        print("\nCtrl-C: stopping the chain")
    finally:
        detector.end()
        _stop(topology, pages, tally, keep)
        if interrupted:
            _final_summary(tally)
        if beside is not None:  # after the chain's stop: its last writes go to Tiled
            beside.stop()
    if interrupted:
        return 130 if not summarised else 1 if tally.failed() else 0
    whole = len(tally.complete()) == len(tally.closed()) == expected_runs
    return 0 if whole else 1


def _stop(topology: Topology, pages: Any, tally: Tally, keep: int) -> None:
    """Bring everything down, then count what the stop delivered and prune. The
    dashboard closes its browsers' connections meanwhile (it may wait a second for
    them), so Ctrl-C costs the chain's clean stop and not that too."""
    # A second Ctrl-C must not cut the clean stop short and leave processes behind.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    closing = threading.Thread(target=pages.stop if pages else None, name="demo-pages-stop")
    try:
        closing.start()
        supervise.down(topology)
    finally:
        closing.join()
        signal.signal(signal.SIGINT, previous)
    tally.update()
    prune(topology, keep)


def _watch(topology: Topology, tally: Tally, runs: int, t0: float, timeout: float) -> None:
    """The status table every second until ``runs`` runs reached the sink, then once
    more with the sink's reports of them all, and the summary."""
    while len(tally.closed()) < runs and time.monotonic() - t0 < timeout:
        print(status_table(supervise.status_rows(topology), {}) + "\n")
        time.sleep(1.0)
        tally.update()
    elapsed = time.monotonic() - t0
    rows: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + 3.0  # the stats files refresh once a second
    while time.monotonic() < deadline:
        rows = supervise.status_rows(topology)
        reports = [r for row in rows if row["stage"] == "sink" for r in row["runs"]]
        if len(reports) >= runs:
            break
        time.sleep(0.2)
    print(status_table(rows, {}) + "\n")
    _summary(tally, runs, reports, elapsed)


def _keep_streaming(
    detector: Detector,
    tally: Tally,
    runs: int,
    again: float,
    keep: int,
    topology: Topology,
    beside: TiledDemo | None = None,
) -> None:
    """While the pages are served: play the detector's series again every ``again``
    seconds once its runs have reached the sink, so there is always something new to
    look at (run ids keep counting up; the listener stays up, as it would beside a real
    detector), and prune between rounds, while nothing flows. Returns on Ctrl-C only."""
    settled = True
    while True:
        time.sleep(again)
        seen = len(tally.closed())
        detector.end()  # long done when its runs settled
        if settled:  # every run so far is in: nothing writes to the files now
            prune(topology, keep)
            if beside is not None:
                beside.prune(keep)
        detector.play()
        deadline = time.monotonic() + ROUND_TIMEOUT
        while len(tally.closed()) < seen + runs and time.monotonic() < deadline:
            time.sleep(0.2)
            tally.update()
        settled = len(tally.closed()) >= seen + runs
        print(_round_line(tally, sorted(tally.closed())[seen:]))


def _round_line(tally: Tally, runs: list[int]) -> str:
    if not runs:
        return f"no run reached the sink within {ROUND_TIMEOUT:.0f}s"
    whole = sum(1 for r in runs if r in tally.complete())
    span = f"{runs[0]}-{runs[-1]}" if len(runs) > 1 else f"{runs[0]}"
    return f"runs {span}: {whole}/{len(runs)} complete"


def _summary(tally: Tally, expected_runs: int, reports: list[dict], elapsed: float) -> None:
    events = sum(tally.events.values())
    frame_bytes = 2 * 256 * 256  # uint16 frames of the demo detector
    print(f"runs complete: {len(tally.complete())}/{expected_runs}")
    for r in reports:
        print(f"  {run_line(r)}")
    print(
        f"frames: {events}, {events * frame_bytes / 2**20 / elapsed:.1f} MB/s over {elapsed:.1f}s"
    )
    print(f"output: {tally.sink}")
    if tally.nexus is not None:
        print(f"NeXus files: {tally.nexus} (h5ls -r {tally.nexus}/run_00001.h5)")


def _final_summary(tally: Tally) -> None:
    """After Ctrl-C: every run the sink saw during the demo (the files keep the last)."""
    cut = [r for r in tally.cut_short() if r not in tally.complete()]
    whole = len(tally.complete())
    print(f"runs complete: {whole}/{len(tally.stops)}")
    for run in tally.failed():
        print(f"  run {run}: INCOMPLETE, {tally.events.get(run, 0)} events")
    for run in cut:
        print(f"  run {run}: cut short by the stop, {tally.events.get(run, 0)} events")
    print(f"output: {tally.sink} (the last runs)")


def _positive(text: str, kind: type = float) -> Any:
    value = kind(text)
    if not value > 0:
        msg = f"must be > 0, not {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "topology",
        nargs="?",
        type=Path,
        help="default deploy/demo.ini, with --tiled deploy/tiled.ini",
    )
    parser.add_argument(
        "--tiled",
        action="store_true",
        help="The Tiled demo: runs into a Tiled server of its own and back out (docs/tiled.md).",
    )
    parser.add_argument(
        "--once", action="store_true", help="Stop after the summary instead of serving."
    )
    parser.add_argument(
        "--again",
        type=_positive,
        default=AGAIN_EVERY,
        help=f"Seconds between two rounds of runs while serving (default {AGAIN_EVERY:g}).",
    )
    parser.add_argument(
        "--keep",
        type=lambda t: _positive(t, int),
        default=KEEP_RUNS,
        help=f"Runs kept on disk, the newest (default {KEEP_RUNS}).",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"The dashboard's port; 0: any free one (default {DASHBOARD_PORT}, "
        f"with --tiled {TILED_DASHBOARD_PORT}).",
    )
    args = parser.parse_args()
    args.topology = args.topology or (TILED if args.tiled else DEMO)
    if args.port is None:
        args.port = TILED_DASHBOARD_PORT if args.tiled else DASHBOARD_PORT
    return args


if __name__ == "__main__":
    args = _args()
    try:
        code = main(
            args.topology,
            serve=not args.once,
            again=args.again,
            keep=args.keep,
            port=args.port,
            tiled=args.tiled,
        )
    except ArroyoError as e:
        print(e, file=sys.stderr)
        code = 2
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    sys.exit(code)
