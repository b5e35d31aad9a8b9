"""A simulated DECTRIS DCU: ``arroyo simulate`` plays detector series on a ZMQ PUSH
socket in the detector's own format, so a pipeline can be tried without a detector.

    arroyo simulate --format dectris-stream2 --images 1000 --compression bslz4
    # and in the topology:  codec = dectris-stream2, socket = pull, bind = false,
    #                       endpoint = tcp://127.0.0.1:31001

Formats (``arroyo.io.simformats``): ``dectris-stream2`` (CBOR), ``dectris-stream1``
(legacy multipart JSON + binary) and ``htype`` (MAX IV streaming-receiver's secondary
stream). Frames (``arroyo.io.simframes``) follow from the settings and ``seed`` alone:
a test rebuilds them with ``Simulator.frame``. A handful of distinct frames is made and
compressed once, then cycled, so sending costs what the socket costs.

How it sends, like a DCU:

* it binds (a DCU is the server; clients connect), and a PUSH socket has nowhere to
  send until a PULL peer connects, so the first message waits for one (said once on
  stderr after a second);
* when the peer falls behind, ``hwm`` messages queue and then sending blocks; nothing
  is ever dropped except the image ids ``drop`` names (the test hook for a lossy
  stream); ``no_end`` omits every series' ``end`` message, ``repeat_series_id`` gives
  every series the same ``series_id`` (each still has its own ``series_unique_id``);
* at the end it closes with ``linger`` seconds for the queue to reach the peer. Use
  tcp (the default): over ipc, libzmq can drop a stream's tail when a sender with a
  bounded high-water mark closes right after sending (zeromq/libzmq#4660);
* SIGINT or SIGTERM stops it between two messages: an open series gets its ``end``
  (as a disarm sends one) if the peer takes it within a second, then the socket
  closes with linger and the process exits 0.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from arroyo.errors import ConfigError
from arroyo.io import simformats, simframes

DEFAULT_ENDPOINT = "tcp://127.0.0.1:31001"
DTYPES = ("uint8", "uint16", "uint32")
COMPRESSIONS = ("none", "lz4", "bslz4")
HEADER_DETAILS = ("all", "basic", "none")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True)
class Settings:
    """What to play; every value is checked here (a ``ConfigError`` names it)."""

    endpoint: str = DEFAULT_ENDPOINT
    format: str = "dectris-stream2"
    dtype: str = "uint16"
    shape: tuple[int, int] = (512, 512)
    compression: str = "bslz4"
    channels: int = 1
    images: int = 100
    series: int = 1
    rate: float = 0.0  # images per second; 0: as fast as the peer takes them
    drop: frozenset[int] = field(default_factory=frozenset)
    repeat_series_id: bool = False
    no_end: bool = False
    seed: int = 0
    header_detail: str = "basic"
    user_data: Any = None
    first_series_id: int = 1
    pixel_mask: bool = True  # pixel_mask_enabled: gap and hot pixels read NODATA
    hwm: int = 100
    linger: float = 30.0

    def __post_init__(self) -> None:
        _choice("format", self.format, tuple(simformats.FORMATS))
        _choice("dtype", self.dtype, DTYPES)
        _choice("compression", self.compression, COMPRESSIONS)
        _choice("header detail", self.header_detail, HEADER_DETAILS)
        if len(self.shape) != 2 or min(self.shape) < 1:
            msg = f"shape must be two sizes >= 1 (rows, columns), not {self.shape}"
            raise ConfigError(msg)
        for name in ("channels", "series"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, not {getattr(self, name)}"
                raise ConfigError(msg)
        for name in ("images", "hwm", "rate", "linger", "first_series_id"):
            if getattr(self, name) < 0:
                msg = f"{name} must be >= 0, not {getattr(self, name)}"
                raise ConfigError(msg)
        if self.format != "dectris-stream2" and self.channels != 1:
            msg = f"{self.format} carries one channel; several need dectris-stream2"
            raise ConfigError(msg)
        if self.compression not in simformats.CODECS[self.format]:
            msg = f"{self.format} does not carry {self.compression} frames"
            raise ConfigError(msg)
        if "://" not in self.endpoint:
            msg = f"endpoint must be like tcp://HOST:PORT, not {self.endpoint!r}"
            raise ConfigError(msg)

    @property
    def channel_names(self) -> list[str]:
        return [f"threshold_{k + 1}" for k in range(self.channels)]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        msg = f"{name} must be one of {', '.join(allowed)}, not {value!r}"
        raise ConfigError(msg)


def parse_shape(text: str) -> tuple[int, int]:
    """``"256,256"`` or ``"256x256"`` (rows, columns)."""
    try:
        sizes = tuple(int(p) for p in text.lower().replace("x", ",").split(",") if p.strip())
    except ValueError:
        sizes = ()
    if len(sizes) != 2:
        msg = f"shape must be ROWS,COLUMNS (e.g. 512,512), not {text!r}"
        raise ConfigError(msg)
    return sizes


def parse_ids(text: str) -> frozenset[int]:
    """``"3,7,10-12"`` -> {3, 7, 10, 11, 12}; empty -> none."""
    ids: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
        except ValueError:
            first, last = 0, -1
        if first < 0 or last < first:
            msg = f"drop must be image ids like 3,7,10-12, not {text!r}"
            raise ConfigError(msg)
        ids.update(range(first, last + 1))
    return frozenset(ids)


def parse_rate(text: str) -> float:
    """Images per second, or ``max`` (0): as fast as the peer takes them."""
    if text.strip().lower() == "max":
        return 0.0
    try:
        return float(text)
    except ValueError:
        msg = f"rate must be images per second or 'max', not {text!r}"
        raise ConfigError(msg) from None


def parse_user_data(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        msg = f"user data must be JSON ({e}): {text!r}"
        raise ConfigError(msg) from None


def unique_id() -> str:
    """A series_unique_id like the DCU's: 26 Crockford base32 characters (a ULID:
    48 bits of milliseconds, 80 random bits), new for every series."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


