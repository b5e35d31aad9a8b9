"""What an event holds for the viewer's page: a frame, 1-D arrays, scalars, and the
names and units of their axes.

Pure functions over an event's parts (a ``_viewer_history.Slot``), used alike for the
live frame and for a frame a page looks back at. The stage's thread only asks the
cheap questions (``arrays_of``, ``frame_in``, ``has_lines``, ``scalars_of``: shapes
and dict lookups); decoding a compressed frame and reading arrays is for the server's
thread.

Units (docs/web.md): the unit of a name is looked up in the event's metadata, then in
its run's Start data, as ``units = {"q": "nm^-1"}`` or ``q_unit = "nm^-1"``. A frame's
values take the unit of its array's name (``payload`` for a bare array) or a plain
``unit``; image axes are in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from arroyo.io._viewer_history import Part, Slot
from arroyo.message import Encoded

X_AXES = ("q", "2th", "r", "chi", "x")  # a 1-D array by one of these names is the x of the others
IGNORED = ("frame", "pool", "center")  # not measurements: no series unless asked for
MAX_LIST = 8  # a metadata list of up to this many numbers is as many scalars


def arrays_of(payload: Any) -> dict[str, Any]:
    """The arrays of a payload as held (numpy arrays, or ``Encoded`` ones still
    compressed), by name; a bare array is ``payload``."""
    if isinstance(payload, np.ndarray | Encoded):
        return {"payload": payload}
    if isinstance(payload, dict):
        return {k: v for k, v in payload.items() if isinstance(v, np.ndarray | Encoded)}
    return {}


def _filled(a: Any) -> bool:
    return 0 not in a.shape  # (not np.prod: this runs on the stage's thread per event)


def frame_in(arrays: dict[str, Any], name: str = "") -> tuple[str, Any] | None:
    """The array to show as an image: ``name`` if given (and 2-D or more), else the
    first non-empty array of two or more dimensions."""
    if name:
        found = arrays.get(name)
        return (name, found) if found is not None and len(found.shape) >= 2 else None
    for key, a in arrays.items():
        if len(a.shape) >= 2 and _filled(a):
            return key, a
    return None


def _x_name(names: Iterable[str]) -> str:
    names = set(names)
    return next((n for n in X_AXES if n in names), "")


def has_lines(arrays: dict[str, Any]) -> bool:
    """Whether there is a 1-D array to plot besides the x axis."""
    ones = [k for k, a in arrays.items() if len(a.shape) == 1 and _filled(a)]
    if not ones:
        return False
    return len(ones) > (1 if _x_name(ones) else 0)


def decoded(a: Any) -> np.ndarray:
    """A held array as numpy (a compressed one is decoded: call off the stage's thread)."""
    return a.decode() if isinstance(a, Encoded) else np.asarray(a)


def find_frame(slot: Slot, name: str = "") -> tuple[Part, str, Any] | None:
    """The part of ``slot`` holding its frame, the array's name and the array as held."""
    for part in list(slot.parts):
        found = frame_in(arrays_of(part.payload), name)
        if found is not None:
            return part, *found
    return None


def lines_of(slot: Slot) -> dict[str, Any] | None:
    """The 1-D arrays of ``slot`` for the line plot: ``x_name``, ``x`` (or None: the
    index), ``y`` by name, and the axes' labels with units."""
    for part in list(slot.parts):
        arrays = arrays_of(part.payload)
        if not has_lines(arrays) and not _q_in(part.metadata):
            continue
        ones = {k: decoded(a) for k, a in arrays.items() if len(a.shape) == 1 and _filled(a)}
        x_name = _x_name(ones)
        x = ones.pop(x_name) if x_name else None
        if x is None and _q_in(part.metadata):
            x, x_name = np.asarray(part.metadata["q"], dtype=np.float64), "q"
        if not ones:
            continue
        sources = (part.metadata, slot.start)
        x_name = x_name or "index"
        y_units = {unit_of(k, *sources) for k in ones}
        common = y_units.pop() if len(y_units) == 1 else ""
        y_label = label(next(iter(ones)), common) if len(ones) == 1 else common
        return {
            "x_name": x_name,
            "x": x,
            "y": ones,
            "x_label": label(x_name, unit_of(x_name, *sources)),
            "y_label": y_label,
        }
    return None


def _q_in(metadata: dict[str, Any]) -> bool:
    return isinstance(metadata.get("q"), list | tuple)


def scalars_of(metadata: dict[str, Any], wanted: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of ``metadata`` to plot: every finite number (lists of up to
    ``MAX_LIST`` as ``key[i]``), or only the keys in ``wanted``; ``IGNORED`` keys and
    booleans are left out unless wanted."""
    out: dict[str, float] = {}
    for key, value in metadata.items():
        if (wanted and key not in wanted) or (not wanted and key in IGNORED):
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, list | tuple) and 0 < len(value) <= MAX_LIST:
            for i, v in enumerate(value):
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    out[f"{key}[{i}]"] = float(v)
    return out


def event_scalars(slot: Slot, wanted: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scalar values of one event (all its parts), with their units, for the
    page's table, and when it arrived (the x of the series' marker)."""
    values: dict[str, float] = {}
    units: dict[str, str] = {}
    parts = list(slot.parts)
    for part in parts:
        for key, value in scalars_of(part.metadata, wanted).items():
            values[key] = value
            unit = unit_of(key.split("[", 1)[0], part.metadata, slot.start)
            if unit:
                units[key] = unit
    when = parts[0].when if parts else None
    return {
        "run": slot.run,
        "seq": slot.seq,
        "index": slot.index,
        "values": values,
        "units": units,
        "when": when,
    }


def unit_of(name: str, *sources: dict[str, Any]) -> str:
    """The unit of ``name`` in the first of ``sources`` that gives one (``units =
    {name: unit}`` or ``name_unit = unit``), or ``""``."""
    for source in sources:
        units = source.get("units")
        if isinstance(units, dict) and isinstance(units.get(name), str):
            return str(units[name])
        if isinstance(source.get(f"{name}_unit"), str):
            return str(source[f"{name}_unit"])
    return ""


def frame_unit(name: str, part: Part, start: dict[str, Any]) -> str:
    """The unit of a frame's values: that of its array's name, or a plain ``unit``."""
    found = unit_of(name, part.metadata, start)
    if found:
        return found
    for source in (part.metadata, start):
        if isinstance(source.get("unit"), str):
            return str(source["unit"])
    return ""


def label(name: str, unit: str) -> str:
    """An axis title: ``q (nm^-1)``, ``r``, or the unit alone."""
    return f"{name} ({unit})" if unit else name
