"""Several test hosts on one machine, made of Linux network namespaces (tests only).

Layout (nothing is created in the caller's own network namespace):

    bridge namespace  arb-<sfx>:  br0  <- vh1<sfx>, vh2<sfx>, ...
    host namespace    arh1-<sfx>: lo, eth0 = 10.77.0.11/24  (peer of vh1<sfx>)
    host namespace    arh2-<sfx>: lo, eth0 = 10.77.0.12/24
    ...

No namespace has a default route, the resolver points at a closed port on the
namespace's own loopback, and /etc/hosts (bind-mounted in a private mount
namespace per command) lists only the test hosts: nothing can leave.

Use:

    with NetnsHosts(3) as hosts:
        p = hosts[0].popen(["python3", "-m", "http.server"])
        hosts[0].kill_all()          # SIGKILL every process in that namespace
        hosts.cut(1); hosts.heal(1)  # link down / up on the bridge side
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
FIRST = 11
MARK_DIR = Path("/run/arroyo-netns")


class CapabilityMissing(RuntimeError):
    """This machine cannot make namespace hosts; the text says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def probe() -> None:
    """Raise CapabilityMissing with a reason if namespace hosts cannot be made."""
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            raise CapabilityMissing(f"`{tool}` not found on PATH (iproute2 / util-linux)")
    if os.geteuid() != 0:
        raise CapabilityMissing("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    name = f"arprobe-{secrets.token_hex(3)}"
    try:
        r = _ip("netns", "add", name, check=False)
        if r.returncode:
            raise CapabilityMissing(f"`ip netns add` failed: {r.stderr.strip()}")
        r = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode:
            raise CapabilityMissing(f"no Linux bridge in a namespace: {r.stderr.strip()}")
        r = _ip("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb", check=False)
        if r.returncode:
            raise CapabilityMissing(f"no veth pairs: {r.stderr.strip()}")
        r = subprocess.run(
            ["ip", "netns", "exec", name, "unshare", "--mount", "--uts", "true"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if r.returncode:
            raise CapabilityMissing(f"`unshare --mount --uts` failed: {r.stderr.strip()}")
    finally:
        _ip("netns", "del", name, check=False)


def sweep_stale() -> None:
    """Delete namespaces left by runs whose creating process is gone."""
    if not MARK_DIR.is_dir():
        return
    for mark in MARK_DIR.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(mark.read_text())
            if _alive(pid):
                continue
            sfx = mark.stem
            for ns in _ip("netns", "list").stdout.split():
                if ns.endswith(f"-{sfx}"):
                    _kill_ns(ns)
                    _ip("netns", "del", ns, check=False)
            mark.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns(ns: str) -> None:
    """SIGKILL every process in namespace ns until none is left (bounded)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = _ip("netns", "pids", ns, check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@dataclass
class Host:
    name: str  # hostname inside, and the name in every /etc/hosts
    ns: str
    address: str
    bridge_port: str  # the veth end in the bridge namespace
    files: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # (this host's own folder, the shared path it stands for on this host): a disk of
    # its own for that path, as a separate machine has
    binds: list[tuple[Path, Path]] = field(default_factory=list)

    def own_folder(self, path: Path) -> Path:
        """From now on, what this host's commands see at ``path`` (a folder) is a folder
        of its own, which the caller reads at the returned path."""
        mine = self.files / f"own{len(self.binds)}"
        mine.mkdir()
        path.mkdir(parents=True, exist_ok=True)
        self.binds.append((mine, path))
        return mine

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The command line that runs cmd on this host."""
        own = "".join(
            f"mount --bind {shlex.quote(str(mine))} {shlex.quote(str(path))} && "
            for mine, path in self.binds
        )
        setup = (
            'mount --bind "$1/hosts" /etc/hosts && '
            'mount --bind "$1/resolv.conf" /etc/resolv.conf && '
            f'{own}hostname "$2" && shift 2 && exec "$@"'
        )
        return [
            "ip",
            "netns",
            "exec",
            self.ns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
            setup,
            "sh",
            str(self.files),
            self.name,
            *cmd,
        ]

    def run(self, cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(self.argv(cmd), **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        """SIGKILL every process in this host's namespace: a host lost at once."""
        _kill_ns(self.ns)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


class NetnsHosts:
    """``count`` hosts on one bridge; a context manager that removes everything it made
    (processes included) on exit, also after a failure."""

    def __init__(self, count: int, prefix: str = "h") -> None:
        self.count = count
        self.prefix = prefix
        self.sfx = secrets.token_hex(3)
        self.bridge_ns = f"arb-{self.sfx}"
        self.hosts: list[Host] = []
        self._dir: Path | None = None
        self._bridge_procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetnsHosts:
        probe()
        sweep_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def _make(self) -> None:
        MARK_DIR.mkdir(parents=True, exist_ok=True)
        (MARK_DIR / f"{self.sfx}.pid").write_text(str(os.getpid()))
        self._dir = Path(tempfile.mkdtemp(prefix=f"arns-{self.sfx}-"))
        _ip("netns", "add", self.bridge_ns)
        # No STP, no forwarding delay, no learning (ageing 0: it floods like a hub), a
        # fixed MAC: nothing about the bridge changes while hosts come and go.
        hub = ["stp_state", "0", "forward_delay", "0", "ageing_time", "0"]
        br = ["link", "add", "br0", "address", self._mac(0, 0), "type", "bridge", *hub]
        _ip("-n", self.bridge_ns, *br)
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        # A new namespace inherits br_netfilter's "bridged traffic through iptables and
        # conntrack": the test bridge forwards frames as a switch would, nothing more.
        for table in ("iptables", "ip6tables", "arptables"):
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.bridge_ns,
                    "sysctl",
                    "-qw",
                    f"net.bridge.bridge-nf-call-{table}=0",
                ],
                capture_output=True,
                timeout=20,
                check=False,
            )
        names = [f"{self.prefix}{i + 1}" for i in range(self.count)]
        addrs = [f"{SUBNET}.{FIRST + i}" for i in range(self.count)]
        hosts_text = "127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n" for a, n in zip(addrs, names, strict=True)
        )
        for i, (name, addr) in enumerate(zip(names, addrs, strict=True)):
            ns = f"arh{i + 1}-{self.sfx}"
            port = f"vh{i + 1}{self.sfx}"
            files = self._dir / name
            files.mkdir()
            (files / "hosts").write_text(hosts_text)
            (files / "resolv.conf").write_text(
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
            )
            _ip("netns", "add", ns)
            self.hosts.append(Host(name, ns, addr, port, files))
            pair = ["type", "veth", "peer", "name", "eth0", "address", self._mac(i + 1, 2)]
            _ip("-n", self.bridge_ns, "link", "add", port, "address", self._mac(i + 1, 1), *pair)
            _ip("-n", self.bridge_ns, "link", "set", "eth0", "netns", ns)
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _mac(self, host: int, end: int) -> str:
        """A locally administered MAC unique to this run, host and end."""
        sfx = bytes.fromhex(self.sfx)
        return ":".join(f"{b:02x}" for b in (0x02, sfx[0], sfx[1], sfx[2], host, end))

    def cut(self, i: int) -> None:
        """Cut host i off the bridge (its processes keep running)."""
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[i].bridge_port, "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[i].bridge_port, "up")

    def bridge_popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Run cmd in the bridge namespace (a sniffer on a host's bridge port)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.bridge_ns, *cmd], **kw)  # type: ignore[call-overload]
        self._bridge_procs.append(p)
        return p

    def close(self) -> None:
        for h in self.hosts:
            _kill_ns(h.ns)
            for p in h.procs:
                with contextlib.suppress(Exception):
                    p.kill()
                    p.wait(timeout=5)
        _kill_ns(self.bridge_ns)
        for p in self._bridge_procs:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=5)
        for h in self.hosts:
            _ip("netns", "del", h.ns, check=False)
        _ip("netns", "del", self.bridge_ns, check=False)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (MARK_DIR / f"{self.sfx}.pid").unlink()
