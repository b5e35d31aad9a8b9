"""ZMQ ends for the outside world: a detector's own stream in, a viewer's socket out.

    [stage:detector]
    role = listener
    class = arroyo.io.zmq:ZMQListener
    endpoint = tcp://detector-host:9999
    socket = pull
    codec = array                  ; raw pixels, described here:
    dtype = uint16
    shape = 512, 512

Unlike the links between Arroyo stages, these speak whatever the foreign peer speaks
(see ``arroyo.io.codecs``). A DECTRIS or htype detector stream (``codec =
dectris-stream2``, ``dectris-stream1``, ``htype``: docs/detectors.md) also takes
``channel`` (the Stream V2 channel to keep) and ``series_timeout`` (seconds without a
message before an unfinished series is closed; 0 never). A message the codec cannot
decode, for whatever reason, is counted and dropped (``arroyo.io.guard``): the
listener never exits over its input.

Both ends can use CURVE: ``curve_keys`` is a ZeroMQ certificate file with this end's
key pair (e.g. ``arroyo keys``' ``HOST.key_secret``); a connecting end also needs
``curve_server`` (the peer's public key, Z85 text or its certificate file); a binding
end also needs ``curve_clients``, a folder of the public keys (``*.key``) it admits:
CURVE alone admits any client key, so a ZAP authenticator checks them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import zmq as pyzmq
import zmq.auth

from arroyo.convert import Binds, Bounds
from arroyo.io.codecs import CodecName, get_codec
from arroyo.io.guard import DecodeGuard
from arroyo.message import Message
from arroyo.stage import Listener, Publisher

log = logging.getLogger("arroyo.zmq")

_LISTEN = {"pull": pyzmq.PULL, "sub": pyzmq.SUB}
_PUBLISH = {"push": pyzmq.PUSH, "pub": pyzmq.PUB}


class Curve:
    """CURVE settings of one foreign end (see the module docstring)."""

    def __init__(self, keys: Path | None, server: str, clients: Path | None, bind: bool) -> None:
        self.keys, self.server, self.clients, self.bind = keys, server, clients, bind
        self.auth: Any = None
        if keys is None and (server or clients):
            msg = "curve_server/curve_clients need curve_keys (this end's key pair)"
            raise ValueError(msg)
        if keys is not None and bind and clients is None:
            msg = "a binding CURVE end needs curve_clients: CURVE alone admits any client"
            raise ValueError(msg)
        if keys is not None and not bind and not server:
            msg = "a connecting CURVE end needs curve_server (the peer's public key)"
            raise ValueError(msg)

    def apply(self, sock: pyzmq.Socket[Any]) -> None:
        if self.keys is None:
            return
        public, secret = zmq.auth.load_certificate(self.keys)
        if secret is None:
            msg = f"{self.keys}: no secret key in it"
            raise OSError(msg)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        if self.bind:
            from zmq.auth.thread import ThreadAuthenticator  # (pulls in asyncio)

            self.auth = ThreadAuthenticator(sock.context)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(self.clients))
            sock.curve_server = True
        else:
            key = self.server.encode()
            if len(key) != 40:
                key = zmq.auth.load_certificate(self.server)[0]
            sock.curve_serverkey = key

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None


def _open(
    kind: int, endpoint: str, bind: bool, hwm: int, curve: Curve | None = None
) -> pyzmq.Socket[Any]:
    sock: pyzmq.Socket[Any] = pyzmq.Context.instance().socket(kind)
    sock.set_hwm(hwm)
    try:
        if curve is not None:
            curve.apply(sock)
        sock.bind(endpoint) if bind else sock.connect(endpoint)
    except (pyzmq.ZMQError, OSError, ValueError) as e:
        sock.close(0)
        if curve is not None:
            curve.close()
        msg = f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}"
        raise OSError(msg) from e
    return sock


class ZMQListener(Listener):
    """Receives a foreign ZMQ stream (PULL or SUB) and hands each message on."""

    def __init__(
        self,
        endpoint: Annotated[str, Binds("bind")],
        socket: Literal["pull", "sub"] = "pull",
        bind: bool = False,
        codec: Annotated[str, CodecName()] = "arroyo",
        topic: str = "",
        hwm: Annotated[int, Bounds(ge=0)] = 1000,
        dtype: str = "",
        shape: Annotated[tuple[int, ...], Bounds(ge=0)] = (),
        curve_keys: Path | None = None,
        curve_server: str = "",
        curve_clients: Path | None = None,
        channel: str = "",
        series_timeout: Annotated[float, Bounds(ge=0)] = 300,
    ) -> None:
        self.endpoint = endpoint
        self.kind = _LISTEN[socket]
        self.bind = bind
        self.codec = get_codec(codec, dtype, shape, channel=channel, series_timeout=series_timeout)
        self.topic = topic
        self.hwm = hwm
        self.curve = Curve(curve_keys, curve_server, curve_clients, bind)
        self.sock: pyzmq.Socket[Any] | None = None
        self.guard = DecodeGuard(f"zmq listener {endpoint} ({codec} codec)")

    def setup(self) -> None:
        self.sock = _open(self.kind, self.endpoint, self.bind, self.hwm, self.curve)
        if self.kind == pyzmq.SUB:
            self.sock.setsockopt(pyzmq.SUBSCRIBE, self.topic.encode())

    def start(self) -> None:
        assert self.sock is not None, "setup() opens the socket"
        while not self.stopping:
            if self.codec.tick is not None:  # a detector series that never ended
                for message in self.guard.decode(self.codec.tick, time.monotonic()):
                    self.deliver(message)
            if not self.sock.poll(100):
                continue
            while not self.stopping:  # drain until EAGAIN, then poll again
                try:
                    frames = self.sock.recv_multipart(flags=pyzmq.NOBLOCK, copy=False)
                except pyzmq.Again:
                    break
                if self.kind == pyzmq.SUB and self.topic and len(frames) > 1:
                    frames = frames[1:]  # a topic frame precedes the payload
                self._deliver_frames(frames)

    def _deliver_frames(self, frames: list[Any]) -> None:
        for message in self.guard.decode(self.codec.decode, frames):
            self.deliver(message)

    def drops(self) -> dict[str, int]:
        """Messages received but not delivered, by reason: the codec's own
        (``frame_size``, ``frame_count``, ``bad_header``; the detector codecs' also
        ``bad_message``, ``bad_cbor``, ``truncated``, ``size``, ``unknown_encoding``,
        ``unknown_type``, ``no_channel``, and their series': ``no_series``,
        ``other_series``, ``duplicate_image``, ``duplicate_start``, ``out_of_range``:
        docs/detectors.md), or the guard's (``undecodable``, ``too_deep``,
        ``unencodable``: ``arroyo.io.guard``)."""
        return self.guard.drops()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        self.curve.close()


class ZMQPublisher(Publisher):
    """Sends every message to a foreign ZMQ peer (PUSH blocks when full, PUB drops)."""

    def __init__(
        self,
        endpoint: Annotated[str, Binds("bind")],
        socket: Literal["push", "pub"] = "push",
        bind: bool = True,
        codec: Annotated[str, CodecName()] = "arroyo",
        topic: str = "",
        hwm: Annotated[int, Bounds(ge=0)] = 1000,
        curve_keys: Path | None = None,
        curve_server: str = "",
        curve_clients: Path | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.kind = _PUBLISH[socket]
        self.bind = bind
        self.codec = get_codec(codec)
        self.topic = topic.encode()
        self.hwm = hwm
        self.curve = Curve(curve_keys, curve_server, curve_clients, bind)
        self.sock: pyzmq.Socket[Any] | None = None

    def setup(self) -> None:
        self.sock = _open(self.kind, self.endpoint, self.bind, self.hwm, self.curve)
        self.sock.linger = 5000

    def publish(self, message: Message) -> None:
        if self.sock is None:
            self.setup()
        assert self.sock is not None
        frames = self.codec.encode(message)
        if frames is None:
            return
        if self.topic:
            frames = [self.topic, *frames]
        self.sock.send_multipart(frames, copy=False)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # linger flushes what is queued
            self.sock = None
        self.curve.close()
