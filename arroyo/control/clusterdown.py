"""Stop a multi-host topology: ``arroyo down`` and ``arroyo down --hosts``.

Supvisors stops each chain in its stop sequence (sources first), but its answer is
only as good as its view of the cluster. A host that rejoins during the stop (a
partition healing) brings back the copy of a worker that was cut off with it:
Supvisors then answers STILL_RUNNING, or reports the chain stopped while that copy
runs on. So ``down`` asks Supvisors first, then asks every host's own supervisord
what still runs there; if anything does, it stops what it finds, round after round,
until the cluster has settled: two rounds ``SETTLE`` apart find nothing running on
any host. It gives up after ``ROUNDS_TIMEOUT``, or ``HOST_GRACE`` after only silent
hosts are left, and then names what still runs and which hosts did not answer (what
runs there is unknown from here). A host where nothing listens on the supervisor port
(connection refused) runs no supervisord, so nothing under one: it is not waited for.

``down --hosts`` then ends every host's supervisord (supervisord stops what it still
runs before it exits) and waits until none answers any more, and until the one of
this machine's host has exited.
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from arroyo.control.cluster import chains_of, is_fault, proxy, wait_operational
from arroyo.control.hostconf import host_paths
from arroyo.control.render import split_process_name
from arroyo.errors import ConfigError
from arroyo.runtime.net import machine_host
from arroyo.spec import Topology

Say = Callable[[str], None]
SUPVISORS_WAIT = 60.0  # s for Supvisors to be in OPERATION (or CONCILIATION) to stop
ROUNDS_TIMEOUT = 60.0  # s of rounds stopping what still runs, after Supvisors' stop
HOST_GRACE = 15.0  # s: about three Supvisors ticks, in which a healed host is seen again
HOST_STOP_TIMEOUT = 60.0  # s: a supervisord stopping its processes, then exiting
ROUND = 1.0  # s between two rounds of asking every host
SETTLE = 5.0  # s: one Supvisors tick, for the cluster to show a change
ASK_TIMEOUT = 5.0  # s: one host's supervisord answering what it runs
ACTIVE = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}


@dataclass
class Survey:
    """What every host's supervisord says runs of the chains stopped."""

    running: list[tuple[str, str]] = field(default_factory=list)  # (host, chain:program)
    silent: dict[str, str] = field(default_factory=dict)  # host -> why it did not answer
    absent: list[str] = field(default_factory=list)  # hosts with no supervisord listening

    @property
    def clean(self) -> bool:
        return not self.running and not self.silent

    def describe(self) -> str:
        """One line: what still runs where, and which hosts did not answer."""
        parts = []
        if self.running:
            parts.append("still running: " + ", ".join(f"{n} on {h}" for h, n in self.running))
        parts += [
            f"no answer from host {host} ({why}): what runs there is unknown"
            for host, why in self.silent.items()
        ]
        return "; ".join(parts)


def down(topology: Topology, chains: tuple[str, ...] = (), say: Say | None = None) -> Survey:
    """Stop ``chains`` (default all) on every host, sources first. Returns the last
    survey of the hosts: ``clean`` when nothing of those chains runs anywhere."""
    names = chains_of(topology, chains)
    survey = _survey(topology, names)
    if survey.clean:
        return survey  # nothing to stop (and no need to wait for an election)
    if len(survey.silent) + len(survey.absent) < len(topology.hosts):
        _ask_supvisors(topology, names, say)  # (some host answered)
        survey = _survey(topology, names)
        if survey.clean:
            return survey  # Supvisors' view was right
    return _rounds(topology, names, time.monotonic() + ROUNDS_TIMEOUT, say)


def _rounds(topology: Topology, names: list[str], deadline: float, say: Say | None) -> Survey:
    """Stop what the hosts still run, round after round, until two surveys ``SETTLE``
    apart find nothing (a host that rejoins meanwhile, or a copy that a host's own
    Supvisors started while cut off, shows in the second), or until the deadline, or
    ``HOST_GRACE`` after only silent hosts are left."""
    clean_since = only_silent_since = 0.0
    while True:
        survey = _survey(topology, names)
        now = time.monotonic()
        if survey.clean:
            if clean_since and now - clean_since >= SETTLE:
                return survey
            clean_since = clean_since or now
        else:
            clean_since = 0.0
            if survey.running:
                only_silent_since = 0.0
            elif not only_silent_since:
                only_silent_since = now
                _tell(say, f"waiting for {', '.join(survey.silent)} to answer")
            if now > deadline or (only_silent_since and now - only_silent_since > HOST_GRACE):
                return survey
            _stop_directly(topology, survey.running, say)
        time.sleep(ROUND)


