"""Where a pyFAI integrator's geometry comes from (``arroyo.io.pyfai``): the layers a
run's Start, a PONI file and the INI give, merged into one ``Geometry``, and the
integrator built from it. pyFAI is imported only to read a PONI file or build one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arroyo.compression import MissingExtra

EXTRA = "pip install 'arroyo[pyfai]'"


def require() -> tuple[Any, Any]:
    """pyFAI's ``AzimuthalIntegrator`` and ``Detector`` classes, or ``MissingExtra``."""
    try:
        from pyFAI.detectors import Detector
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    except ImportError as e:
        msg = f"pyFAI is not installed: {EXTRA}"
        raise MissingExtra(msg) from e
    return AzimuthalIntegrator, Detector


@dataclass(frozen=True)
class Geometry:
    """Everything an integrator is built from (lengths in m, angles in rad)."""

    dist: float
    poni1: float
    poni2: float
    pixel1: float
    pixel2: float
    wavelength: float | None = None
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0
    shape: tuple[int, int] | None = None


Layer = dict[str, Any]  # some of Geometry's fields, or "center" (x, y) in pixels
_POSITION = ("poni1", "poni2", "center")


def merge(layers: list[Layer]) -> Geometry:
    """The layers, each overriding the ones before (a beam position, PONI or centre, as
    one), as a Geometry; ``ValueError`` naming what none of them gives."""
    out: Layer = {}
    for layer in layers:
        if any(k in layer for k in _POSITION):
            for k in _POSITION:
                out.pop(k, None)
        out.update(layer)
    if "center" in out and "pixel1" in out and "pixel2" in out:
        x, y = out.pop("center")
        out["poni1"], out["poni2"] = y * out["pixel1"], x * out["pixel2"]
    missing = [k for k in ("dist", "poni1", "poni2", "pixel1", "pixel2") if k not in out]
    if missing:
        msg = f"no {', '.join(missing)} in the options, the PONI file or the Start"
        raise ValueError(msg)
    out.pop("center", None)
    return Geometry(**out)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    return None


def _first(data: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        found = _number(data.get(key))
        if found is not None:
            return found
    return None


def from_start(data: dict[str, Any]) -> Layer:
    """What a detector's Start says of the geometry (Stream V2 and V1 names); values
    that are not numbers are foreign input that is ignored, not trusted."""
    layer: Layer = {}
    pairs = {
        "pixel1": _first(data, "pixel_size_y", "y_pixel_size"),
        "pixel2": _first(data, "pixel_size_x", "x_pixel_size"),
        "dist": _first(data, "detector_distance"),
    }
    translation = data.get("detector_translation")
    if pairs["dist"] is None and isinstance(translation, list) and len(translation) == 3:
        pairs["dist"] = _number(translation[2])
    angstrom = _first(data, "incident_wavelength", "wavelength")
    pairs["wavelength"] = None if angstrom is None else angstrom * 1e-10
    layer.update({k: v for k, v in pairs.items() if v is not None and v > 0})
    x, y = _first(data, "beam_center_x"), _first(data, "beam_center_y")
    if x is not None and y is not None:
        layer["center"] = (x, y)
    rows = _first(data, "image_size_y", "y_pixels_in_detector")
    cols = _first(data, "image_size_x", "x_pixels_in_detector")
    if rows and cols and rows > 0 and cols > 0:
        layer["shape"] = (int(rows), int(cols))
    return layer


def from_poni(path: Path) -> Layer:
    """The geometry of a PONI file; ``ValueError`` naming the file if pyFAI cannot read it."""
    require()
    from pyFAI.io.ponifile import PoniFile

    try:
        poni = PoniFile(str(path))
    except Exception as e:  # pyFAI raises several kinds for a bad file
        msg = f"poni_file = {path}: cannot read it: {e}"
        raise ValueError(msg) from e
    layer: Layer = {
        k: float(getattr(poni, k))
        for k in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3")
        if getattr(poni, k) is not None
    }
    if "dist" not in layer:  # pyFAI reads any text file, a PONI or not
        msg = f"poni_file = {path}: not a PONI file (no Distance in it)"
        raise ValueError(msg)
    if poni.wavelength:
        layer["wavelength"] = poni.wavelength
    detector = poni.detector
    if detector is not None and detector.pixel1 and detector.pixel2:
        layer["pixel1"], layer["pixel2"] = detector.pixel1, detector.pixel2
        if detector.max_shape is not None:
            layer["shape"] = tuple(int(n) for n in detector.max_shape)
    return layer


def make_integrator(geometry: Geometry, mask: np.ndarray | None) -> Any:
    """A pyFAI ``AzimuthalIntegrator`` for ``geometry`` (its shape must be known), with
    ``mask`` (True = masked) on its detector."""
    integrator_class, detector_class = require()
    detector = detector_class(geometry.pixel1, geometry.pixel2, max_shape=geometry.shape)
    if mask is not None:
        detector.mask = mask.astype(np.int8)
    return integrator_class(
        dist=geometry.dist,
        poni1=geometry.poni1,
        poni2=geometry.poni2,
        rot1=geometry.rot1,
        rot2=geometry.rot2,
        rot3=geometry.rot3,
        wavelength=geometry.wavelength,
        detector=detector,
    )
