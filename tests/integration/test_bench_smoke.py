"""scripts/bench in its tiny mode: every suite runs end to end and reports numbers.

Only the shape of the report is checked, never a timing: this machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)


def test_bench_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "arroyo_bench", "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke"
    assert {"cpu", "cores", "python", "pyzmq"} <= report["machine"].keys()

    for suite in ("one_hop", "chain", "latency"):
        (row,) = report[suite]
        for side in ("raw", "arroyo"):
            assert row[side]["msg_s"] > 0, (suite, side, row[side])
        assert row["ratio"] > 0
    assert report["one_hop"][0]["arroyo"]["mb_s"] > 0
    latency = report["latency"][0]["arroyo"]
    assert 0 < latency["p50_us"] <= latency["p99_us"] <= latency["p999_us"]
    assert report["scaling"]["1 worker"]["msg_s"] > 0
    assert report["scaling"]["2 workers"]["msg_s"] > 0
    # the machine's own ceiling, measured beside the workers
    assert report["scaling"]["bare 1"]["msg_s"] > 0
    assert report["scaling"]["bare 2"]["msg_s"] > 0
    assert report["scaling"]["bare_speedup"] > 0
    assert report["counters"]["stats on"]["msg_s"] > 0
    assert report["counters"]["stats off"]["msg_s"] > 0
    assert [t["target"] for t in report["targets"]] == [
        "one hop >= 64 KiB",
        "one hop 100 B",
        "2 workers, CPU-bound",
        "p99 latency, 10k msg/s of 100 B",
        "stats counters",
    ]
    # the markdown table went to stdout
    assert "| ipc | 100 B |" in proc.stdout
    assert "**Targets**" in proc.stdout
    assert "bare speed-up" in proc.stdout
