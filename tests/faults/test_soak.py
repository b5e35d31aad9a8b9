"""Opt-in soak: a chain at a steady rate for ARROYO_SOAK seconds (e.g. 300), with the
RSS of every process sampled; prints the drift. Run: ARROYO_SOAK=300 pytest -m soak -s"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from arroyo.control import supervise
from arroyo.topology import load
from tests.conftest import wait_for
from tests.integration.conftest import arroyo, pids

SECONDS = float(os.environ.get("ARROYO_SOAK", "0"))

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(not SECONDS, reason="opt-in: set ARROYO_SOAK=<seconds>"),
    pytest.mark.timeout(int(SECONDS) + 300),
]

SOAK = """
[topology]
name = soak
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 2000
runs = 1000000
shape = 128, 128
rate_hz = 1000

[stage:reduce]
role = operator
class = stages.reduce:RadialProfile
bins = 64
input = det
workers = 2

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = reduce
"""


def test_soak_rss_stays_flat(topo):
    path = topo(SOAK)
    arroyo("up", str(path))
    try:
        wait_for(lambda: len(pids(path)) == 4, timeout=30)
        time.sleep(min(30.0, SECONDS / 5))  # warm-up: pools, caches, zmq buffers
        first = {k: psutil.Process(p).memory_info().rss for k, p in pids(path).items()}
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            time.sleep(10)
            assert len(pids(path)) == 4, "a process died"
        last = {k: psutil.Process(p).memory_info().rss for k, p in pids(path).items()}
        rows = {r["stage"] + str(r["worker"]): r for r in supervise.status_rows(load(path))}
        print("\nsoak RSS drift over", SECONDS, "s:")
        for key in sorted(first):
            drift = (last[key] - first[key]) / 2**20
            a, b = first[key] / 2**20, last[key] / 2**20
            print(f"  {key:<10} {a:7.1f} MiB -> {b:7.1f} MiB ({drift:+.1f})")
        print(
            "  sink received",
            rows["sink0"]["received"],
            "events, dropped",
            rows["sink0"]["dropped"],
        )
        assert all(last[k] - first[k] < 32 * 2**20 for k in first), "RSS grew by more than 32 MiB"
        assert first.keys() == last.keys() and all(pids(path)[k] for k in first)
    finally:
        supervise.down(load(path), timeout=60)