def _ask_supvisors(topology: Topology, names: list[str], say: Say | None) -> None:
    """Supvisors' own stop of each chain, in its stop sequence; what it cannot stop
    (the cluster reshaping under it, no host in OPERATION) is left to the rounds."""
    try:
        server = wait_operational(topology, SUPVISORS_WAIT, say, ("OPERATION", "CONCILIATION"))
    except ConfigError as e:
        _tell(say, f"Supvisors cannot stop the chains ({e}); asking each host")
        return
    for chain in reversed(names):
        try:
            server.supvisors.stop_application(chain, True)
        except xmlrpc.client.Fault as e:
            if not is_fault(e, "NOT_RUNNING"):
                _tell(say, f"chain {chain}: Supvisors says {e.faultString}; asking each host")
        except (OSError, xmlrpc.client.Error) as e:
            _tell(say, f"chain {chain}: Supvisors did not answer ({e}); asking each host")


def _survey(topology: Topology, names: list[str]) -> Survey:
    survey = Survey()
    for host in topology.hosts:
        try:
            infos = proxy(topology, host, ASK_TIMEOUT).supervisor.getAllProcessInfo()
        except ConnectionRefusedError:
            survey.absent.append(host)
            continue
        except (OSError, xmlrpc.client.Error) as e:
            survey.silent[host] = str(e) or type(e).__name__
            continue
        survey.running += [
            (host, f"{i['group']}:{i['name']}")
            for i in infos
            if i["group"] in names and i["statename"] in ACTIVE
        ]
    return survey


def _stop_directly(topology: Topology, running: list[tuple[str, str]], say: Say | None) -> None:
    """Ask each process's own supervisord to stop it (copies Supvisors does not know
    of, or could not stop), sources first: only those of the greatest priority still
    running, so that the next rank is stopped in a later round, once these are gone."""

    def priority(item: tuple[str, str]) -> int:
        stage, _ = split_process_name(item[1].partition(":")[2])
        spec = topology.stages.get(stage)
        return spec.supervision.priority if spec is not None else 0

    first = max((priority(item) for item in running), default=0)
    for host, name in running:
        if priority((host, name)) != first:
            continue
        try:
            proxy(topology, host, ASK_TIMEOUT).supervisor.stopProcess(name, False)
            _tell(say, f"stopping {name} on {host}")
        except xmlrpc.client.Fault:
            pass  # stopping already
        except (OSError, xmlrpc.client.Error) as e:
            _tell(say, f"{name} on {host}: its supervisord did not answer ({e})")


def shutdown_hosts(topology: Topology, say: Say | None = None) -> list[str]:
    """End every host's supervisord; each stops what it still runs first. Returns one
    line per host whose supervisord may still run (empty: none runs)."""
    here = machine_host(topology)
    asked: dict[str, int | None] = {}  # host -> pid of its supervisord, on this machine
    problems = []
    for host in topology.hosts:
        pid = _pid(host_paths(topology, host).pidfile) if host == here else None
        try:
            proxy(topology, host, ASK_TIMEOUT).supervisor.shutdown()
        except ConnectionRefusedError:
            continue  # none runs there
        except xmlrpc.client.Fault as e:
            if not is_fault(e, "SHUTDOWN_STATE"):
                problems.append(f"host {host}: supervisord refused to shut down ({e.faultString})")
                continue
        except (OSError, xmlrpc.client.Error) as e:
            problems.append(f"host {host}: supervisord did not answer ({e}); it may still run")
            continue
        asked[host] = pid
    deadline = time.monotonic() + HOST_STOP_TIMEOUT
    for host, pid in asked.items():
        while not _gone(topology, host, pid):
            if time.monotonic() > deadline:
                wait = f"{HOST_STOP_TIMEOUT:.0f}s"
                problems.append(f"host {host}: supervisord still runs {wait} after shutdown")
                break
            time.sleep(0.2)
        else:
            _tell(say, f"host {host}: supervisord ended")
    return problems


def _gone(topology: Topology, host: str, pid: int | None) -> bool:
    """Nothing listens any more on the host's inet port and, when its pid is known
    (this machine's own host), the process has exited. (Supvisors closes the inet
    server as soon as its supervisord starts stopping, before that stops its processes
    and exits; another machine's process cannot be watched from here.)"""
    try:
        proxy(topology, host, ASK_TIMEOUT).supervisor.getPID()
    except ConnectionRefusedError:
        return pid is None or not _runs(pid)
    except (OSError, xmlrpc.client.Error):
        return False
    return False


def _pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return None


def _runs(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tell(say: Say | None, line: str) -> None:
    if say is not None:
        say(line)
