"""The pyFAI stage with real processes under supervisord: a run of 512x512 frames
through ``arroyo.io.pyfai:Integrate`` at two workers into a run folder; every profile
is compared with pyFAI's own ``integrate1d`` on the same frame, with an integrator
built here, in the test process, straight from pyFAI's classes."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import arroyo_bin, need_extra, wait_for


def need_pyfai() -> None:
    """The pyfai extra (pyFAI), as ``need_extra``."""
    need_extra("pyfai", "pyFAI")


need_pyfai()

SHAPE = (512, 512)
NPT = 300
FRAMES = 24

SYNTHETIC = """
[topology]
name = fai
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = stages.synthetic:DetectorSimulator
frames = %(frames)d
shape = 512, 512
seed = 5

[stage:integrate]
role = operator
class = arroyo.io.pyfai:Integrate
input = detector
workers = 2
npt = %(npt)d
unit = q_nm^-1
distance = 0.1
beam_center = 250.5, 270.25
wavelength = 1.0e-10
pixel1 = 75e-6
pixel2 = 75e-6
shape = 512, 512
polarization_factor = 0.95

[stage:sink]
role = publisher
class = stages.writers:RunFolderWriter
path = {tmp}/runs
input = integrate
"""

STREAM = """
[topology]
name = faidet
run_dir = {tmp}/.arroyo

[stage:detector]
role = listener
class = arroyo.io.zmq:ZMQListener
socket = pull
bind = false
endpoint = %(endpoint)s
codec = dectris-stream2

[stage:integrate]
role = operator
class = arroyo.io.pyfai:Integrate
input = detector
workers = 2
npt = %(npt)d
unit = q_A^-1

[stage:sink]
role = publisher
class = stages.writers:RunFolderWriter
path = {tmp}/runs
input = integrate
"""


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def reference(
    dist: float,
    center_xy: tuple[float, float],
    pixel: float,
    wavelength: float,
) -> Any:
    """An integrator built here from pyFAI's classes (not through arroyo)."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    detector = Detector(pixel, pixel, max_shape=SHAPE)
    x, y = center_xy
    return AzimuthalIntegrator(
        dist=dist, poni1=y * pixel, poni2=x * pixel, wavelength=wavelength, detector=detector
    )


