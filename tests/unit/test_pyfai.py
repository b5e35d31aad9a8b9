"""``arroyo.io.pyfai:Integrate`` in the test process, with the real pyFAI: where its
geometry comes from, what it refuses, what it drops, and how it compares with the
no-dependency ``stages.reduce:RadialProfile``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arroyo.errors import ConfigError
from arroyo.message import Event, Start, Stop
from tests.conftest import need_extra


def need_pyfai() -> None:
    """The pyfai extra (pyFAI), as ``need_extra``."""
    need_extra("pyfai", "pyFAI")


need_pyfai()

from arroyo.io._pyfai_geometry import Geometry, from_start, merge  # noqa: E402
from arroyo.io.pyfai import Integrate  # noqa: E402

SHAPE = (128, 160)
PIXEL = 75e-6
INI: dict[str, Any] = {
    "distance": 0.1,
    "beam_center": (70.5, 60.25),
    "wavelength": 1e-10,
    "pixel1": PIXEL,
    "pixel2": PIXEL,
    "shape": SHAPE,
}
STREAM_V2_START = {  # what a Stream V2 listener's Start holds (arroyo.io.dectris)
    "beam_center_x": 80.0,
    "beam_center_y": 50.0,
    "pixel_size_x": PIXEL,
    "pixel_size_y": PIXEL,
    "incident_wavelength": 1.0,  # angstrom
    "detector_translation": [0.0, 0.0, 0.12],
    "image_size_x": SHAPE[1],
    "image_size_y": SHAPE[0],
}


def started(op: Integrate, data: dict[str, Any] | None = None) -> Integrate:
    op.setup()
    op.process(Start(data=data or {}))
    return op


def frame(seed: int = 0, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).poisson(100, shape).astype(np.uint16)


# -- geometry ----------------------------------------------------------------------


def test_a_stream_v2_start_gives_the_whole_geometry_in_si_units():
    g = merge([from_start(STREAM_V2_START)])
    assert g == Geometry(
        dist=0.12,
        poni1=50.0 * PIXEL,
        poni2=80.0 * PIXEL,
        pixel1=PIXEL,
        pixel2=PIXEL,
        wavelength=pytest.approx(1e-10),
        shape=SHAPE,
    )


def test_the_options_override_the_start_and_a_poni_replaces_a_beam_centre():
    start = from_start(STREAM_V2_START)
    g = merge([start, {"dist": 0.3, "poni1": 0.001, "poni2": 0.002}])
    assert (g.dist, g.poni1, g.poni2, g.pixel1) == (0.3, 0.001, 0.002, PIXEL)
    # a beam centre in the options is converted with the Start's pixel sizes
    g = merge([start, {"center": (10.0, 20.0)}])
    assert (g.poni1, g.poni2) == (20.0 * PIXEL, 10.0 * PIXEL)


def test_foreign_values_that_are_not_numbers_are_ignored():
    layer = from_start({**STREAM_V2_START, "pixel_size_x": "75um", "beam_center_y": None})
    assert "pixel2" not in layer and "center" not in layer
    with pytest.raises(ValueError, match="poni1, poni2, pixel2"):
        merge([layer])


def test_a_poni_file_is_read_and_the_options_override_it(tmp_path):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    ai = AzimuthalIntegrator(
        dist=0.2, poni1=0.004, poni2=0.005, rot1=0.01, wavelength=0.8e-10,
        detector=Detector(PIXEL, PIXEL, max_shape=SHAPE),
    )  # fmt: skip
    ai.write(str(tmp_path / "cal.poni"))
    op = started(Integrate(npt=50, poni_file=tmp_path / "cal.poni", distance=0.25))
    assert op.geometry is not None
    assert op.geometry.dist == 0.25  # the option wins
    assert (op.geometry.poni1, op.geometry.rot1) == pytest.approx((0.004, 0.01))
    assert op.geometry.wavelength == pytest.approx(0.8e-10)
    assert op.geometry.shape == SHAPE


# -- options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"npt": 0}, "npt"),
        ({"distance": -1.0}, "distance"),
        ({"pixel1": 0.0}, "pixel1"),
        ({"poni1": 0.01}, "poni1"),
        ({"poni1": 0.01, "poni2": 0.01, "beam_center": (1.0, 2.0)}, "beam_center"),
        ({"polarization_factor": 1.5}, "polarization_factor"),
        ({"method": ("bbox", "csr")}, "method"),
        ({"method": ("bbox", "fast", "cython")}, "fast"),
        ({"radial_range": (5.0, 1.0)}, "radial_range"),
        ({"shape": (0, 10)}, "shape"),
    ],
)
def test_a_bad_option_is_a_value_error_naming_it(options, named):
    with pytest.raises(ValueError, match=named):
        Integrate(**options)


def test_setup_refuses_an_unknown_unit_and_an_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="unit = 'q_parsec'"):
        Integrate(unit="q_parsec").setup()
    with pytest.raises(ConfigError, match="mask_file"):
        Integrate(mask_file=tmp_path / "none.npy").setup()
    with pytest.raises(ConfigError, match="poni_file"):
        (tmp_path / "bad.poni").write_text("not a poni file\n")
        Integrate(poni_file=tmp_path / "bad.poni").setup()


# -- events ------------------------------------------------------------------------


def test_an_event_becomes_the_profile_with_its_unit_and_the_rest_is_kept():
    op = started(Integrate(npt=64, unit="2th_deg", array="img", **INI))
    assert op.integrator is not None  # built and warmed up at the Start:
    assert op.integrator.engines  # pyFAI's engine (the slow part) is already there
    event = Event(
        metadata={"units": {"I": "counts"}, "n": 1}, payload={"img": frame(), "t": np.ones(2)}
    )
    out = op.process(event)
    assert isinstance(out, Event)
    assert sorted(out.payload) == ["2th", "I", "t"]
    assert out.payload["2th"].shape == out.payload["I"].shape == (64,)
    assert out.metadata == {"units": {"I": "counts", "2th": "deg"}, "n": 1}


def test_a_frame_of_another_shape_is_a_counted_drop_and_the_stop_says_so():
    op = started(Integrate(npt=32, **INI))
    assert op.process(Event(metadata={}, payload=frame(shape=(64, 64)))) is None
    assert op.process(Event(metadata={}, payload=np.zeros(SHAPE[0]))) is None
    assert isinstance(op.process(Event(metadata={}, payload=frame())), Event)
    assert op.drops() == {"shape_mismatch": 2}
    stop = op.process(Stop(data={"summed": ["hits"], "hits": 3}))
    assert isinstance(stop, Stop)
    assert stop.data["pyfai_dropped"] == 2 and stop.data["summed"] == ["hits", "pyfai_dropped"]


def test_a_run_without_geometry_drops_its_events_and_the_next_run_recovers():
    op = started(Integrate(npt=32))  # nothing in the options
    assert op.process(Event(metadata={}, payload=frame())) is None
    assert op.drops() == {"no_geometry": 1}
    op.process(Start(data=STREAM_V2_START))
    assert isinstance(op.process(Event(metadata={}, payload=frame())), Event)


def test_the_start_mask_is_used_and_a_mask_file_wins(tmp_path):
    hot = frame()
    hot[:, :10] = 60000  # a band of hot pixels the mask hides
    start_mask = np.zeros(SHAPE, np.uint32)
    start_mask[:, :10] = 4
    masked = started(Integrate(npt=32, **INI), {"pixel_mask": start_mask})
    out = masked.process(Event(metadata={}, payload=hot))
    assert isinstance(out, Event) and np.nanmax(out.payload["I"]) < 1000
    np.save(tmp_path / "none.npy", np.zeros(SHAPE, np.uint8))
    op = Integrate(npt=32, mask_file=tmp_path / "none.npy", **INI)
    unmasked = started(op, {"pixel_mask": start_mask})
    out = unmasked.process(Event(metadata={}, payload=hot))
    assert isinstance(out, Event) and np.nanmax(out.payload["I"]) > 1000


def test_pixels_of_the_dummy_value_are_left_out():
    hot = frame()
    hot[:, :10] = 65535  # what a DECTRIS detector puts in gaps without a mask
    op = started(Integrate(npt=32, dummy=65535, **INI))
    out = op.process(Event(metadata={}, payload=hot))
    assert isinstance(out, Event) and np.nanmax(out.payload["I"]) < 1000


def test_without_the_extra_the_stage_stops_naming_it(monkeypatch):
    for name in ("pyFAI", "pyFAI.detectors", "pyFAI.integrator.azimuthal", "pyFAI.units"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as if not installed
    op = Integrate(npt=32, **INI)  # the options check without pyFAI
    with pytest.raises(ConfigError, match=r"pip install 'arroyo\[pyfai\]'"):
        op.setup()


def test_the_module_imports_and_checks_its_options_without_pyfai():
    code = (
        "import sys; sys.modules['pyFAI'] = None\n"
        "from arroyo.io.pyfai import Integrate\n"
        "Integrate(npt=10, distance=0.1, unit='q_nm^-1')\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_without_a_shape_the_integrator_is_built_at_the_first_frame_and_kept():
    options = {k: v for k, v in INI.items() if k != "shape"}
    op = started(Integrate(npt=32, **options))
    assert op.integrator is None
    assert isinstance(op.process(Event(metadata={}, payload=frame())), Event)
    built = op.integrator
    assert built is not None and op.geometry is not None and op.geometry.shape == SHAPE
    op.process(Start(data={}))  # the same geometry next run: the same integrator
    op.process(Event(metadata={}, payload=frame()))
    assert op.integrator is built


# -- RadialProfile or pyFAI --------------------------------------------------------


def test_radial_profile_and_pyfai_agree_where_their_geometry_does():
    """One geometry both can express: no tilt, 1 mm pixels so that r_mm is pixels, no
    solid-angle or polarization correction, the same 100 bins from 0 to 100 px, and
    pyFAI without pixel splitting (RadialProfile puts each pixel in one bin by its
    centre). RadialProfile's centre (row, column) counts from the first pixel's
    centre, pyFAI's from its corner: hence the half pixel.

    With pixel splitting off they are the same histogram: the remaining difference
    is rounding (pyFAI keeps positions in float32), below 1e-6. The centre is off the
    pixel lattice so that no pixel lies exactly on a bin edge, where that rounding
    could move it to the neighbouring bin. pyFAI's default (bbox splitting) spreads
    each pixel over the bins its box covers: the profiles then differ by a fraction
    of the intensity change across one bin, well under 2% in the median here."""
    from stages.reduce import RadialProfile
    from stages.synthetic import DetectorSimulator

    cy, cx = 120.3, 130.2
    image = DetectorSimulator(frames=1, shape=(256, 256), seed=1, center=(cy, cx)).pool[0]
    ours = RadialProfile(center=(cy, cx), bins=100, r_max=100.0)
    expected = ours.process(Event(metadata={}, payload=image))
    assert isinstance(expected, Event)
    common = {
        "npt": 100, "unit": "r_mm", "distance": 1.0, "beam_center": (cx + 0.5, cy + 0.5),
        "pixel1": 1e-3, "pixel2": 1e-3, "correct_solid_angle": False,
        "radial_range": (0.0, 100.0),
    }  # fmt: skip
    exact = started(Integrate(method=("no", "histogram", "cython"), **common))
    got = exact.process(Event(metadata={}, payload=image))
    assert isinstance(got, Event)
    np.testing.assert_allclose(got.payload["r"], expected.payload["r"], rtol=1e-6)
    np.testing.assert_allclose(got.payload["I"], expected.payload["I"], rtol=1e-6)
    split = started(Integrate(**common)).process(Event(metadata={}, payload=image))
    assert isinstance(split, Event)
    relative = np.abs(split.payload["I"] / expected.payload["I"] - 1)
    assert np.median(relative) < 0.02


# -- threads -----------------------------------------------------------------------


def test_pyfai_honours_omp_num_threads():
    """Workers get OMP_NUM_THREADS=1 (arroyo.runtime.threads): pyFAI's OpenMP code
    must start no more threads for it than that."""
    script = textwrap.dedent("""
        import os, numpy as np
        from arroyo.io.pyfai import Integrate
        from arroyo.message import Event, Start
        op = Integrate(npt=50, distance=0.1, beam_center=(10.0, 10.0), wavelength=1e-10,
                       pixel1=75e-6, pixel2=75e-6, shape=(256, 256))
        op.setup(); op.process(Start(data={}))
        op.process(Event(metadata={}, payload=np.ones((256, 256), np.float32)))
        print(len(os.listdir("/proc/self/task")))
    """)

    def threads(n: int) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True,
            timeout=50, check=True, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        return int(done.stdout.split()[-1])

    one, four = threads(1), threads(4)
    assert four - one >= 3, (one, four)  # three more OpenMP threads for three more
