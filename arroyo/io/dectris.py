"""DECTRIS Stream V2 (codec ``dectris-stream2``): an EIGER2/PILATUS4 DCU's CBOR stream.

    [stage:detector]
    role = listener
    class = arroyo.io.zmq:ZMQListener
    endpoint = tcp://dcu-host:31001
    socket = pull
    codec = dectris-stream2
    channel = threshold_1          ; optional: one channel of a multi-threshold series

Each ZMQ message is one CBOR map (``arroyo.io.cbor``) whose ``type`` is ``start``,
``image`` or ``end``; a series becomes one run (``arroyo.io.series``). What arrives:

- ``Start.data``: every field of the start message but the arrays (energies,
  geometry, pixel sizes, detector description, ``count_time``, ``number_of_images``,
  ``channels``, ``user_data``...), and, with ``header_detail = all``, the arrays as
  numpy arrays at the top level, decoded: ``countrate_correction_lookup_table``, and
  per channel ``flatfield`` and ``pixel_mask`` (named so when one channel is chosen
  or the series has one, else ``flatfield_<channel>``, ``pixel_mask_<channel>``).
- ``Event.payload``: the chosen channel's image, or the only channel's, or a dict
  channel -> image in the start's ``channels`` order. A compressed image stays
  compressed (``arroyo.message.Encoded``) until user code reads ``event.payload``.
- ``Event.metadata``: ``image_id``, ``series_id``, ``series_unique_id``,
  ``start_time``, ``stop_time``, ``real_time`` (seconds, floats), ``series_date``,
  ``user_data``, ``channels`` (the names in the payload).
- ``Stop.data``: the end message's fields and ``arroyo.io.series``' counts.

Drops (counted by the listener's guard): the CBOR reader's reasons, the tracker's,
and ``frame_count`` (a message of several frames), ``bad_message`` (not a map with a
known ``type`` and the fields it needs), ``no_channel`` (the chosen channel is not in
the image).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arroyo.errors import ConfigError, WireError
from arroyo.io import cbor
from arroyo.io.series import SERIES_TIMEOUT, SeriesTracker
from arroyo.message import Encoded, Event, Message

#: Start fields that hold one array per channel (Map channel -> MultiDimArray).
PER_CHANNEL = ("flatfield", "pixel_mask")
#: Start fields that hold one array.
ARRAYS = ("countrate_correction_lookup_table",)
#: Image fields that are rationals of seconds.
TIMES = ("start_time", "stop_time", "real_time")


class StreamV2:
    """The decoder of one listener (stateful: the open series)."""

    name = "dectris-stream2"

    def __init__(self, channel: str = "", series_timeout: float = SERIES_TIMEOUT) -> None:
        self.channel = channel
        self.tracker = SeriesTracker(series_timeout)
        self.channels: list[str] = []

    def decode(self, frames: list[Any]) -> list[Message]:
        if len(frames) != 1:
            msg = f"a Stream V2 message is one frame, got {len(frames)}"
            raise WireError(msg, reason="frame_count")
        message = cbor.loads(frames[0])
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "image":
            return self.image(message)
        if kind == "start":
            return self.start(message)
        if kind == "end":
            fields = plain({k: v for k, v in message.items() if k != "type"})
            return self.tracker.end(series_key(message), fields)
        msg = f"a Stream V2 message of type {kind!r:.40} (start, image or end expected)"
        raise WireError(msg, reason="bad_message")

    def tick(self, now: float) -> list[Message]:
        return self.tracker.tick(now)

    def start(self, message: dict[str, Any]) -> list[Message]:
        channels = message.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            msg = "a start's channels is a list of names"
            raise WireError(msg, reason="bad_message")
        data: dict[str, Any] = {}
        for key, value in message.items():
            if key == "type":
                continue
            if key in PER_CHANNEL and isinstance(value, dict):
                data.update(self._per_channel(key, value))
            elif key in ARRAYS or isinstance(value, np.ndarray | Encoded):
                data[key] = eager(value)
            else:
                data[key] = plain(value)
        messages = self.tracker.start(series_key(message), count(message), data)
        self.channels = channels  # only once the start is accepted
        return messages

    def _per_channel(self, name: str, arrays: dict[Any, Any]) -> dict[str, np.ndarray]:
        one = self.channel if self.channel in arrays else None
        if one is None and len(arrays) == 1:
            one = next(iter(arrays))
        if one is not None:
            return {name: eager(arrays[one])}
        return {f"{name}_{channel}": eager(array) for channel, array in arrays.items()}

    def image(self, message: dict[str, Any]) -> list[Message]:
        data = message.get("data")
        image_id = message.get("image_id")
        if not isinstance(data, dict) or not isinstance(image_id, int) or not data:
            msg = "an image message needs image_id and a data map"
            raise WireError(msg, reason="bad_message")
        for channel, array in data.items():
            if not isinstance(array, np.ndarray | Encoded) or len(array.shape) != 2:
                msg = f"channel {channel!r:.40} holds {type(array).__name__}, not a 2-D array"
                raise WireError(msg, reason="bad_message")
        payload, names = self._payload(data)
        self.tracker.image(series_key(message), image_id)  # may drop it: counted last
        # (never plain() the data map: it would decode every frame into a list)
        metadata = {
            k: _time(k, v) if k in TIMES else plain(v)
            for k, v in message.items()
            if k != "type" and k != "data"
        }
        metadata["channels"] = names
        return [Event(metadata=metadata, payload=payload)]

    def _payload(self, data: dict[str, Any]) -> tuple[Any, list[str]]:
        if self.channel:
            if self.channel not in data:
                msg = f"channel {self.channel!r} is not in this image ({', '.join(map(str, data))})"
                raise WireError(msg, reason="no_channel")
            return data[self.channel], [self.channel]
        if len(data) == 1:
            ((name, array),) = data.items()
            return array, [str(name)]
        order = [c for c in self.channels if c in data] + [
            c for c in data if c not in self.channels
        ]
        return {str(c): data[c] for c in order}, [str(c) for c in order]


def series_key(message: dict[str, Any]) -> Any:
    """What identifies a series: its unique id where the message has one."""
    unique = message.get("series_unique_id")
    return unique if isinstance(unique, str) and unique else message.get("series_id")


def count(message: dict[str, Any]) -> int | None:
    n = message.get("number_of_images")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _time(key: str, value: Any) -> Any:
    """A Stream V2 time (a rational [num, den], or tag 30 read as a float) in seconds."""
    if isinstance(value, list):
        return cbor.rational(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    msg = f"{key} is not a rational: {value!r:.40}"
    raise WireError(msg, reason="bad_message")


def eager(value: Any) -> Any:
    """A start's array, decoded now (once per series; operators then read a plain
    array): an ``Encoded`` is decompressed, a view is copied out of the frame."""
    if isinstance(value, Encoded):
        return value.decode()
    if isinstance(value, np.ndarray):
        return np.array(value)  # its own buffer: the frame it views is reused
    return plain(value)


def plain(value: Any) -> Any:
    """A foreign value as metadata can hold it: byte strings as bytes (the views of
    the frame do not outlive it), nested arrays as lists, compressed ones decoded."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Encoded):
        value = value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def decodes_only(name: str) -> Any:
    def encode(message: Message) -> None:
        msg = f"codec {name} only receives: use it on a listener (ZMQListener)"
        raise ConfigError(msg)

    return encode
