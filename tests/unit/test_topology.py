"""Topology INI loading: a corpus of broken files, and the resolved graph of valid ones.

Every file in tests/topologies/bad holds one mistake (one holds several) and starts
with comment lines that say what the loader must report:

    ; expect: <substring of a problem line>        (one or more)
    ; expect-section: <section of the first expect> (optional)
    ; expect-count: <number of problem lines>       (optional)

All files are checked in-process with ``load``; a few also through the real
``arroyo check`` command.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from arroyo.errors import TopologyError
from arroyo.topology import MAX_IPC_PATH, Topology, load

ROOT = Path(__file__).resolve().parents[2]
BAD_DIR = ROOT / "tests" / "topologies" / "bad"
BAD = sorted(BAD_DIR.glob("*.ini"))
DEMO = ROOT / "deploy" / "demo.ini"
TILED = ROOT / "deploy" / "tiled.ini"
ARROYO = Path(sys.executable).parent / "arroyo"
# The few corpus files also run through the real command line (each costs a process).
CLI_SAMPLE = [
    "not_ini.ini",
    "duplicate_key.ini",
    "class_no_module.ini",
    "cycle.ini",
    "several_mistakes.ini",
    "option_unknown_codec.ini",
]


@dataclass
class Expectation:
    substrings: list[str]
    section: str | None
    count: int | None


def expectation(path: Path) -> Expectation:
    substrings: list[str] = []
    section = count = None
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.removeprefix(";").strip().partition(": ")
        if not line.startswith(";") or not sep:
            continue
        if key == "expect":
            substrings.append(value.strip())
        elif key == "expect-section":
            section = value.strip()
        elif key == "expect-count":
            count = int(value)
    return Expectation(substrings, section, count)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(TopologyError) as info:
        load(path)
    return info.value.problems


def check_problem_lines(path: Path, lines: list[str]) -> None:
    """One line per problem, each naming the file and a section; the expected ones there."""
    prefix = f"{path.absolute()}: ["
    assert lines, f"{path.name}: no problem reported"
    for line in lines:
        assert "\n" not in line
        assert line.startswith(prefix), f"does not name file and section: {line!r}"
    exp = expectation(path)
    for substring in exp.substrings:
        assert any(substring in line for line in lines), f"{substring!r} not in {lines}"
    if exp.section is not None:
        where = f"{prefix}{exp.section}]"
        first = exp.substrings[0]
        assert any(line.startswith(where) and first in line for line in lines), (
            f"{first!r} not reported in [{exp.section}]: {lines}"
        )
    if exp.count is not None:
        assert len(lines) == exp.count, lines


# -- the corpus of broken topologies ---------------------------------------------------


def test_corpus_is_complete() -> None:
    assert len(BAD) >= 28
    for path in BAD:
        assert expectation(path).substrings, f"{path.name} has no '; expect:' line"
    assert set(CLI_SAMPLE) <= {p.name for p in BAD}


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_topology_reports_its_problem(path: Path) -> None:
    check_problem_lines(path, problems_of(path))


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_check_command_reports_problems_without_traceback(name: str) -> None:
    path = BAD_DIR / name
    proc = subprocess.run(
        [str(ARROYO), "check", str(path)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    check_problem_lines(path, lines)


def test_several_mistakes_are_reported_at_once() -> None:
    path = BAD_DIR / "several_mistakes.ini"
    problems = problems_of(path)
    assert len(problems) == 7, problems
    sections = {p.removeprefix(f"{path}: [").split("]")[0] for p in problems}
    assert sections == {"topology", "chain:main", "stage:det", "stage:op", "stage:sink"}


def test_a_broken_stage_is_not_also_reported_as_unknown() -> None:
    # op has no role; sink's input and the chain name it: that is not an unknown stage.
    problems = problems_of(BAD_DIR / "missing_role.ini")
    assert not [p for p in problems if "unknown stage" in p], problems


def test_missing_file_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "nope.ini"
    assert problems_of(path) == [f"{path}: no such topology file"]


def test_not_utf8_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[topology]\nname = caf\xe9\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: [topology] not a valid INI file: not UTF-8")


# -- valid topologies -------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "t.ini") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def link(topo: Topology, source: str, target: str):
    (found,) = [x for x in topo.links if (x.source, x.target) == (source, target)]
    return found


def test_demo_topology_resolves() -> None:
    topo = load(DEMO)
    assert topo.name == "demo"
    assert topo.path == DEMO
    assert topo.run_dir == (ROOT / ".arroyo" / "demo").resolve()
    dev = "correct__profile"
    assert topo.chains == {
        "demo": ("detector", "nexus", "correct", "profile", "writer", "sink", "viewer", dev)
    }
    stages = topo.stages
    assert {n: s.role for n, s in stages.items()} == {
        "detector": "listener",
        "nexus": "publisher",
        "correct": "operator",
        "profile": "operator",
        "writer": "publisher",
        "sink": "publisher",
        "viewer": "publisher",
        dev: "operator",
    }
    assert {n: s.workers for n, s in stages.items() if n != dev} == {
        "detector": 1,
        "nexus": 1,
        "correct": 2,
        "profile": 2,
        "writer": 1,
        "sink": 1,
        "viewer": 1,
    }
    assert [n for n, s in stages.items() if s.scalable] == ["correct", "profile"]
    assert [n for n, s in stages.items() if s.device] == [dev]
    assert all(s.chain == "demo" for s in stages.values())

    det = stages["detector"].options
    assert det == {
        "socket": "pull",
        "bind": False,
        "endpoint": "tcp://127.0.0.1:31001",
        "codec": "dectris-stream2",
    }
    assert isinstance(det["bind"], bool)
    assert stages["correct"].options == {}
    assert stages["profile"].options == {"bins": 128, "center": (135.68, 120.32)}
    assert stages["sink"].options["path"] == Path("../.arroyo/demo/out/events.jsonl")
    assert stages["viewer"].options == {"port": 8765, "scale": "log"}
    assert stages["nexus"].options == {"path": Path("../.arroyo/demo/out/nexus")}

    # The single-process side binds; scaled workers connect; two scaled stages in a
    # row get a forwarding device that binds on both of its sides.
    fan_out = link(topo, "detector", "correct")
    assert (fan_out.pattern, fan_out.binder) == ("push", "source")
    assert link(topo, "correct", dev).binder == "target"
    assert link(topo, dev, "profile").binder == "source"
    fan_in = link(topo, "profile", "sink")
    assert (fan_in.pattern, fan_in.binder) == ("push", "target")
    raw = link(topo, "detector", "nexus")  # every raw frame, on a link of its own
    assert (raw.pattern, raw.binder) == ("push", "target")
    tap = link(topo, "detector", "viewer")
    assert (tap.pattern, tap.binder) == ("pub", "target")
    profiles = link(topo, "profile", "viewer")
    assert (profiles.pattern, profiles.binder) == ("pub", "target")
    assert len(topo.links) == 8
    assert topo.socket_dir == topo.run_dir / "sock"
    for x in topo.links:
        assert x.endpoint.startswith(f"ipc://{topo.socket_dir}/")
    assert len({x.endpoint for x in topo.links}) == 8
    assert topo.inputs_of("sink") == [fan_in]
    assert set(topo.outputs_of("detector")) == {raw, fan_out, tap}

    # Sinks start first (lower priority number) and stop last; sources the other way.
    prio = {n: s.supervision.priority for n, s in stages.items()}
    assert prio["sink"] < prio["profile"] < prio[dev] < prio["correct"] < prio["detector"]
    assert prio["viewer"] < prio["detector"]


def test_tiled_demo_topology_resolves_beside_the_demo() -> None:
    """deploy/tiled.ini (scripts/demo --tiled): two chains, linked only through Tiled,
    on ports and a run_dir of their own so that it runs beside deploy/demo.ini."""
    topo = load(TILED)
    assert topo.name == "tiled"
    assert topo.run_dir == (ROOT / ".arroyo" / "tiled-demo").resolve()
    assert topo.chains == {
        "acquire": ("detector", "integrate", "tiled", "nexus"),
        "follow": ("follow", "viewer", "sink"),
    }
    stages = topo.stages
    assert {n: (s.role, s.workers) for n, s in stages.items()} == {
        "detector": ("listener", 1),
        "integrate": ("operator", 2),
        "tiled": ("publisher", 1),
        "nexus": ("publisher", 1),
        "follow": ("listener", 1),
        "viewer": ("publisher", 1),
        "sink": ("publisher", 1),
    }
    assert stages["integrate"].options == {"npt": 500, "unit": "q_nm^-1"}  # the rest: Start
    writer, follow = stages["tiled"].options, stages["follow"].options
    assert writer["url"] == follow["url"] == "http://127.0.0.1:8010"
    assert writer["node"] == follow["node"] == "saxs"
    assert follow["arrays"] == "q, I"
    assert {(x.source, x.target, x.pattern) for x in topo.links} == {
        ("detector", "integrate", "push"),
        ("detector", "nexus", "push"),
        ("integrate", "tiled", "push"),
        ("follow", "viewer", "pub"),
        ("follow", "sink", "push"),
    }
    demo = load(DEMO)
    assert stages["viewer"].options["port"] == 8766 != demo.stages["viewer"].options["port"]
    endpoint = stages["detector"].options["endpoint"]
    assert endpoint == "tcp://127.0.0.1:31002" != demo.stages["detector"].options["endpoint"]


def test_device_between_two_scaled_stages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [topology]
        name = dev
        [stage:det]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 3
        shape = 2
        [stage:a]
        role = operator
        class = stages.basic:Scale
        input = det
        workers = 3
        [stage:b]
        role = operator
        class = stages.basic:Burn
        input = a
        workers = 2
        [stage:sink]
        role = publisher
        class = stages.sinks:Discard
        input = b
        """,
    )
    topo = load(path)
    device = topo.stages["a__b"]
    assert device.device
    assert (device.role, device.workers, device.scalable) == ("operator", 1, False)
    assert device.inputs == ("a",)
    assert topo.stages["b"].inputs == ("a__b",)
    assert device.chain == topo.stages["b"].chain == "dev"
    # Both sides of each link to and from the device: the device binds.
    assert link(topo, "a", "a__b").binder == "target"
    assert link(topo, "a__b", "b").binder == "source"
    assert link(topo, "det", "a").binder == "source"
    assert link(topo, "b", "sink").binder == "target"
    assert not [x for x in topo.links if (x.source, x.target) == ("a", "b")]
    prio = {n: s.supervision.priority for n, s in topo.stages.items()}
    assert prio["sink"] < prio["b"] < prio["a__b"] < prio["a"] < prio["det"]