@dataclass
class SeriesReport:
    series_id: int
    unique_id: str
    images: int
    sent: int = 0
    ended: bool = False

    def line(self, dropped: list[int]) -> str:
        text = f"series {self.series_id} ({self.unique_id}): {self.sent}/{self.images} images sent"
        if dropped:
            text += f", {len(dropped)} dropped ({_ranges(dropped)})"
        return text + ("" if self.ended else ", no end message")


def _ranges(ids: list[int]) -> str:
    out: list[str] = []
    for i in sorted(ids):
        if out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


class Simulator:
    """Plays ``settings`` on a PUSH socket (``run``); ``messages`` yields the same
    messages without a socket."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.dtype = np.dtype(settings.dtype).newbyteorder("<")
        self.pool = simframes.synthesize(
            settings.shape, self.dtype, settings.channels, settings.seed, settings.pixel_mask
        )
        self.encoder = simformats.FORMATS[settings.format]()
        codec = self.encoder.codecs[settings.compression]
        self.blobs = [[self._blob(codec, a) for a in frame] for frame in self.pool]
        self.reports: list[SeriesReport] = []

    def frame(self, image_id: int) -> list[np.ndarray]:
        """The arrays (one per channel) image ``image_id`` of every series carries."""
        return self.pool[image_id % len(self.pool)]

    def _blob(self, codec: str, array: np.ndarray) -> simformats.Blob:
        from arroyo.compression import compress

        data = compress(codec, array)
        return simformats.Blob(codec, array.dtype, array.shape, data)

    def _series(self, index: int) -> simformats.Series:
        s = self.settings
        sid = s.first_series_id + (0 if s.repeat_series_id else index)
        return simformats.Series(
            series_id=sid,
            unique_id=unique_id(),
            images=s.images,
            dtype=self.dtype,
            shape=s.shape,
            channels=s.channel_names,
            frame_time=1.0 / s.rate if s.rate > 0 else 0.001,
            header_detail=s.header_detail,
            user_data=s.user_data,
            seed=s.seed,
            pixel_mask=s.pixel_mask,
        )

    def messages(self) -> Iterator[tuple[str, list[bytes]]]:
        """(kind, frames) of every message, in order: ``start``, ``image``, ``end``."""
        for index in range(self.settings.series):
            series = self._series(index)
            report = SeriesReport(series.series_id, series.unique_id, series.images)
            self.reports.append(report)
            yield "start", self.encoder.start(series)
            for image_id in range(series.images):
                if image_id in self.settings.drop:
                    if isinstance(self.encoder, simformats.Htype):
                        self.encoder.skip()
                    continue
                yield (
                    "image",
                    self.encoder.image(series, image_id, self.blobs[image_id % len(self.blobs)]),
                )
                report.sent += 1
            if not self.settings.no_end:
                yield "end", self.encoder.end(series)

    def run(self) -> list[SeriesReport]:
        """Bind, send every message (see the module docstring), close; returns what
        was sent per series (also printed, one line per series, on stdout)."""
        import zmq

        s = self.settings
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.sndhwm = s.hwm
        try:
            sock.bind(s.endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            ctx.term()
            msg = f"cannot bind {s.endpoint}: {e}"
            raise ConfigError(msg) from None
        try:
            self._play(sock)
        finally:
            sock.close(linger=int(s.linger * 1000))
            ctx.term()  # returns once the queue reached the peer, or after linger
        return self.reports

    def _play(self, sock: Any) -> None:
        period = 1.0 / self.settings.rate if self.settings.rate > 0 else 0.0
        next_at = time.monotonic()
        printed = 0
        for kind, frames in self.messages():
            if kind == "image" and period:
                next_at += period
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    break
            if not self._send(sock, frames, patience=None):
                break
            if kind == "end":
                self.reports[-1].ended = True
                self._print(printed)
                printed += 1
        if self.stop.is_set():
            self._disarm(sock)
        for n in range(printed, len(self.reports)):
            self._print(n)

    def _print(self, index: int) -> None:
        report = self.reports[index]
        dropped = [i for i in sorted(self.settings.drop) if i < report.images]
        print(report.line(dropped), flush=True)

    def _disarm(self, sock: Any) -> None:
        """Stopped mid-series: its end message, if the peer takes it within a second."""
        report = self.reports[-1] if self.reports else None
        if report is None or report.ended or self.settings.no_end:
            return
        series = simformats.Series(
            report.series_id,
            report.unique_id,
            report.images,
            self.dtype,
            self.settings.shape,
            self.settings.channel_names,
            0.001,
            self.settings.header_detail,
            None,
            self.settings.seed,
        )
        report.ended = self._send(sock, self.encoder.end(series), patience=1.0)

    def _send(self, sock: Any, frames: list[bytes], patience: float | None) -> bool:
        """Send one message, waiting for room (or a peer); False when stopped first
        (``patience`` None: until stopped) or after ``patience`` seconds."""
        import zmq

        waited_since = time.monotonic()
        said = False
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            waited = time.monotonic() - waited_since
            if patience is None and self.stop.is_set():
                return False
            if patience is not None and waited > patience:
                return False
            if not said and waited > 1.0 and not self.reports[-1].sent:
                print(f"waiting for a peer to connect to {self.settings.endpoint}", file=sys.stderr)
                said = True
            sock.poll(100, zmq.POLLOUT)


def _int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        msg = f"{name} must be a whole number, not {text!r}"
        raise ConfigError(msg) from None


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        msg = f"{name} must be a number, not {text!r}"
        raise ConfigError(msg) from None


def settings_from(options: dict[str, Any]) -> Settings:
    """Settings from the command line's strings (``arroyo simulate``)."""
    o = options
    return Settings(
        endpoint=o["endpoint"],
        format=o["format"],
        dtype=o["dtype"],
        shape=parse_shape(o["shape"]),
        compression=o["compression"],
        channels=_int("channels", o["channels"]),
        images=_int("images", o["images"]),
        series=_int("series", o["series"]),
        rate=parse_rate(o["rate"]),
        drop=parse_ids(o["drop"]),
        repeat_series_id=bool(o["repeat_series_id"]),
        no_end=bool(o["no_end"]),
        seed=_int("seed", o["seed"]),
        header_detail=o["header_detail"],
        user_data=parse_user_data(o["user_data"]),
        first_series_id=_int("series id", o["series_id"]),
        pixel_mask=not o["no_pixel_mask"],
        hwm=_int("hwm", o["hwm"]),
        linger=_float("linger", o["linger"]),
    )


def run_simulator(options: dict[str, Any]) -> int:
    """``arroyo simulate``: build, play until done or SIGINT/SIGTERM; exit code."""
    import signal

    from arroyo.compression import MissingExtra

    settings = settings_from(options)
    stop = threading.Event()
    try:
        simulator = Simulator(settings, stop)
    except MissingExtra as e:
        raise ConfigError(str(e)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    simulator.run()
    return 0
