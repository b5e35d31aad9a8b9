"""Where a run's Start, event scalars and Stop go in a NeXus file (``arroyo.io.hdf5``).

What goes where, and the datasets that grow with a run (``Frames``: one chunk per
frame, direct chunks or through the filter; ``Column``: a scalar per frame). These
take open h5py groups (typed ``Any``, so this module imports without the ``hdf5``
extra) and know nothing of runs, SWMR or drops. The layout they make::

    /                         NX_class=NXroot, default=entry, creator
    /entry                    NXentry; default=data, arroyo_run; completeness at Stop
    /entry/start_time         ISO 8601 (the Start's timestamp), end_time at Stop
    /entry/start              NXcollection: every Start.data key but the detector arrays
    /entry/instrument/detector   NXdetector: pixel_mask, flatfield, ... and the
                              known detector fields under their NeXus names, with units
    /entry/instrument/beam    NXbeam: incident_energy, incident_wavelength
    /entry/data               NXdata, signal=data: the frames and the event scalars
    /entry/stop               NXcollection: Stop.data (at Stop)
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import numpy as np

from arroyo.compression import HEADER, declared_size, default_block
from arroyo.errors import WireError
from arroyo.message import Encoded

#: Start.data keys that are NXdetector fields: key -> (NeXus name, units or "").
DETECTOR_FIELDS = {
    "pixel_mask": ("pixel_mask", ""),
    "flatfield": ("flatfield", ""),
    "countrate_correction_lookup_table": ("countrate_correction_lookup_table", ""),
    "beam_center_x": ("beam_center_x", "pixel"),
    "beam_center_y": ("beam_center_y", "pixel"),
    "count_time": ("count_time", "s"),
    "frame_time": ("frame_time", "s"),
    "sensor_material": ("sensor_material", ""),
    "sensor_thickness": ("sensor_thickness", "m"),
    "pixel_size_x": ("x_pixel_size", "m"),
    "pixel_size_y": ("y_pixel_size", "m"),
    "detector_description": ("description", ""),
    "detector_serial_number": ("serial_number", ""),
    "saturation_value": ("saturation_value", ""),
}
#: Start.data keys that are NXbeam fields (DECTRIS units: eV, angstrom).
BEAM_FIELDS = {
    "incident_energy": ("incident_energy", "eV"),
    "incident_wavelength": ("incident_wavelength", "angstrom"),
}
#: Per-channel detector arrays arrive as ``pixel_mask_<channel>`` (arroyo.io.dectris).
_CHANNEL_ARRAY = re.compile(r"^(pixel_mask|flatfield)_.+$")
#: Columns every run has in /entry/data, whatever the events carry.
RESERVED = ("seq", "timestamp_ns")
#: Arrays at least this big are stored chunked and compressed, smaller ones contiguous.
COMPRESS_FROM = 1 << 16


def safe_name(key: Any) -> str:
    """An HDF5 link name for ``key``: '/' would make a path, '.' alone means the group."""
    name = str(key).replace("/", "_")
    return name if name not in ("", ".") else f"_{name}"


def iso_time(timestamp_ns: int) -> str:
    return datetime.fromtimestamp(timestamp_ns / 1e9, UTC).isoformat()


def set_class(group: Any, nx_class: str, **attrs: Any) -> Any:
    group.attrs["NX_class"] = nx_class
    for name, value in attrs.items():
        group.attrs[name] = value
    return group


def is_detector_array(key: str, value: Any) -> bool:
    """True for Start arrays that belong in the NXdetector (pixel masks, flatfields...)."""
    if not isinstance(value, np.ndarray):
        return False
    return key in DETECTOR_FIELDS or _CHANNEL_ARRAY.match(key) is not None


def storable(value: Any, string_dtype: Any) -> Any:
    """``value`` as something h5py stores, or None for nothing (a None value).

    Numbers and strings as themselves, arrays of numbers as they are, lists of
    numbers or of strings as 1-D datasets, anything else as its JSON text."""
    if value is None:
        return None
    if isinstance(value, str | bool | int | float | np.generic):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
            return str(value)
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return value
    if isinstance(value, list | tuple) and value:
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=string_dtype)
        array = np.asarray(value) if all(_plain_number(v) for v in value) else None
        if array is not None and array.dtype.kind in "biuf":
            return array
    return json.dumps(value, default=str)


def _plain_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def write_tree(group: Any, data: dict[str, Any], h5: Any, array_filter: dict[str, Any]) -> None:
    """Each key of ``data`` a dataset of ``group`` (a nested dict a sub-NXcollection);
    big arrays chunked with ``array_filter`` (create_dataset keywords)."""
    for key, value in data.items():
        name = safe_name(key)
        if name in group:
            continue  # two keys that differ only by '/': the first one stays
        if isinstance(value, dict):
            write_tree(set_class(group.create_group(name), "NXcollection"), value, h5, array_filter)
            continue
        _dataset(group, name, storable(value, h5.string_dtype()), array_filter)


def _dataset(group: Any, name: str, value: Any, array_filter: dict[str, Any]) -> Any:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.nbytes >= COMPRESS_FROM and value.ndim:
        return group.create_dataset(name, data=value, chunks=value.shape, **array_filter)
    return group.create_dataset(name, data=value)


def write_start(entry: Any, data: dict[str, Any], h5: Any, array_filter: dict[str, Any]) -> None:
    """The Start's data: detector arrays and fields into /entry/instrument (made only
    when there are some), everything else, and the scalar detector fields too as they
    came, into /entry/start."""
    groups: dict[str, Any] = {}

    def group(nx_class: str) -> Any:
        if nx_class not in groups:
            if "instrument" not in entry:
                set_class(entry.create_group("instrument"), "NXinstrument")
            name = {"NXdetector": "detector", "NXbeam": "beam"}[nx_class]
            groups[nx_class] = set_class(entry["instrument"].create_group(name), nx_class)
        return groups[nx_class]

    rest: dict[str, Any] = {}
    for key, value in data.items():
        if is_detector_array(str(key), value):
            _dataset(group("NXdetector"), safe_name(key), value, array_filter)
            continue
        rest[key] = value
        for fields, nx_class in ((DETECTOR_FIELDS, "NXdetector"), (BEAM_FIELDS, "NXbeam")):
            stored = storable(value, h5.string_dtype())
            if key in fields and stored is not None:
                name, units = fields[key]
                made = _dataset(group(nx_class), name, stored, array_filter)
                if units:
                    made.attrs["units"] = units
    write_tree(set_class(entry.create_group("start"), "NXcollection"), rest, h5, array_filter)


def scalar_dtype(value: Any) -> np.dtype[Any] | None:
    """The column type of an event metadata value, or None if it is not a number."""
    if isinstance(value, bool | np.bool_):
        return np.dtype(bool)
    if isinstance(value, int | np.integer):
        return np.dtype("<i8") if -(1 << 63) <= int(value) < 1 << 63 else None
    if isinstance(value, float | np.floating):
        return np.dtype("<f8")
    return None


def missing_value(dtype: np.dtype[Any]) -> Any:
    """What a column holds for an event that lacks its key (NaN, -1, False)."""
    return {"f": math.nan, "i": -1, "b": False}[dtype.kind]


def scalar_columns(metadata: dict[str, Any], taken: set[str]) -> dict[Any, tuple[str, Any]]:
    """The 1-D columns a run's first event makes: metadata key -> (column name,
    dtype) for each numeric value, in order, without names ``taken`` (frames, the
    reserved columns)."""
    columns: dict[Any, tuple[str, Any]] = {}
    names = set(taken)
    for key, value in metadata.items():
        name = safe_name(key)
        dtype = scalar_dtype(value)
        if dtype is not None and name not in names:
            columns[key] = (name, dtype)
            names.add(name)
    return columns


def stop_attrs(
    stop_data: dict[str, Any] | None,
    losses: dict[str, int],
    emitted: int | None,
    received: int,
    written: int,
) -> dict[str, Any]:
    """The completeness attributes /entry gets at Stop (docs/storage.md).

    ``incomplete`` as the runtime decided it (the Stop's ``data["incomplete"]``), or
    True for a run closed without a Stop; ``missing`` the events lost upstream, from
    the Stop's losses by reason where known, else emitted - received."""
    closed_without_stop = stop_data is None
    data = stop_data or {}
    incomplete = closed_without_stop or data.get("incomplete") is True
    known = {why: n for why, n in losses.items() if isinstance(n, int) and n > 0}
    missing = sum(known.values())
    if incomplete and not missing and emitted is not None:
        missing = max(0, emitted - received)
    reasons = [f"{n} {why}" if n >= 0 else str(why) for why, n in losses.items() if n]
    if closed_without_stop:
        reasons.append("closed without a Stop")
    elif incomplete and not reasons:
        reasons.append(str(data.get("reason", "the runtime marked the run incomplete")))
    return {
        "events_emitted": -1 if emitted is None else emitted,
        "events_received": received,
        "events_written": written,
        "complete": not incomplete,
        "incomplete": incomplete,
        "missing": missing,
        "missing_reason": "; ".join(reasons),
        "closed_without_stop": closed_without_stop,
    }


# -- the datasets a run grows ---------------------------------------------------------

#: Codecs a dataset with that filter takes as direct chunks.
DIRECT = {"bslz4": ("bslz4", "bslz4-bare"), "lz4": ("lz4",)}
SCALAR_CHUNK = 4096  # rows per chunk of a scalar column


def filter_keywords(compression: str, plugin: Any) -> dict[str, Any]:
    """``create_dataset`` keywords of a compression (``bslz4``: bitshuffle's filter with
    LZ4 and its default block, the options detector file writers use)."""
    if compression == "bslz4":
        return dict(plugin.Bitshuffle(cname="lz4"))
    if compression == "lz4":
        return dict(plugin.LZ4())
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    return {}


def direct_chunk(item: Encoded, filter_name: str) -> Any:
    """The bytes of ``item`` as one chunk of a dataset compressed with ``filter_name``,
    or None when they are not (the frame is decoded and written through the filter).
    Raises ``WireError`` when the header disagrees with the frame's dtype and shape: a
    chunk a reader could not decode must not go into the file."""
    if item.codec not in DIRECT.get(filter_name, ()):
        return None
    data = item.data
    view = getattr(data, "buffer", None) or memoryview(data)  # (a zmq.Frame has .buffer)
    view = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
    itemsize = item.dtype.itemsize
    size = itemsize * math.prod(item.shape)
    if item.codec == "bslz4-bare":
        return HEADER.pack(size, default_block(itemsize) * itemsize) + view
    if declared_size(view) != size:
        msg = f"{item.codec} header declares {declared_size(view)} bytes, the frame {size}"
        raise WireError(msg, reason="size")
    block = HEADER.unpack_from(view)[1]
    if block <= 0 or (item.codec == "bslz4" and block % itemsize):
        msg = f"{item.codec} block of {block} bytes does not fit {item.dtype.str} elements"
        raise WireError(msg, reason="undecodable")
    return view


def frame_items(payload: Any, array: str) -> list[tuple[str, Any]] | str:
    """The frames of one payload as (dataset name, array or Encoded), or a drop reason."""
    if payload is None:
        return []
    if isinstance(payload, bytes | bytearray | memoryview):
        return "bytes_payload"
    if isinstance(payload, dict):
        if array:
            return [("data", payload[array])] if array in payload else "layout"
        if len(payload) == 1:
            return [("data", next(iter(payload.values())))]
        return [(safe_name(name), item) for name, item in payload.items()]
    return [("data", payload)]


class Frames:
    """One growing frame dataset: (n, *shape), one chunk per frame."""

    def __init__(self, group: Any, name: str, first: Any, filter_name: str, plugin: Any):
        self.name = name
        self.dtype, self.shape = np.dtype(first.dtype), tuple(first.shape)
        self.filter = filter_name
        self.dset = group.create_dataset(
            name,
            shape=(0, *self.shape),
            maxshape=(None, *self.shape),
            chunks=(1, *self.shape),
            dtype=self.dtype,
            **filter_keywords(filter_name, plugin),
        )
        self.zeros = (0,) * len(self.shape)

    def misfit(self, item: Any) -> str | None:
        """Why ``item`` cannot be this dataset's next frame, or None."""
        if not isinstance(item, np.ndarray | Encoded):
            return "dtype_unsupported"
        if tuple(item.shape) != self.shape:
            return "shape_mismatch"
        return "dtype_mismatch" if np.dtype(item.dtype) != self.dtype else None

    def write(self, row: int, chunk: Any, array: Any) -> None:
        """Frame ``row``: ``chunk`` as it is, else ``array`` through the filter."""
        dsid = self.dset.id  # (h5py's low level: resize() costs more in Python than in HDF5)
        dsid.set_extent((row + 1, *self.shape))
        if chunk is not None:
            dsid.write_direct_chunk((row, *self.zeros), chunk)
        else:
            self.dset[row] = array


class Column:
    """One scalar column: values buffered, written in one slice per batch. Values
    are cast to the column's type (the run's first value's); one that cannot be is
    written as ``missing``."""

    def __init__(self, group: Any, name: str, dtype: np.dtype[Any]) -> None:
        self.name, self.dtype = name, dtype
        self.missing = missing_value(dtype)
        self.dset = group.create_dataset(
            name, shape=(0,), maxshape=(None,), chunks=(SCALAR_CHUNK,), dtype=dtype
        )
        self.pending: list[Any] = []

    def _cast(self, value: Any) -> Any:
        try:
            return np.asarray(value, dtype=self.dtype)[()]
        except (OverflowError, TypeError, ValueError):
            return self.missing

    def write(self, start: int) -> None:
        if self.pending:
            try:
                values = np.asarray(self.pending, dtype=self.dtype)
            except (OverflowError, TypeError, ValueError):  # an int beyond int64, say
                values = np.array([self._cast(v) for v in self.pending], dtype=self.dtype)
            self.dset.resize(start + len(values), axis=0)
            self.dset[start:] = values
            self.pending.clear()
