"""``arroyo keys TOPOLOGY``: a CURVE key pair per host of the topology.

Writes ``KEYS_DIR/HOST.key`` (the public key, to copy to every host) and
``KEYS_DIR/HOST.key_secret`` (public and secret key, mode 0600, needed only on HOST),
in ZeroMQ's certificate format; with ``[hosts]`` also ``supervisor.secret`` (0600), the
credentials every host's supervisord inet server shares. Existing keys are kept
unless ``force``: replacing a host's key locks its peers out until every host has the
new public key.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from arroyo.errors import ConfigError
from arroyo.runtime.net import key_hosts, key_paths
from arroyo.spec import Topology

HEADER = "#   ZeroMQ CURVE certificate written by `arroyo keys` for topology {name}, host {host}\n"


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def make_keys(topology: Topology, force: bool = False) -> list[tuple[str, Path, bool]]:
    """(host, secret key path, newly made) for every host."""
    if not zmq.has("curve"):
        msg = "this pyzmq/libzmq has no CURVE support (zmq.has('curve') is False)"
        raise ConfigError(msg)
    keys_dir = topology.keys_dir or topology.path.parent
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    done = []
    for host in key_hosts(topology):
        public_path, secret_path = key_paths(keys_dir, host)
        if secret_path.exists() and public_path.exists() and not force:
            done.append((host, secret_path, False))
            continue
        public, secret = zmq.curve_keypair()
        head = HEADER.format(name=topology.name, host=host)
        pub = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
        sec = f'{pub}    secret-key = "{secret.decode()}"\n'
        _write(secret_path, head + sec, 0o600)
        _write(public_path, head + pub, 0o644)
        done.append((host, secret_path, True))
    if topology.multihost:
        from arroyo.control.hostconf import SECRET_FILE, credentials

        made = not (keys_dir / SECRET_FILE).exists()
        credentials(topology)  # the inet servers' user and password, the same everywhere
        done.append(("supervisor", keys_dir / SECRET_FILE, made))
    return done
