"""The EPICS PV Access publisher (``arroyo.io.epics:PvaPublisher``, docs/epics.md):
serves reduced images as an ``NTNDArray`` PV and 1-D arrays as an ``NTScalarArray`` PV
from a pvapy ``PvaServer`` in the stage's process."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from arroyo.errors import ConfigError, WireError
from arroyo.io._pva_frames import FIELD_OF, ntndarray, require, scalar_array, servable
from arroyo.io.guard import describe
from arroyo.io.retry import DropCount
from arroyo.message import Event, Message
from arroyo.stage import Publisher

log = logging.getLogger("arroyo.io.epics")


class PvaPublisher(Publisher):
    """Serves each event's arrays as PVs: a 2-D (or 3-D colour) array as an
    ``NTNDArray`` at ``image_pv``, a 1-D array as an ``NTScalarArray`` of
    ``array_type`` at ``array_pv`` (an array of another type is converted: a PV keeps
    its type, so clients need not reconnect). For a dict payload, ``image_key`` and
    ``array_key`` name the arrays to serve. The NTNDArray's ``uniqueId`` counts the
    images served from 1; both PVs' timestamp is the event's ``timestamp`` metadata
    (a listener's) or the time the event was made. An event with nothing to serve is
    counted (``nothing_to_serve``), as is an image of a type PV Access has no field
    for (``unsupported_dtype``: complex numbers, say).
    """

    def __init__(
        self,
        image_pv: str = "",
        array_pv: str = "",
        image_key: str = "",
        array_key: str = "",
        array_type: str = "float64",
    ) -> None:
        if not image_pv and not array_pv:
            msg = "name image_pv (an NTNDArray) or array_pv (an NTScalarArray), or both"
            raise ConfigError(msg)
        try:
            self.array_type = np.dtype(array_type).newbyteorder("<")
        except TypeError:
            self.array_type = np.dtype("V")
        if self.array_type not in FIELD_OF:
            names = ", ".join(sorted(d.name for d in FIELD_OF))
            msg = f"array_type {array_type!r}: one of {names}"
            raise ConfigError(msg)
        self.image_pv = image_pv
        self.array_pv = array_pv
        self.image_key = image_key
        self.array_key = array_key
        self.served = 0
        self._server: Any = None
        self._dropped = DropCount(f"PvaPublisher {image_pv or array_pv}")

    def setup(self) -> None:
        self._pva = pva = require()
        self._server = pva.PvaServer()
        if self.image_pv:
            self._server.addRecord(self.image_pv, pva.NtNdArray(), None)
        if self.array_pv:
            self._server.addRecord(self.array_pv, scalar_array(pva, self.array_type), None)
        self._server.start()
        served = ", ".join(p for p in (self.image_pv, self.array_pv) if p)
        log.info("PvaPublisher: serving %s", served)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def drops(self) -> dict[str, int]:
        return dict(self._dropped.by_reason)

    def stats(self) -> dict[str, Any]:
        return {"images_served": self.served}

    def publish(self, message: Message) -> None:
        if not isinstance(message, Event):
            return
        image, array = self._pick(message.payload)
        if image is None and array is None:
            self._dropped.add(1, "nothing_to_serve", f"event {message.seq}: no array for a PV")
            return
        when = message.metadata.get("timestamp")
        if not isinstance(when, int | float) or isinstance(when, bool):
            when = message.timestamp_ns / 1e9
        if image is not None:
            self._serve_image(image, float(when))
        if array is not None:
            self._serve_array(array, float(when))

    def _pick(self, payload: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        if isinstance(payload, dict):
            image = payload.get(self.image_key) if self.image_key else None
            array = payload.get(self.array_key) if self.array_key else None
        elif isinstance(payload, np.ndarray):
            image = array = payload
        else:
            return None, None
        if not (self.image_pv and isinstance(image, np.ndarray) and image.ndim in (2, 3)):
            image = None
        if not (self.array_pv and isinstance(array, np.ndarray) and array.ndim == 1):
            array = None
        return image, array

    def _serve_image(self, image: np.ndarray, when: float) -> None:
        try:
            flat = servable(image)
        except WireError as e:
            self._dropped.add(1, e.reason, str(e))
            return
        self.served += 1
        self._server.update(self.image_pv, ntndarray(self._pva, flat, self.served, when))

    def _serve_array(self, array: np.ndarray, when: float) -> None:
        try:
            flat = np.ascontiguousarray(array, dtype=self.array_type)
        except (TypeError, ValueError) as e:  # (complex to float, say)
            self._dropped.add(1, "unsupported_dtype", describe(e))
            return
        value = scalar_array(self._pva, self.array_type)
        value["value"] = flat
        value["timeStamp"] = self._pva.PvTimeStamp(when)
        self._server.update(self.array_pv, value)
