"""Several hosts on this machine (network namespaces, see ``netns``) for the
``multihost`` tests. Without the capability (root, iproute2, a bridge in a namespace)
the tests skip with the reason, except under ``CI=true``, where that is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import arroyo_bin, in_ci
from tests.multihost.netns import CapabilityMissing, Host, NetnsHosts

pytestmark = pytest.mark.multihost

SNIFFER = Path(__file__).with_name("sniff.py")

# A source whose every event carries a marker a sniffer looks for in the traffic.
MARKED_SOURCE = """
import time
from arroyo.message import Event, Start, Stop
from arroyo.stage import Listener


class MarkedSource(Listener):
    def __init__(
        self, runs: int, frames: int, rate_hz: float, marker: str = "", gap_s: float = 0.2
    ) -> None:
        self.runs, self.frames, self.rate_hz = runs, frames, rate_hz
        self.marker, self.gap_s = marker, gap_s

    def start(self) -> None:
        for _ in range(self.runs):
            self.deliver(Start(data={"frames": self.frames}))
            t0 = time.monotonic()
            for i in range(self.frames):
                if self.stopping:
                    return
                if self.rate_hz:
                    time.sleep(max(0.0, t0 + i / self.rate_hz - time.monotonic()))
                self.deliver(Event(metadata={"i": i, "marker": self.marker}, payload=b"x" * 64))
            self.deliver(Stop(data={"frames": self.frames}))
            time.sleep(self.gap_s)
"""


def hosts_or_skip(count: int) -> NetnsHosts:
    try:
        return NetnsHosts(count).__enter__()
    except CapabilityMissing as e:
        if in_ci():
            pytest.fail(f"multihost: cannot make namespace hosts under CI: {e}")
        pytest.skip(f"multihost: cannot make namespace hosts here: {e}")


@pytest.fixture
def hosts3() -> Iterator[NetnsHosts]:
    hosts = hosts_or_skip(3)
    try:
        yield hosts
    finally:
        hosts.close()


class HostStages:
    """``arroyo-stage`` processes started on namespace hosts, with their logs."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: dict[str, tuple[Host, subprocess.Popen[bytes]]] = {}
        self._n = 0

    def start(self, host: Host, topology: Path, stage: str, worker: int = 0) -> str:
        self._n += 1
        key = f"{stage}.{worker}@{host.name}#{self._n}"
        log = (self.tmp_path / f"{key}.log").open("wb")
        env = dict(os.environ, ARROYO_HOST=host.name, PYTHONUNBUFFERED="1")
        cmd = [arroyo_bin("arroyo-stage"), str(topology), stage, "--worker", str(worker)]
        proc = host.popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started[key] = (host, proc)
        return key

    def log(self, key: str) -> str:
        path = self.tmp_path / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def dump(self) -> str:
        return "\n".join(f"----- {k} -----\n{self.log(k)[-3000:]}" for k in self.started)


@pytest.fixture
def host_stages(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HostStages]:
    s = HostStages(tmp_path)
    yield s
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(s.dump())
        for host in {h.name: h for h, _ in s.started.values()}.values():
            print(f"----- sockets on {host.name} -----\n{host.run(['ss', '-tnpa']).stdout}")


@pytest.fixture
def marked_source(tmp_path: Path) -> Callable[[], None]:
    def write() -> None:
        (tmp_path / "mhstages.py").write_text(MARKED_SOURCE)

    return write


def python() -> str:
    return sys.executable


__all__ = ["SNIFFER", "HostStages", "python"]