def one_run(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The run folder's stop, its events (metadata) and arrays, once it is closed."""
    folder = wait_for(
        lambda: next(
            (f for f in (tmp_path / "runs").glob("run_*") if (f / "stop.json").exists()), None
        ),
        timeout=50,
        interval=0.2,
    )
    stop = json.loads((folder / "stop.json").read_text())
    events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
    with np.load(folder / "frames.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz}
    return stop, events, arrays


def profile(arrays: dict[str, Any], seq: int, radial: str) -> tuple[np.ndarray, np.ndarray]:
    return arrays[f"frame_{seq:06d}_{radial}"], arrays[f"frame_{seq:06d}_I"]


@pytest.mark.timeout(60)
def test_two_workers_give_what_pyfai_gives_on_each_frame(tmp_path, supervised):
    from stages.synthetic import DetectorSimulator

    supervised(SYNTHETIC % {"frames": FRAMES, "npt": NPT})
    stop, events, arrays = one_run(tmp_path)
    assert stop["complete"] and stop["written"] == FRAMES, stop
    assert stop["data"]["pyfai_dropped"] == 0
    pool = DetectorSimulator(frames=1, shape=SHAPE, seed=5).pool
    ai = reference(0.1, (250.5, 270.25), 75e-6, 1e-10)
    for event in events:
        assert event["metadata"]["units"] == {"q": "nm^-1"}
        q, i = profile(arrays, event["seq"], "q")
        assert q.shape == i.shape == (NPT,)
        want = ai.integrate1d(
            pool[event["metadata"]["pool"]], NPT, unit="q_nm^-1", polarization_factor=0.95
        )
        np.testing.assert_allclose(q, want.radial, rtol=1e-6)
        np.testing.assert_allclose(i, want.intensity, rtol=1e-5)


@pytest.mark.timeout(90)
def test_geometry_and_mask_come_from_a_stream_v2_start(tmp_path, supervised):
    from arroyo.io import simformats, simframes
    from arroyo.io.simulate import Settings, Simulator
    from tests.conftest import need_detectors

    need_detectors()
    endpoint = free_endpoint()
    supervised(textwrap.dedent(STREAM) % {"endpoint": endpoint, "npt": NPT})
    args = ["--format", "dectris-stream2", "--dtype", "uint16", "--compression", "bslz4",
            "--shape", "512,512", "--images", str(FRAMES), "--seed", "9",
            "--header-detail", "all"]  # fmt: skip
    result = subprocess.run(
        [arroyo_bin("arroyo"), "simulate", "--endpoint", endpoint, "--linger", "20", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stop, events, arrays = one_run(tmp_path)
    assert stop["complete"] and stop["written"] == FRAMES, stop
    sent = Simulator(Settings(shape=SHAPE, seed=9, header_detail="all"))
    mask = simframes.pixel_mask(SHAPE, 9) != 0
    assert mask.any()  # the gaps and hot pixels: a mask that matters
    ai = reference(
        simformats.DISTANCE,
        simframes.Geometry(SHAPE).beam_center,
        simformats.PIXEL_SIZE,
        1e-10,
    )
    for event in events:
        assert event["metadata"]["units"] == {"q": "A^-1"}
        q, i = profile(arrays, event["seq"], "q")
        frame = sent.frame(event["metadata"]["image_id"])[0]
        want = ai.integrate1d(frame, NPT, unit="q_A^-1", mask=mask)
        np.testing.assert_allclose(q, want.radial, rtol=1e-6)
        np.testing.assert_allclose(i, want.intensity, rtol=1e-5)
        # without the mask the gaps' NODATA would dominate: the mask was used
        assert np.nanmax(i) < simframes.nodata(np.dtype("uint16")) / 2


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    ("option", "named"),
    [("unit = q_parsec", "unit = 'q_parsec'"), ("npt = 0", "npt"), ("distance = -2", "distance")],
)
def test_a_bad_option_stops_the_worker_with_one_line_and_exit_2(
    tmp_path, topo, stages, option, named
):
    text = SYNTHETIC % {"frames": 1, "npt": NPT}
    key = option.split(" = ")[0]  # a key only the integrate stage has: replaced
    text = re.sub(rf"^{key} = .*$", option, text, count=1, flags=re.M)
    path = topo(text.replace("workers = 2\n", "workers = 1\n", 1))
    stages.start(path, "integrate")
    assert stages.wait("integrate.0", timeout=30) == 2
    log = stages.log("integrate.0")
    assert named in log and "Traceback" not in log, log


@pytest.mark.timeout(90)
def test_frames_of_another_shape_are_drops_in_the_stages_stats(tmp_path, topo, stages):
    """An operator's own drops (``Integrate.drops()``) reach the stage's counters, as a
    listener's or a publisher's do: ``arroyo status`` shows them by reason."""
    text = SYNTHETIC % {"frames": 6, "npt": NPT}
    text = text.replace("shape = 512, 512\npolarization", "shape = 256, 256\npolarization")
    path = topo(text.replace("workers = 2\n", "workers = 1\n", 1))
    for stage in ("sink", "integrate", "detector"):
        stages.start(path, stage)

    def drops() -> dict[str, int] | None:
        try:
            stats = json.loads((tmp_path / ".arroyo" / "stats" / "integrate.0.json").read_text())
        except (OSError, ValueError):
            return None
        return stats["drops"] if stats["drops"].get("shape_mismatch") == 6 else None

    assert wait_for(drops, timeout=60) == {"shape_mismatch": 6}
    status = subprocess.run(
        [arroyo_bin("arroyo"), "status", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"shape_mismatch": 6' in status.stdout, status.stdout
    assert stages.stop_all()["integrate.0"] == 0
