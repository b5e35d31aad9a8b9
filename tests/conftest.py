"""Shared fixtures: real stage processes, short run dirs, and leak checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

BIN = Path(sys.executable).parent


def arroyo_bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return out


def runs_of(records: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    """Check strict Start -> events -> Stop order; return (run, events, stop record)."""
    runs = []
    current = None
    count = 0
    for r in records:
        if r["kind"] == "Start":
            assert current is None, f"run {r['run']} started inside run {current}"
            current, count = r["run"], 0
        elif r["kind"] == "Event":
            assert r["run"] == current, f"event of run {r['run']} outside its run ({current})"
            count += 1
        else:
            assert r["run"] == current, f"Stop of run {r['run']} while in run {current}"
            runs.append((current, count, r))
            current = None
    return runs


@pytest.fixture
def topo(tmp_path: Path) -> Callable[[str], Path]:
    """Write an INI topology (dedented) into tmp_path; ``{tmp}`` is replaced by tmp_path."""

    def write(text: str, name: str = "t.ini") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).replace("{tmp}", str(tmp_path)))
        return path

    return write


class Stages:
    """Starts ``arroyo-stage`` processes and guarantees they are gone afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, topology: Path, stage: str, worker: int = 0) -> subprocess.Popen[bytes]:
        key = f"{stage}.{worker}"
        log = (self.tmp_path / f"{key}.log").open("wb")
        proc = subprocess.Popen(
            [arroyo_bin("arroyo-stage"), str(topology), stage, "--worker", str(worker)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[key] = proc
        return proc

    def log(self, key: str) -> str:
        path = self.tmp_path / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, key: str, sig: int = signal.SIGTERM) -> None:
        self.procs[key].send_signal(sig)

    def wait(self, key: str, timeout: float = 30) -> int:
        return self.procs[key].wait(timeout)

    def stop_all(self, order: list[str] | None = None) -> dict[str, int]:
        for key in order or list(self.procs):
            if self.procs[key].poll() is None:
                self.procs[key].send_signal(signal.SIGTERM)
        return {k: p.wait(40) for k, p in self.procs.items()}

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def dump(self) -> str:
        return "\n".join(f"----- {k} -----\n{self.log(k)[-4000:]}" for k in self.procs)


@pytest.fixture
def stages(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stages]:
    s = Stages(tmp_path)
    yield s
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(s.dump())
    s.cleanup()
    alive = [p.pid for p in s.procs.values() if psutil.pid_exists(p.pid) and p.poll() is None]
    assert not alive, f"stage processes left running: {alive}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Every process a test starts is ended by that test."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, f"test leaked processes: {[(p.pid, p.cmdline()) for p in left]}"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def need_extra(extra: str, *modules: str) -> None:
    """Skip the calling test module without an optional extra's ``modules``, with the
    reason; under CI, where ./scripts/test installs every extra, fail."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            why = f"{name} is missing: pip install 'arroyo[{extra}]'"
            if in_ci():
                pytest.fail(f"CI needs the {extra} extra: {why}", pytrace=False)
            pytest.skip(why, allow_module_level=True)


def need_detectors() -> None:
    """The detectors extra (bitshuffle, lz4, cbor2), as ``need_extra``."""
    need_extra("detectors", "bitshuffle", "lz4", "cbor2")


def need_hdf5() -> None:
    """The hdf5 extra (h5py, hdf5plugin), as ``need_extra``."""
    need_extra("hdf5", "h5py", "hdf5plugin")


@pytest.fixture
def supervised(topo: Callable[[str], Path]) -> Iterator[Callable[[str], Path]]:
    """``supervised(ini_text)``: the topology written (``topo``), started by ``arroyo up``
    under the real supervisord, and always brought down after the test (``bring_down``:
    whatever is left is killed and fails the test)."""
    from tests.integration.conftest import arroyo, bring_down  # (it imports this module)

    made: list[Path] = []

    def up(text: str) -> Path:
        path = topo(text)
        made.append(path)
        arroyo("up", str(path))
        return path

    yield up
    for path in made:
        bring_down(path)
