"""Azimuthal integration by pyFAI (extra ``arroyo[pyfai]``): a 2-D frame in, ``I(q)`` out.

    [stage:integrate]
    role = operator
    class = arroyo.io.pyfai:Integrate
    input = detector
    workers = 2
    npt = 1000
    unit = q_nm^-1                  ; any pyFAI radial unit: 2th_deg, r_mm, q_A^-1...
    ; geometry: any of these override what the run's Start says
    distance = 0.12                 ; sample-detector distance, m
    beam_center = 1020.5, 1100.2    ; x (column), y (row) in pixels, or poni1/poni2 in m
    wavelength = 1.0e-10            ; m
    pixel1 = 75e-6                  ; pixel height (rows), m
    pixel2 = 75e-6                  ; pixel width (columns), m
    shape = 2162, 2068              ; rows, columns

Geometry, per run, at its ``Start``, in layers each overriding the one before: what
the Start holds (a DECTRIS Stream V2 or V1 listener's beam centre, pixel sizes,
wavelength in angstrom, distance, image size: ``from_start``), then ``poni_file``
(pyFAI's PONI file), then the options. A beam centre in pixels becomes pyFAI's PONI
as ``poni1 = y * pixel1``, ``poni2 = x * pixel2`` (pixel ``i`` spans ``i`` to
``i + 1``). The mask (nonzero = masked) is ``mask_file``, else the Start's
``pixel_mask`` (``mask_key``). Each worker builds one integrator at the Start (kept
for the next run when nothing changed) and warms it up on a zero frame; without a
known shape it is built at the run's first frame.

Output: ``{RADIAL: axis, "I": intensity}`` (float64, ``npt`` long; RADIAL is the
unit's quantity: ``q``, ``2th``, ``r``...), metadata ``units = {RADIAL: "nm^-1"}``
merged into the input's. Start passes; Stop gains ``pyfai_dropped`` (shares). Drops
(deliberate, by reason in ``drops()``): ``shape_mismatch``, ``no_geometry``.
Details: docs/stages.md, "Integrate (pyFAI)".
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from arroyo.compression import MissingExtra
from arroyo.convert import Bounds
from arroyo.errors import ConfigError
from arroyo.io._pyfai_geometry import (
    Geometry,
    Layer,
    from_poni,
    from_start,
    make_integrator,
    merge,
    require,
)
from arroyo.io.retry import DropCount
from arroyo.message import SHARES, Event, Message, Payload, Start, Stop, frame_of
from arroyo.stage import Operator, Result

log = logging.getLogger("arroyo.io.pyfai")

SPLITS = ("no", "bbox", "pseudo", "full")
ALGORITHMS = ("histogram", "lut", "csr", "csc")
IMPLEMENTATIONS = ("python", "cython", "opencl")
DROPPED = "pyfai_dropped"  # the Stop's key


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        msg = f"{name} must be > 0, got {value}"
        raise ValueError(msg)


def _method(method: tuple[str, ...]) -> tuple[str, str, str]:
    if len(method) != 3:
        msg = f"method must be split, algorithm, implementation, got {', '.join(method)}"
        raise ValueError(msg)
    split, algorithm, impl = method
    for name, value, allowed in (
        ("split", split, SPLITS),
        ("algorithm", algorithm, ALGORITHMS),
        ("implementation", impl, IMPLEMENTATIONS),
    ):
        if value not in allowed:
            msg = f"method: {name} {value!r} is not one of {', '.join(allowed)}"
            raise ValueError(msg)
    return split, algorithm, impl


class Integrate(Operator):
    """Azimuthal integration of each event's 2-D frame by pyFAI (module docstring)."""

    def __init__(
        self,
        npt: Annotated[int, Bounds(ge=1)] = 1000,
        unit: str = "q_nm^-1",
        distance: float | None = None,
        poni1: float | None = None,
        poni2: float | None = None,
        beam_center: tuple[float, float] | None = None,
        wavelength: float | None = None,
        pixel1: float | None = None,
        pixel2: float | None = None,
        shape: tuple[int, int] | None = None,
        poni_file: Path | None = None,
        mask_file: Path | None = None,
        mask_key: str = "pixel_mask",
        polarization_factor: float | None = None,
        radial_range: tuple[float, float] | None = None,
        dummy: float | None = None,
        correct_solid_angle: bool = True,
        method: tuple[str, ...] = ("bbox", "csr", "cython"),
        array: str = "",
    ) -> None:
        if npt < 1:
            msg = f"npt must be >= 1, got {npt}"
            raise ValueError(msg)
        for name, value in (("distance", distance), ("wavelength", wavelength),
                            ("pixel1", pixel1), ("pixel2", pixel2)):  # fmt: skip
            _positive(name, value)
        if (poni1 is None) != (poni2 is None):
            msg = f"poni1 and poni2 go together, got poni1 = {poni1}, poni2 = {poni2}"
            raise ValueError(msg)
        if poni1 is not None and beam_center is not None:
            msg = f"beam_center = {beam_center} and poni1/poni2: give one beam position"
            raise ValueError(msg)
        if shape is not None and (len(shape) != 2 or min(shape) < 1):
            msg = f"shape must be rows, columns (two numbers >= 1), got {shape}"
            raise ValueError(msg)
        if polarization_factor is not None and not -1 <= polarization_factor <= 1:
            msg = f"polarization_factor must be between -1 and 1, got {polarization_factor}"
            raise ValueError(msg)
        if radial_range is not None and not (
            len(radial_range) == 2 and radial_range[0] < radial_range[1]
        ):
            msg = f"radial_range must be low, high with low < high, got {radial_range}"
            raise ValueError(msg)
        self.npt, self.unit, self.array = npt, unit, array
        self.radial_range = (
            None if radial_range is None else (float(radial_range[0]), float(radial_range[1]))
        )
        self.method = _method(method)
        self.dummy = dummy
        self.mask_key = mask_key
        self.poni_file, self.mask_file = poni_file, mask_file
        self.polarization_factor = polarization_factor
        self.correct_solid_angle = correct_solid_angle
        given = {"dist": distance, "poni1": poni1, "poni2": poni2, "wavelength": wavelength,
                 "pixel1": pixel1, "pixel2": pixel2}  # fmt: skip
        self.options: Layer = {k: float(v) for k, v in given.items() if v is not None}
        if beam_center is not None:
            self.options["center"] = (float(beam_center[0]), float(beam_center[1]))
        if shape is not None:
            self.options["shape"] = (int(shape[0]), int(shape[1]))
        self.file_layer: Layer = {}
        self.file_mask: np.ndarray | None = None
        self.radial, self.radial_unit = "", ""
        self.dropped = DropCount("Integrate")
        self.run_drops = 0
        self.integrator: Any = None
        self.geometry: Geometry | None = None
        self.mask: np.ndarray | None = None
        self.pending: tuple[Geometry, np.ndarray | None] | None = None  # shape unknown yet
        self.bad_geometry = ""

    def setup(self) -> None:
        """Import pyFAI, check the unit, read the PONI and mask files: a mistake in
        any of them is a ``ConfigError`` (one line, exit 2) before the first message."""
        try:
            require()
            from pyFAI.units import to_unit

            found = to_unit(self.unit)
            if found is None or not hasattr(found, "space"):
                msg = f"unit = {self.unit!r} is not a pyFAI radial unit (q_nm^-1, 2th_deg, r_mm...)"
                raise ValueError(msg)
            self.radial = str(found.space)
            self.radial_unit = found.name.partition("_")[2]
            if self.poni_file is not None:
                self.file_layer = from_poni(self.poni_file)
            if self.mask_file is not None:
                self.file_mask = self._load_mask(self.mask_file)
        except (MissingExtra, ValueError) as e:
            msg = f"Integrate: {e}"
            raise ConfigError(msg) from e

    @staticmethod
    def _load_mask(path: Path) -> np.ndarray:
        try:
            mask = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            msg = f"mask_file = {path}: cannot read it: {e}"
            raise ValueError(msg) from e
        if mask.ndim != 2:
            msg = f"mask_file = {path}: a 2-D array expected, got shape {mask.shape}"
            raise ValueError(msg)
        return mask != 0

    def drops(self) -> dict[str, int]:
        return dict(self.dropped.by_reason)

    # -- messages ------------------------------------------------------------------

    def process(self, message: Message) -> Result:
        if isinstance(message, Start):
            self.begin(message.data)
            return message
        if isinstance(message, Stop):
            return self._stop(message)
        if not isinstance(message, Event):
            return message
        frame = frame_of(message.payload, self.array)
        if frame is None:
            return message
        return self.on_frame(message, frame)

    def begin(self, data: dict[str, Any]) -> None:
        """A run starts: its geometry and mask, and the integrator built and warmed up
        (or kept from the run before when both are the same)."""
        self.run_drops, self.bad_geometry, self.pending = 0, "", None
        if not self.radial:
            self.setup()
        try:
            geometry = merge([from_start(data), self.file_layer, self.options])
        except ValueError as e:
            self._no_geometry(str(e))
            return
        mask = self.file_mask if self.file_mask is not None else self._start_mask(data)
        if geometry.shape is None and mask is not None:
            geometry = replace(geometry, shape=(int(mask.shape[0]), int(mask.shape[1])))
        if geometry.shape is None:
            self.pending = (geometry, mask)  # built at the first frame, from its shape
            return
        self._build(geometry, mask)

    def _start_mask(self, data: dict[str, Any]) -> np.ndarray | None:
        found = data.get(self.mask_key)
        if isinstance(found, np.ndarray) and found.ndim == 2:
            return found != 0
        return None

    def _build(self, geometry: Geometry, mask: np.ndarray | None) -> None:
        if mask is not None and geometry.shape != mask.shape:
            self._no_geometry(f"the mask's shape {mask.shape} is not the frame's {geometry.shape}")
            return
        same_mask = (mask is None and self.mask is None) or (
            mask is not None and self.mask is not None and np.array_equal(mask, self.mask)
        )
        if self.integrator is not None and geometry == self.geometry and same_mask:
            return
        try:
            self.integrator = make_integrator(geometry, mask)
            self._integrate(np.zeros(geometry.shape or (1, 1), np.float32))  # warm-up
        except Exception as e:  # pyFAI's own checks: a geometry it cannot use
            self.integrator = None
            self._no_geometry(f"pyFAI refused the geometry {geometry}: {e}")
            return
        self.geometry, self.mask = geometry, mask
        log.info("integrator ready: %s, mask %s", geometry, "yes" if mask is not None else "no")

    def _no_geometry(self, why: str) -> None:
        self.integrator, self.geometry, self.bad_geometry = None, None, why
        log.error("this run's events are dropped: %s", why)

    def on_frame(self, event: Event, frame: np.ndarray) -> Result:
        if frame.ndim != 2:
            self._drop("shape_mismatch", f"a frame of shape {frame.shape} is not 2-D")
            return None
        if self.pending is not None:
            geometry, mask = self.pending
            self.pending = None
            self._build(replace(geometry, shape=(frame.shape[0], frame.shape[1])), mask)
        if self.integrator is None or self.geometry is None:
            self._drop("no_geometry", self.bad_geometry or "no geometry")
            return None
        if frame.shape != self.geometry.shape:
            why = f"frame shape {frame.shape}, the geometry's is {self.geometry.shape}"
            self._drop("shape_mismatch", why)
            return None
        radial, intensity = self._integrate(frame)
        profile = {self.radial: radial, "I": intensity}
        payload: Payload = profile
        if isinstance(event.payload, dict):
            rest = {k: v for k, v in event.payload.items() if k != self.array}
            payload = {**rest, **profile}
        units = event.metadata.get("units")
        units = {**units} if isinstance(units, dict) else {}
        units[self.radial] = self.radial_unit
        return Event(
            metadata={**event.metadata, "units": units},
            payload=payload,
            run=event.run,
            seq=event.seq,
            timestamp_ns=event.timestamp_ns,
        )

    def _integrate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.integrator.integrate1d(
            frame,
            self.npt,
            unit=self.unit,
            method=self.method,
            correctSolidAngle=self.correct_solid_angle,
            polarization_factor=self.polarization_factor,
            radial_range=self.radial_range,
            dummy=self.dummy,
        )
        return (
            np.asarray(result.radial, dtype=np.float64),
            np.asarray(result.intensity, dtype=np.float64),
        )

    def _drop(self, reason: str, why: str) -> None:
        self.dropped.add(1, reason, why)
        self.run_drops += 1

    def _stop(self, stop: Stop) -> Stop:
        shares = stop.data.get(SHARES)
        names = [*shares] if isinstance(shares, list) else []
        data = {**stop.data, DROPPED: self.run_drops, SHARES: [*names, DROPPED]}
        return Stop(
            data=data,
            run=stop.run,
            seq=stop.seq,
            timestamp_ns=stop.timestamp_ns,
            routing=dict(stop.routing),
        )
