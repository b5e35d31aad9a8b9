"""Fixtures for the fault suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import arroyo, bring_down


@pytest.fixture
def supervised(topo) -> Iterator[Callable[[str], Path]]:
    """``supervised(ini_text)``: the topology written (``topo``), started by ``arroyo up``
    under the real supervisord, and always brought down after the test (``bring_down``:
    whatever is left is killed and fails the test)."""
    made: list[Path] = []

    def up(text: str) -> Path:
        path = topo(text)
        made.append(path)
        arroyo("up", str(path))
        return path

    yield up
    for path in made:
        bring_down(path)
