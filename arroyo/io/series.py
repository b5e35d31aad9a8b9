"""One detector series is one Arroyo run: what the detector formats share.

A DECTRIS stream (V2 or V1) or a MAX IV secondary stream sends a start (header)
message, the series' images, and an end message. ``SeriesTracker`` turns them into a
run's ``Start``, ``Event``\\ s and ``Stop``, and counts what the detector stream lost
on the way (a PUSH socket drops nothing, but a DCU restarted, a listener started late
or a network hiccup does), so that every stage downstream reports the run
INCOMPLETE with the exact number of images missing, attributed to the detector
stream (``arroyo.message.LOST``) and not to a stage.

Contract:

- A series is identified by its ``key``: ``series_unique_id`` where the format has
  one (two series with the same ``series_id`` and different unique ids are two
  runs), else the series number, else ``None`` (the stream has one series at a time).
- ``start(key, number_of_images, data)`` opens a series and returns ``[Start]``; if
  another series is open (its end never came), that one is closed first, incomplete:
  ``[Stop, Start]``. A start of the series already open is dropped
  (``duplicate_start``).
- ``image(key, image_id)`` admits one image or raises ``WireError``: ``no_series``
  (no series open: we missed its start), ``other_series`` (an image of another
  series than the open one), ``duplicate_image`` (an image id already received),
  ``out_of_range`` (an id not below ``number_of_images``, or negative). Image ids
  count from 0, as DECTRIS numbers them.
- ``end(key, data)`` closes the open series: ``[Stop]``; ``no_series`` /
  ``other_series`` as above.
- ``tick(now)`` closes the open series, incomplete, once ``timeout`` seconds passed
  without any message of it (``now`` on the ``clock``'s scale; 0 never times out):
  ``[Stop]`` or ``[]``.
- Missing images: ``number_of_images`` minus the distinct images received (gaps in
  the ids and a short series alike); when the start did not say how many, the
  highest id + 1 minus those received (gaps only).
- A ``Stop`` carries ``data`` = the end message's fields plus ``images_received``,
  ``missing_images``, ``incomplete``, ``closed_by`` (``end``, ``next start`` or
  ``timeout``), and ``routing[LOST] = {LOST_REASON: missing}`` when missing > 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from arroyo.errors import WireError
from arroyo.message import LOST, Message, Start, Stop

#: The reason a run's losses are reported under (interface 3, ``arroyo.message.LOST``).
LOST_REASON = "images the detector stream lost"
#: Default seconds without a message of the open series before it is closed.
SERIES_TIMEOUT = 300.0
#: Highest image id + 1 accepted when the start did not give the number of images
#: (the bitmap of received ids then takes at most 16 MiB).
MAX_IMAGES = 1 << 27


class _Seen:
    """Which image ids of a series arrived: one bit each, grown as ids come."""

    def __init__(self, limit: int) -> None:
        self.bits = bytearray()
        self.limit = limit
        self.count = 0
        self.highest = -1

    def add(self, image_id: int) -> None:
        if not 0 <= image_id < self.limit:
            msg = f"image id {image_id} is outside the series' 0..{self.limit - 1}"
            raise WireError(msg, reason="out_of_range")
        byte, bit = divmod(image_id, 8)
        if byte >= len(self.bits):
            grown = max(byte + 1, 2 * len(self.bits), 1024)
            self.bits.extend(bytes(min(grown, (self.limit + 7) // 8) - len(self.bits)))
        if self.bits[byte] >> bit & 1:
            msg = f"image {image_id} arrived twice"
            raise WireError(msg, reason="duplicate_image")
        self.bits[byte] |= 1 << bit
        self.count += 1
        self.highest = max(self.highest, image_id)


class _Series:
    def __init__(self, key: Any, number_of_images: int | None, now: float) -> None:
        self.key = key
        self.number_of_images = number_of_images
        self.seen = _Seen(number_of_images if number_of_images is not None else MAX_IMAGES)
        self.last = now

    def missing(self) -> int:
        expected = self.number_of_images
        if expected is None:
            expected = self.seen.highest + 1
        return max(0, expected - self.seen.count)


class SeriesTracker:
    """Start/images/end of a detector's series as runs, with their losses counted
    (see the module docstring). Not thread-safe: one per listener."""

    def __init__(
        self, timeout: float = SERIES_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.open: _Series | None = None

    def start(self, key: Any, number_of_images: int | None, data: dict[str, Any]) -> list[Message]:
        if self.open is not None and self.open.key == key:
            msg = f"a second start of series {key!r:.60}"
            raise WireError(msg, reason="duplicate_start")
        if number_of_images is not None and number_of_images < 0:
            number_of_images = None
        out = self._close({}, "next start") if self.open is not None else []
        self.open = _Series(key, number_of_images, self.clock())
        out.append(Start(data=data))
        return out

    def image(self, key: Any, image_id: int) -> None:
        """Count image ``image_id`` of series ``key``, or raise (module docstring)."""
        series = self._current(key, "an image")
        series.last = self.clock()
        series.seen.add(image_id)

    def end(self, key: Any, data: dict[str, Any]) -> list[Message]:
        self._current(key, "an end")
        return self._close(data, "end")

    def tick(self, now: float) -> list[Message]:
        series = self.open
        if series is None or not self.timeout or now - series.last < self.timeout:
            return []
        return self._close({}, "timeout")

    def _current(self, key: Any, what: str) -> _Series:
        if self.open is None:
            msg = f"{what} of series {key!r:.60} with no series open (its start was missed)"
            raise WireError(msg, reason="no_series")
        if key != self.open.key:
            msg = f"{what} of series {key!r:.60} while series {self.open.key!r:.60} is open"
            raise WireError(msg, reason="other_series")
        return self.open

    def _close(self, data: dict[str, Any], closed_by: str) -> list[Message]:
        series, self.open = self.open, None
        assert series is not None
        missing = series.missing()
        stop = Stop(
            data={
                **data,
                "images_received": series.seen.count,
                "missing_images": missing,
                "incomplete": missing > 0 or closed_by != "end",
                "closed_by": closed_by,
            }
        )
        if missing:
            stop.routing[LOST] = {LOST_REASON: missing}
        return [stop]
