"""``scripts/demo``: run deploy/demo.ini under supervisord, show it live, summarise.

Starts the chain, prints the status table while the detector streams, waits until
every run reached the sink, prints a summary, and always brings everything down
(Ctrl-C included).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from arroyo.control import supervise
from arroyo.control.commands import status_table
from arroyo.errors import ArroyoError
from arroyo.topology import load

ROOT = Path(__file__).resolve().parents[2]  # the repository: arroyo/control/demo.py
DEMO = ROOT / "deploy" / "demo.ini"


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


def main(topology_path: Path = DEMO, timeout: float = 50.0) -> int:
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
    try:
        problems = supervise.up(topology)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
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
    except KeyboardInterrupt:
        print("interrupted")
        return 130
    finally:
        # A second Ctrl-C must not cut the clean stop short and leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            supervise.down(topology)
        finally:
            signal.signal(signal.SIGINT, previous)
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
    return 0 if complete == expected_runs else 1


if __name__ == "__main__":
    try:
        sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO))
    except ArroyoError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
