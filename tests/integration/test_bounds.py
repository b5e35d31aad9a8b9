"""Numbers that mean nothing are refused before anything starts (issue 13, item 7).

Before: ``workers = 1000000000`` passed ``check`` and ``up`` hung building process
configs; ``rate_hz = nan``, ``rate_hz = -5`` and ``drain_timeout = inf`` were accepted.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import TOPO, WORK, arroyo, supervisord_procs

pytestmark = pytest.mark.timeout(60)


def write(topo, **replace: str):
    text = TOPO.format(frames=10, runs=1, rate=0, workers=1, work=WORK, tmp="{tmp}")
    for old, new in replace.items():
        text = text.replace(old, new)
    return topo(text)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("workers = 1", "workers = 1000000000", "expected at most 256 workers"),
        ("rate_hz = 0", "rate_hz = nan", "expected a number, not NaN"),
        ("rate_hz = 0", "rate_hz = -5", "expected a value >= 0"),
        ("workers = 1", "workers = 1\ndrain_timeout = inf", "expected a finite number >= 0"),
    ],
)
def test_up_refuses_a_meaningless_number_in_one_line(topo, tmp_path, old, new, problem):
    path = write(topo, **{old: new})
    for command in ("check", "up"):
        result = arroyo(command, str(path), check=False)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and str(path) in lines[0], lines
        assert "Traceback" not in result.stderr
    assert not supervisord_procs(tmp_path / "run" / "supervisord.conf")
