"""Remote-peer liveness on tcp links (``runtime.liveness``): a binder sees a peer that
goes silent (SIGSTOP: not even libzmq's I/O thread answers heartbeats, as with a cut
link) or is killed lose its connection, and sees it come back."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import zmq

from arroyo.runtime.liveness import Reach
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

PEER = textwrap.dedent(
    """
    import sys, time, zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, b"reduce/1/4242@elsewhere")
    s.setsockopt(zmq.HEARTBEAT_IVL, 200)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 600)
    s.setsockopt(zmq.HEARTBEAT_TTL, 600)
    s.connect(sys.argv[1])
    s.send(b"\\x00H")
    print("up", flush=True)
    while True:
        if s.poll(100):
            s.recv_multipart()
    """
)
ID = "reduce/1/4242@elsewhere"


def router() -> tuple[zmq.Context[Any], zmq.Socket[Any], str]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    for opt, value in (
        (zmq.ROUTER_MANDATORY, 1),
        (zmq.ROUTER_HANDOVER, 1),
        (zmq.HEARTBEAT_IVL, 200),
        (zmq.HEARTBEAT_TIMEOUT, 600),
        (zmq.HEARTBEAT_TTL, 600),
    ):
        sock.setsockopt(opt, value)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return ctx, sock, f"tcp://127.0.0.1:{port}"


def drain(sock: zmq.Socket[Any]) -> None:
    while sock.poll(0):
        sock.recv_multipart()


@pytest.mark.parametrize("how", ["silent", "killed"])
def test_a_lost_remote_peer_is_dead_and_one_back_is_alive(how: str) -> None:
    ctx, sock, endpoint = router()
    peer = subprocess.Popen([sys.executable, "-c", PEER, endpoint], stdout=subprocess.PIPE)
    try:
        assert peer.stdout is not None and peer.stdout.readline() == b"up\n"
        reach = Reach(sock, router=True, peer_timeout=0.6)
        wait_for(lambda: (drain(sock), reach.alive(ID))[1], timeout=10)
        if how == "silent":
            peer.send_signal(signal.SIGSTOP)
        else:
            peer.kill()
        wait_for(lambda: not reach.alive(ID), timeout=15)
        assert reach.dead_for(ID) > 0
        wait_for(lambda: not reach.alive("reduce/2/1@never-connected"), timeout=10)
        if how == "silent":
            peer.send_signal(signal.SIGCONT)  # a healed link: the peer reconnects
            wait_for(lambda: (drain(sock), reach.alive(ID))[1], timeout=15)
    finally:
        peer.kill()
        peer.wait(10)
        sock.close(0)
        ctx.term()
