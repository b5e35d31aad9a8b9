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
    # the true ceiling (no zmq, no arroyo), measured beside the workers
    assert report["scaling"]["plain 1"]["msg_s"] > 0
    assert report["scaling"]["plain 2"]["msg_s"] > 0
    assert report["scaling"]["plain_speedup"] > 0
    assert report["scaling"]["compute_ratio"] > 0
    assert report["counters"]["stats on"]["msg_s"] > 0
    assert report["counters"]["stats off"]["msg_s"] > 0
    assert [t["target"] for t in report["targets"]] == [
        "compute in a stage",
        "2 workers, numpy operator",
        "one hop >= 64 KiB",
        "one hop 100 B",
        "chain of three >= 1 MiB",
        "p99 latency, 10k msg/s of 100 B",
        "stats counters",
        "detector ingest",
        "decode in a stage",
        "2 workers decoding + reducing",
        "recorder",
        "replay at max",
        "nexus writer",
        "pva listener",
    ]
    # smoke measures 100 B only: the big-message targets are shown, not measured
    measured = {t["target"]: t["value"] for t in report["targets"]}
    assert measured["compute in a stage"] > 0
    assert measured["one hop >= 64 KiB"] is None
    # the markdown table went to stdout
    assert "| ipc | 100 B |" in proc.stdout
    assert "**Targets**" in proc.stdout
    assert "compute in a stage / plain process" in proc.stdout
    assert "p99 arroyo/raw" in proc.stdout


def test_the_compute_ceiling_imports_neither_zmq_nor_arroyo():
    # importing zmq changes glibc malloc's behaviour: a ceiling that did would be slowed
    # like the stage it judges (issue 14)
    code = (
        "import sys, arroyo_bench.plain; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('zmq', 'arroyo')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.timeout(240)
def test_bench_detector_suite_measures_each_side_beside_its_reference(tmp_path):
    from tests.conftest import need_detectors

    need_detectors()
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "arroyo_bench",
        "--smoke",
        "--only",
        "detectors",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())["detectors"]
    for key in ("detector ingest", "detector decode", "detector scaling"):
        row = report[key]
        for side in row["sides"]:
            assert row[side]["msg_s"] > 0, (key, side, row[side])
        assert row["ratio"] > 0
    # every frame crossed compressed: about 2 MB of the 8.94 decoded
    assert 0 < report["compressed_frame_bytes"] < 8_941_912 / 2
    assert "GB/s compressed" in proc.stdout


def test_the_decoding_reference_imports_no_zmq():
    code = (
        "import sys, arroyo_bench.detectors, arroyo.io.simulate; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'zmq']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
