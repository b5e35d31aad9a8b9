"""A worker count kept from an earlier ``arroyo scale`` (RUN_DIR/workers.json): ``up``
and ``status`` say so, and ``up --reset-scale`` returns to the INI's count."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.integration.conftest import arroyo, pids

pytestmark = pytest.mark.timeout(180)

NOTE = "work: 3 workers, scaled at runtime; the INI says 2"


def workers(path, stage="work") -> set[str]:
    return {name for name in pids(path) if name.startswith(f"{stage}_")}


def test_a_kept_scale_is_announced_until_reset_scale_returns_to_the_ini(sup):
    path = sup(frames=1_000_000, rate=200, workers=2)
    arroyo("up", str(path))
    arroyo("scale", str(path), "work", "3")
    arroyo("down", str(path))

    up = arroyo("up", str(path))  # a later session: the kept count comes back, said aloud
    assert NOTE in up.stdout + up.stderr, up
    assert workers(path) == {"work_0", "work_1", "work_2"}
    assert NOTE in arroyo("status", str(path)).stdout

    reset = arroyo("up", str(path), "--reset-scale")  # while running: drained back to 2
    assert "work: back to the INI's 2 workers (was 3)" in reset.stdout + reset.stderr, reset
    wait_for(lambda: workers(path) == {"work_0", "work_1"}, timeout=30)
    assert "scaled at runtime" not in arroyo("status", str(path)).stdout

    arroyo("down", str(path))
    up = arroyo("up", str(path))
    assert "scaled at runtime" not in up.stdout + up.stderr
    assert workers(path) == {"work_0", "work_1"}


def test_reset_scale_while_down_forgets_the_kept_count(sup):
    path = sup(workers=2)
    arroyo("scale", str(path), "work", "1")  # nothing runs: only recorded
    assert "work: 1 worker, scaled at runtime; the INI says 2" in arroyo("status", str(path)).stdout
    up = arroyo("up", str(path), "--reset-scale")
    assert "work: back to the INI's 2 workers (was 1)" in up.stdout + up.stderr, up
    assert workers(path) == {"work_0", "work_1"}
