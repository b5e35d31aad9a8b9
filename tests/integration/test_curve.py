"""``security = curve``: real stage processes over tcp on loopback; the binder admits
only the topology's keys, and refuses (and counts) a stranger, a plain client and a
client with the wrong server key."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import zmq
import zmq.auth

from arroyo.runtime.net import key_paths, read_key_file
from arroyo.topology import load
from tests.conftest import arroyo_bin, read_jsonl, runs_of, wait_for

pytestmark = pytest.mark.timeout(90)

TOPO = """
[topology]
name = cv
run_dir = run
security = curve

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 300
shape = 8, 8
runs = 2

[stage:sink]
role = publisher
class = stages.sinks:JsonLinesLog
path = {tmp}/out.jsonl
input = det (push tcp://127.0.0.1:PORT)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_keys(path: Path) -> None:
    subprocess.run([arroyo_bin("arroyo"), "keys", str(path)], check=True, timeout=30)


def stats(path: Path) -> dict:
    f = load(path).run_dir / "stats" / "sink.0.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def refused(path: Path) -> int:
    return sum(link.get("auth_refused", 0) for link in stats(path).get("links", []))


def test_curve_link_carries_runs_and_refuses_strangers(topo, stages, tmp_path) -> None:
    port = free_port()
    path = topo(TOPO.replace("PORT", str(port)))
    make_keys(path)
    topology = load(path)
    assert all(link.curve for link in topology.links)
    secret = key_paths(topology.keys_dir, "local")[1]
    assert secret.stat().st_mode & 0o777 == 0o600

    stages.start(path, "sink")
    stages.start(path, "det")
    out = tmp_path / "out.jsonl"
    wait_for(lambda: len(runs_of(read_jsonl(out))) == 2, timeout=40)
    assert [n for _, n, _ in runs_of(read_jsonl(out))] == [300, 300]

    server_public, _ = read_key_file(key_paths(topology.keys_dir, "local")[0])
    ctx = zmq.Context()
    try:
        socks = []
        for kind in ("stranger", "plain", "wrong-server-key"):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            if kind != "plain":
                public, secret_key = zmq.curve_keypair()
                s.curve_publickey, s.curve_secretkey = public, secret_key
                s.curve_serverkey = server_public if kind == "stranger" else zmq.curve_keypair()[0]
            s.connect(f"tcp://127.0.0.1:{port}")
            s.send(b"\x00H")  # queued until a handshake succeeds, which it never does
            socks.append(s)
        wait_for(lambda: refused(path) >= 3, timeout=20)
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    codes = stages.stop_all(["det.0", "sink.0"])
    assert codes == {"det.0": 0, "sink.0": 0}, stages.dump()
    log = stages.log("sink.0")
    assert "its CURVE key" in log and "not one of the topology's" in log, log
    # (a plain client shows as a mechanism mismatch, or as a handshake broken off)
    assert "a plain client" in log or "broke off" in log, log
    # nothing a stranger sent got through: still exactly the two runs
    assert [n for _, n, _ in runs_of(read_jsonl(out))] == [300, 300]


def test_curve_without_keys_is_a_configuration_error(topo, tmp_path) -> None:
    path = topo(TOPO.replace("PORT", str(free_port())))
    r = subprocess.run(
        [arroyo_bin("arroyo-stage"), str(path), "sink"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "arroyo keys" in r.stderr and "Traceback" not in r.stderr


def test_a_foreign_zmq_end_takes_curve_keys_and_admits_only_its_clients(tmp_path) -> None:
    from arroyo.io.zmq import ZMQPublisher
    from arroyo.message import Event

    zmq.auth.create_certificates(tmp_path, "server")
    clients = tmp_path / "clients"
    clients.mkdir()
    _, secret_file = zmq.auth.create_certificates(clients, "viewer")
    Path(secret_file).rename(tmp_path / "viewer.key_secret")
    port = free_port()
    pub = ZMQPublisher(
        f"tcp://127.0.0.1:{port}",
        codec="json",
        curve_keys=tmp_path / "server.key_secret",
        curve_clients=clients,
    )
    pub.setup()
    server_public, _ = zmq.auth.load_certificate(tmp_path / "server.key")
    ctx = zmq.Context()
    socks = []
    try:
        for name in ("viewer", "stranger"):
            s = ctx.socket(zmq.PULL)
            s.linger = 0
            if name == "viewer":
                public, secret_key = zmq.auth.load_certificate(tmp_path / "viewer.key_secret")
            else:
                public, secret_key = zmq.curve_keypair()
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = (
                public,
                secret_key,
                server_public,
            )
            s.connect(f"tcp://127.0.0.1:{port}")
            socks.append(s)
        for i in range(20):
            pub.publish(Event(metadata={"i": i}))
        viewer, stranger = socks
        assert viewer.poll(10_000), "the admitted client got nothing"
        assert not stranger.poll(1000), "a stranger's key was admitted"
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        pub.close()
    with pytest.raises(ValueError, match="curve_clients"):
        ZMQPublisher("tcp://127.0.0.1:1", curve_keys=tmp_path / "server.key_secret")