def test_no_chain_sections_make_one_chain_named_after_the_topology(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [topology]
        name = solo
        [stage:src]
        role = listener
        class = arroyo.io.zmq:ZMQListener
        endpoint = tcp://127.0.0.1:5997
        bind = yes
        [stage:out]
        role = publisher
        class = stages.sinks:JsonLinesLog
        path = ~/out.jsonl
        input = src (push tcp://127.0.0.1:5999)
        """,
    )
    topo = load(path)
    assert topo.chains == {"solo": ("src", "out")}
    assert {s.chain for s in topo.stages.values()} == {"solo"}
    assert topo.run_dir == tmp_path / ".arroyo" / "solo"
    assert topo.stages["src"].options == {"endpoint": "tcp://127.0.0.1:5997", "bind": True}
    assert topo.stages["out"].options["path"] == Path.home() / "out.jsonl"
    (only,) = topo.links
    assert only.endpoint == "tcp://127.0.0.1:5999"
    assert (only.pattern, only.binder) == ("push", "target")


def test_stage_settings_and_options_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [topology]
        name = typed
        run_dir = run
        stopwaitsecs = 12
        [chain:a]
        stages = det, fail
        [chain:b]
        stages = sink
        [stage:det]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 0x10
        shape = 3, 4, 5
        dtype = float32
        rate_hz = 2.5
        seed = 1_000
        [stage:fail]
        role = operator
        class = stages.basic:FailOn
        values = 1, 2, 3
        input = det
        scalable = false
        on_error = stop
        hwm = 10
        hwm_bytes = 1024
        max_message_bytes = 4096
        drain_timeout = 1.5
        tune_malloc = no
        priority = 7
        stopwaitsecs = 3
        startsecs = 0
        autorestart = TRUE
        environment = OMP_NUM_THREADS=1, FOO=a=b
        [stage:sink]
        role = publisher
        class = stages.sinks:Discard
        input = fail (pub)
        """,
    )
    topo = load(path)
    assert topo.run_dir == tmp_path / "run"
    assert topo.stopwaitsecs == 12
    assert topo.chains == {"a": ("det", "fail"), "b": ("sink",)}
    det = topo.stages["det"].options
    assert det == {
        "frames": 16,
        "shape": (3, 4, 5),
        "dtype": "float32",
        "rate_hz": 2.5,
        "seed": 1000,
    }
    fail = topo.stages["fail"]
    assert fail.options == {"values": (1, 2, 3)}
    assert (fail.scalable, fail.workers) == (False, 1)
    assert (fail.on_error, fail.hwm, fail.hwm_bytes) == ("stop", 10, 1024)
    assert (fail.max_message_bytes, fail.drain_timeout) == (4096, 1.5)
    assert (fail.tune_malloc, topo.stages["det"].tune_malloc) == (False, True)
    sup = fail.supervision
    assert (sup.priority, sup.stopwaitsecs, sup.startsecs, sup.autorestart) == (7, 3, 0, "true")
    assert sup.environment == (("OMP_NUM_THREADS", "1"), ("FOO", "a=b"))
    assert topo.stages["det"].supervision.stopwaitsecs == 12
    # A non-scalable operator binds its input and, fed to one process, is bound to.
    assert link(topo, "det", "fail").binder == "target"
    assert link(topo, "fail", "sink").pattern == "pub"


def test_rendered_programs_get_the_malloc_thresholds_unless_turned_off(tmp_path: Path) -> None:
    from arroyo.control.render import render

    path = write(
        tmp_path,
        """
        [topology]
        name = env
        [stage:det]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 1
        shape = 2
        [stage:op]
        role = operator
        class = stages.basic:Scale
        input = det
        environment = MALLOC_TRIM_THRESHOLD_=0
        [stage:sink]
        role = publisher
        class = stages.sinks:Discard
        input = op
        tune_malloc = false
        """,
    )
    programs = {
        block.split("]", 1)[0]: block for block in render(load(path)).split("[program:")[1:]
    }
    assert 'MALLOC_MMAP_THRESHOLD_="33554432",MALLOC_TRIM_THRESHOLD_="134217728"' in programs["det"]
    # the stage's own environment wins over Arroyo's default
    assert 'MALLOC_MMAP_THRESHOLD_="33554432",MALLOC_TRIM_THRESHOLD_="0"' in programs["op"]
    assert "MALLOC_" not in programs["sink"]


def test_workers_get_one_openmp_thread_unless_told_otherwise(tmp_path: Path, monkeypatch) -> None:
    from arroyo.control.render import render

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = write(
        tmp_path,
        """
        [topology]
        name = omp
        [stage:det]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 1
        shape = 2
        [stage:op]
        role = operator
        class = stages.basic:Decode
        input = det
        workers = 2
        environment = OMP_NUM_THREADS=4
        [stage:sink]
        role = publisher
        class = stages.sinks:Discard
        input = op
        """,
    )

    def programs() -> dict[str, str]:
        text = render(load(path))
        return {block.split("]", 1)[0]: block for block in text.split("[program:")[1:]}

    assert 'OMP_NUM_THREADS="1"' in programs()["det"]
    assert 'OMP_NUM_THREADS="4"' in programs()["op"]  # the stage's own environment wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does the one `arroyo up` runs in
    assert "OMP_NUM_THREADS" not in programs()["sink"]


def test_deep_run_dir_falls_back_to_a_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    deep.mkdir()
    path = write(
        deep,
        """
        [topology]
        name = deep
        run_dir = run
        [stage:a_rather_long_source_name]
        role = listener
        class = stages.synthetic:DetectorSimulator
        frames = 1
        shape = 1
        [stage:an_even_longer_operator_name]
        role = operator
        class = stages.basic:Scale
        input = a_rather_long_source_name
        workers = 2
        [stage:w2]
        role = operator
        class = stages.basic:Scale
        input = an_even_longer_operator_name
        workers = 2
        [stage:sink]
        role = publisher
        class = stages.sinks:Discard
        input = w2
        """,
    )
    topo = load(path)
    assert len(str(topo.run_dir)) > 100
    assert topo.socket_dir != topo.run_dir / "sock"
    assert len(topo.links) == 4  # one device between the two scaled operators
    for x in topo.links:
        assert x.endpoint.startswith(f"ipc://{topo.socket_dir}/")
        assert len(x.endpoint.removeprefix("ipc://").encode()) < MAX_IPC_PATH
    # The same run_dir always maps to the same short directory.
    assert load(path).socket_dir == topo.socket_dir


def test_check_command_prints_the_demo_graph() -> None:
    proc = subprocess.run(
        [str(ARROYO), "check", str(DEMO)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("detector", "reduce", "sink", "viewer"):
        assert name in proc.stdout
    assert "topology demo" in proc.stdout
