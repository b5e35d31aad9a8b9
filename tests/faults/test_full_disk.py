"""A full disk under run_dir (issue 13, item 4): the source's run-id file keeps its
value, a restarted source's predecessor is still closed, failing stats writes are
logged, and ``arroyo status`` marks figures that stopped coming as stale."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import Stages, in_ci, read_jsonl, runs_of, wait_for
from tests.integration.conftest import arroyo, stage_procs, supervisord_procs

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

CHAIN = """
[topology]
name = disk
run_dir = run

[chain:main]
stages = det, work, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 200
runs = 100000
shape = 8, 8
rate_hz = 800

[stage:work]
role = operator
class = stages.basic:Delay
max_ms = 0.2
input = det
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = work
"""


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path], Path]]:
    """Mounts a 2 MB tmpfs on a folder (root only); unmounted at teardown."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("the full-disk tests need root (mount -t tmpfs) under CI")
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            if in_ci():
                pytest.fail(f"mount -t tmpfs failed: {done.stderr.strip()}")
            pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


class Filler:
    """Fills a disk and keeps it full: like the logs and files of a busy run_dir, it
    takes every block that is freed (a file truncated before it is rewritten, say)."""

    def __init__(self, disk: Path) -> None:
        self.path = disk / "filler"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.done = threading.Event()
        for size in (1 << 16, 1 << 12, 1):
            while self._write(size):
                pass
        self.thread = threading.Thread(target=self._keep_full, daemon=True)
        self.thread.start()

    def _write(self, size: int) -> bool:
        try:
            os.write(self.fd, b"\0" * size)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return False
        return True

    def _keep_full(self) -> None:
        while not self.done.is_set():
            if not self._write(1):
                time.sleep(0)  # let the others run into the full disk

    def free(self) -> None:
        if self.done.is_set():
            return
        self.done.set()
        self.thread.join(10)
        os.close(self.fd)
        self.path.unlink()


FIRST_RUN = 100_000  # far more runs than the restarted source could make during the test


def events_of(records: list[dict], run: int) -> int:
    return sum(1 for r in records if r["kind"] == "Event" and r["run"] == run)


def started_runs(records: list[dict]) -> list[int]:
    return [r["run"] for r in records if r["kind"] == "Start"]


def test_a_source_restarted_on_a_full_disk_keeps_counting_and_the_sink_moves_on(
    topo, tmp_path, small_disk
):
    path = topo(CHAIN)
    disk = small_disk(tmp_path / "run")
    # A source that has been running for a while: its restart must not count from 1.
    (disk / "stats").mkdir()
    (disk / "stats" / "det.0.run").write_text(str(FIRST_RUN - 1))
    stages = Stages(tmp_path)
    filler = None
    try:
        for stage, worker in (("sink", 0), ("work", 0), ("work", 1), ("det", 0)):
            stages.start(path, stage, worker)
        out = tmp_path / "out.jsonl"
        wait_for(lambda: len(runs_of(read_jsonl(out))) >= 5, timeout=60)
        run_file = disk / "stats" / "det.0.run"
        filler = Filler(disk)
        unrecorded = wait_for(
            lambda: re.search(r"cannot record run id (\d+)", stages.log("det.0")), timeout=60
        )
        recorded = run_file.read_text()
        # The source dies in a run it could not record, once part of that run has
        # reached the sink (a kill between two runs, or before the run's first messages
        # leave the source, leaves no run open to report); space comes back; it restarts.
        run_id = int(unrecorded.group(1))
        wait_for(lambda: events_of(read_jsonl(out), run_id) >= 5, timeout=30)
        stages.signal("det.0", signal.SIGKILL)
        stages.wait("det.0")
        filler.free()
        n_before = len(runs_of(read_jsonl(out)))
        at_restart = len(read_jsonl(out))
        stages.start(path, "det", 0)
        # The sink closes the dead source's open run and takes the new source's runs.
        wait_for(lambda: len(runs_of(read_jsonl(out))) >= n_before + 3, timeout=60)
        assert recorded.strip().isdigit(), f"run-id file: {recorded!r}"
        assert int(recorded) >= FIRST_RUN + 4, f"run-id file: {recorded!r}"
        records = read_jsonl(out)
        after = started_runs(records[at_restart:])
        assert after and min(after) > int(recorded), f"recorded {recorded}, then {after}"
        stops = [r for r in records if r["kind"] == "Stop"]
        assert any(s["data"].get("incomplete") for s in stops), "the killed run is reported"
    except BaseException:
        print(stages.dump())
        raise
    finally:
        if filler is not None:
            filler.free()
        stages.cleanup()


STATS_CHAIN = CHAIN.replace("runs = 100000", "runs = 1").replace(
    "frames = 200", "frames = 10000000"
)


def test_status_marks_figures_stale_when_stats_cannot_be_written(topo, tmp_path, small_disk):
    path = topo(STATS_CHAIN)
    topology = load(path)
    disk = small_disk(topology.run_dir / "stats")
    conf = supervise.paths(topology).conf
    filler = None
    try:
        arroyo("up", str(path))
        out = tmp_path / "out.jsonl"
        wait_for(lambda: len(read_jsonl(out)) > 300, timeout=30)

        def rows() -> list[dict]:
            return json.loads(arroyo("status", str(path), "--json").stdout)

        assert not any(r["stale"] for r in rows())
        filler = Filler(disk)
        stale = wait_for(lambda: (r := rows()) and all(x["stale"] for x in r) and r, timeout=60)
        assert all(r["stats_age"] > 3 for r in stale)
        text = arroyo("status", str(path)).stdout
        assert text.count("stale") >= 4, text
        filler.free()
        wait_for(lambda: not any(r["stale"] for r in rows()), timeout=30)
        log = (supervise.paths(topology).logs / "sink_00.log").read_text()
        again = re.search(r"stats written again after (\d+) failed attempt", log)
        assert again, log
        # rate-limited: said once (and once a minute), not at every failed write
        assert 1 <= log.count("stats not written") < int(again[1]), log
    finally:
        if filler is not None:
            filler.free()
        try:
            supervise.down(topology, timeout=60)
        finally:
            for p in supervisord_procs(conf) + stage_procs(path):
                p.kill()
