"""``scripts/demo``: run deploy/demo.ini under supervisord, show it live, summarise.

Starts the chain and the dashboard, prints the viewer's and the dashboard's URLs and
the status table while the detector streams, waits until every run reached the sink,
prints a summary, then keeps the viewer and the dashboard serving until Ctrl-C, the
detector sending the same runs again every ``AGAIN_EVERY`` seconds (``--once``: stop
after the summary, as the tests do). Always brings everything down.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from arroyo.control import supervise
from arroyo.control.commands import status_table
from arroyo.errors import ArroyoError
from arroyo.topology import load

ROOT = Path(__file__).resolve().parents[2]  # the repository: arroyo/control/demo.py
DEMO = ROOT / "deploy" / "demo.ini"
AGAIN_EVERY = 10.0  # seconds between two rounds of runs while the pages are served


def _runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if rec["kind"] == "Stop":
            out.append(rec)
    return out


def _viewer_urls(topology: Any, timeout: float = 10.0) -> list[str]:
    """The URLs the topology's viewer stages serve at (from their stats)."""
    names = [n for n, s in topology.stages.items() if s.class_path.endswith(":LiveViewer")]
    deadline = time.monotonic() + timeout
    while True:
        rows = supervise.status_rows(topology)
        urls = [r["extra"]["url"] for r in rows if r["stage"] in names and "url" in r["extra"]]
        if len(urls) >= len(names) or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)


def _serve_pages(topology: Any) -> Any:
    """Start the dashboard beside the chain and print both URLs; None without the
    web extra (the demo then runs as before)."""
    from arroyo.control import web

    try:
        server, token = web.serve(topology, port=8764)
    except ArroyoError as e:
        print(f"no dashboard: {e}", file=sys.stderr)
        return None
    for url in _viewer_urls(topology):
        print(f"viewer:    {url}")
    print(f"dashboard: {server.url}#token={token}")
    return server


def main(topology_path: Path = DEMO, timeout: float = 50.0, serve: bool = False) -> int:
    topology = load(topology_path)
    sink = topology.stages["sink"].options["path"]
    sink = sink if sink.is_absolute() else topology.path.parent / sink
    expected_runs = topology.stages["detector"].options.get("runs", 1)
    if sink.exists():
        sink.unlink()
    print(f"arroyo demo: {topology.path}")
    if supervise.is_running(topology):  # left over from an earlier demo: start afresh
        supervise.down(topology)
    t0 = time.monotonic()
    pages = None
    summarised = False
    try:
        problems = supervise.up(topology)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        pages = _serve_pages(topology) if serve else None
        while len(_runs(sink)) < expected_runs and time.monotonic() - t0 < timeout:
            print(status_table(supervise.status_rows(topology), {}) + "\n")
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        reports: list[dict] = []
        deadline = time.monotonic() + 3.0  # the stats files refresh once a second
        while len(reports) < expected_runs and time.monotonic() < deadline:
            time.sleep(0.2)
            rows = supervise.status_rows(topology)
            reports = [r for row in rows if row["stage"] == "sink" for r in row["runs"]]
        _summary(sink, expected_runs, reports, elapsed)
        summarised = True
        if pages is not None:
            again = f"{expected_runs} more runs every {AGAIN_EVERY:.0f}s"
            print(f"serving the viewer and the dashboard until Ctrl-C ({again})")
            _keep_streaming(topology, sink, expected_runs)
    except KeyboardInterrupt:
        if not summarised:
            print("interrupted")
            return 130
    finally:
        # A second Ctrl-C must not cut the clean stop short and leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if pages is not None:
                pages.stop()
            supervise.down(topology)
        finally:
            signal.signal(signal.SIGINT, previous)
    return 0 if _complete(sink) == expected_runs else 1


def _keep_streaming(topology: Any, sink: Path, runs: int) -> None:
    """While the pages are served: start the detector again every ``AGAIN_EVERY``
    seconds once its runs have reached the sink, so there is always something new to
    look at (run ids keep counting up across its restarts). Returns on Ctrl-C only."""
    server = supervise.rpc(topology)
    spec = topology.stages["detector"]
    name = f"{spec.chain}:{supervise.process_name(spec.name, 0)}"
    while True:
        seen = len(_runs(sink))
        time.sleep(AGAIN_EVERY)
        server.supervisor.stopProcess(name, True)
        server.supervisor.startProcess(name, True)
        deadline = time.monotonic() + 60
        while len(_runs(sink)) < seen + runs and time.monotonic() < deadline:
            time.sleep(0.5)


def _complete(sink: Path) -> int:
    return sum(1 for s in _runs(sink) if not s["data"].get("incomplete"))


def _summary(sink: Path, expected_runs: int, reports: list[dict], elapsed: float) -> None:
    stops = _runs(sink)
    events = (
        sum(1 for line in sink.read_text().splitlines() if '"Event"' in line)
        if sink.exists()
        else 0
    )
    complete = sum(1 for s in stops if not s["data"].get("incomplete"))
    frame_bytes = 2 * 256 * 256  # uint16 frames of the demo detector
    print(f"runs complete: {complete}/{expected_runs}")
    for r in reports:
        print(f"  run {r['run']}: {r['received']}/{r['expected']} events")
    print(
        f"frames: {events}, {events * frame_bytes / 2**20 / elapsed:.1f} MB/s over {elapsed:.1f}s"
    )
    print(f"output: {sink}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("topology", nargs="?", type=Path, default=DEMO)
    parser.add_argument(
        "--once", action="store_true", help="Stop after the summary instead of serving."
    )
    args = parser.parse_args()
    try:
        sys.exit(main(args.topology, serve=not args.once))
    except ArroyoError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
