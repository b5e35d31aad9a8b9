"""A stage doing numpy work with large temporaries must not page-fault per event.

glibc's malloc hands blocks above its mmap threshold back to the kernel on free; in a
stage process (after ``import zmq``) that threshold stops adapting, so every 512 KiB
temporary was mmapped, faulted in page by page and unmapped again: thousands of minor
faults per event and a third of the plain-process speed (issue 14). The stage reports
its faults per event in its stats; counting them needs no clock.
"""

from __future__ import annotations

import json

import pytest

from arroyo.runtime import malloc
from arroyo.runtime.stats import stats_path
from arroyo.topology import load
from tests.conftest import Stages, wait_for

pytestmark = pytest.mark.timeout(120)

FRAMES = 300

TOPO = """
[topology]
name = faults
run_dir = run

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = {frames}
shape = 256, 256

[stage:work]
role = operator
class = stages.basic:Temporaries
rounds = 12
input = det
; a short queue: with the default window the unpaced source parks hundreds of frames
; in the worker, and their first touch is counted (32 faults per 128 KiB frame)
hwm = 8
{extra}

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = work
"""


def _worker_stats(path, stage: str) -> dict | None:
    file = stats_path(load(path), stage, 0)
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _faults_per_event(topo, stages: Stages, extra: str = "") -> float:
    path = topo(TOPO.format(frames=FRAMES, extra=extra))
    stages.start(path, "sink")
    stages.start(path, "work")
    stages.start(path, "det")

    def done() -> dict | None:
        snap = _worker_stats(path, "work")
        return snap if snap and snap["received"] >= FRAMES else None

    wait_for(done, timeout=90)
    codes = stages.stop_all(["det.0", "work.0", "sink.0"])
    assert codes == {"det.0": 0, "work.0": 0, "sink.0": 0}, stages.dump()
    # the file written at exit counts every event of the run
    snap = _worker_stats(path, "work")
    assert snap is not None and snap["received"] == FRAMES
    assert snap["faults_per_event"] is not None
    return float(snap["faults_per_event"])


def test_numpy_operator_takes_few_page_faults_per_event(topo, stages):
    per_event = _faults_per_event(topo, stages)
    print(f"{per_event:.1f} minor page faults per event")
    # 12 rounds x two 512 KiB temporaries faulted in afresh would be ~3,000 per event;
    # a reused heap takes none once warm (the first events grow it once).
    assert per_event < 50, f"{per_event:.0f} minor page faults per event"


@pytest.mark.skipif(not malloc.is_glibc(), reason="the thresholds are glibc's")
def test_tune_malloc_false_leaves_glibc_defaults(topo, stages):
    # The opt-out is real: with glibc's own thresholds the temporaries are mmapped and
    # faulted in again every round (about 2,700 faults per event here).
    assert _faults_per_event(topo, stages, "tune_malloc = false") > 500
