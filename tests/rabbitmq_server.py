"""A RabbitMQ node of one test's own: its port, its Erlang node name, its data folder,
so a test may stop and start it without touching the machine's shared broker.

RabbitMQ's own start script is used (``/usr/lib/rabbitmq/bin/rabbitmq-server`` on
Debian: the ``/usr/sbin`` wrapper switches to the ``rabbitmq`` user, who cannot write a
test's folder), configured through its documented ``RABBITMQ_*`` environment
variables. No plugin is enabled; the data (durable queues, persistent messages) stays
in the folder from one start to the next, as on a restarted server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psutil

HOST = "127.0.0.1"
DEBIAN_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class CannotStart(RuntimeError):
    """No RabbitMQ on this machine, or it did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _script() -> str:
    if DEBIAN_SCRIPT.exists():
        return str(DEBIAN_SCRIPT)
    found = shutil.which("rabbitmq-server")
    if found is None:
        raise CannotStart("rabbitmq-server is not installed")
    return found


class RabbitServer:
    """Start with ``start()``, stop with ``stop(signal)``; ``url`` for clients."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"amqp://guest:guest@{HOST}:{self.port}/%2F"
        self.node = f"arroyo-test-{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq.conf").write_text("")

    def _env(self) -> dict[str, str]:
        f = self.folder
        return dict(
            os.environ,
            HOME=str(f),  # the node's Erlang cookie lives here
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(_free_port()),
            RABBITMQ_MNESIA_BASE=str(f / "mnesia"),
            RABBITMQ_LOG_BASE=str(f / "log"),
            RABBITMQ_PID_FILE=str(f / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(f / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(f / "rabbitmq"),
        )

    def start(self, timeout: float = 60) -> None:
        log = (self.folder / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [_script()],
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() ends Erlang's helpers too
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                raise CannotStart(f"RabbitMQ on port {self.port} did not start:\n{tail}")
            time.sleep(0.2)

    def answers(self) -> bool:
        """The port speaks AMQP: it answers a protocol header with its own."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return len(s.recv(8)) > 0
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """SIGTERM: RabbitMQ shuts down in order (queues and messages written out);
        SIGKILL: a crash. Returns once every process of the node has exited."""
        if self.proc is None:
            return
        try:
            group = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        except psutil.NoSuchProcess:
            group = []
        for p in group:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(group, timeout=timeout)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        self.proc.wait(10)
        self.proc = None
