"""The README's tour, followed as written: its files come from README.md's own code
blocks, and the commands are the tour's five, run with real processes.

The only change to the reader's text is the detector's port (a free one, so tests
never collide); everything else is the README verbatim.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import arroyo_bin, read_jsonl, wait_for
from tests.integration.conftest import arroyo, stage_procs, supervisord_procs

README = Path(__file__).resolve().parents[2] / "README.md"
TOUR_PORT = "5555"

pytestmark = pytest.mark.timeout(150)


def tour_section(text: str) -> str:
    """The README section whose heading contains "tour"."""
    sections = re.split(r"^## ", text, flags=re.M)
    found = [s for s in sections if "tour" in s.splitlines()[0].lower()]
    assert len(found) == 1, "README has exactly one section with 'tour' in its heading"
    return found[0]


def named_blocks(section: str) -> dict[str, str]:
    """Code blocks whose first line names a file: ``# NAME.py`` or ``; NAME.ini``."""
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", section, flags=re.M | re.S):
        first = block.splitlines()[0].strip()
        m = re.fullmatch(r"(?:#|;)\s*([\w.-]+\.(?:py|ini))", first)
        if m:
            files[m.group(1)] = block
    return files


def tour_commands(section: str) -> list[list[str]]:
    """The first plain code block after "Then:": one command per line, comments cut."""
    after = section.split("Then:", 1)[1]
    block = re.search(r"^```\n(.*?)^```", after, flags=re.M | re.S)
    assert block, "a command block follows 'Then:'"
    return [line.split("#")[0].split() for line in block.group(1).splitlines() if line.strip()]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_tour_blocks_are_named_and_complete() -> None:
    section = tour_section(README.read_text())
    files = named_blocks(section)
    assert set(files) == {"my_ops.py", "send_frames.py", "beamline.ini"}
    commands = [c[:2] for c in tour_commands(section)]
    assert commands == [
        ["arroyo", "check"],
        ["arroyo", "up"],
        ["python", "send_frames.py"],
        ["arroyo", "status"],
        ["arroyo", "down"],
    ]


def test_the_operator_test_snippet_runs(tmp_path: Path) -> None:
    """The snippet after "Test it without sockets", run beside the tour's my_ops.py."""
    section = tour_section(README.read_text())
    after = section.split("Test it without sockets", 1)[1]
    # the rest of that paragraph, then the block
    snippet = re.match(r"[^\n]*\n(?:[^\n]+\n)*\n```python\n(.*?)^```", after, flags=re.M | re.S)
    assert snippet, "a python block follows the paragraph 'Test it without sockets'"
    (tmp_path / "my_ops.py").write_text(named_blocks(section)["my_ops.py"])
    check = (
        "\nkinds = [type(m).__name__ for m in kept]"
        "\nassert kinds[0] == 'Start' and kinds[-1] == 'Stop' and 'Event' in kinds, kinds\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", snippet.group(1) + check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    section = tour_section(README.read_text())
    port = free_port()
    for name, text in named_blocks(section).items():
        (tmp_path / name).write_text(text.replace(f":{TOUR_PORT}", f":{port}"))
    topology = tmp_path / "beamline.ini"
    sink = tmp_path / "hits.jsonl"
    status_json = ["arroyo", "status", "beamline.ini", "--json"]
    try:
        for command in tour_commands(section):
            if command[:2] == ["arroyo", "status"]:
                # The reader looks once the run has arrived (and the sink's stats, written
                # once a second, say so); so does the test.
                wait_for(lambda: sink_runs(run(status_json, tmp_path)), 60)
            run(command, tmp_path)
            if command[:2] == ["arroyo", "status"]:
                stats = json.loads(run(status_json, tmp_path).stdout)
        records = read_jsonl(sink)
    finally:
        arroyo("down", str(topology), check=False)
        leftover = supervisord_procs(tmp_path / ".arroyo/beamline/supervisord.conf")
        leftover += stage_procs(topology)
        for p in leftover:
            p.kill()
    events = [r for r in records if r["kind"] == "Event"]
    assert [r["kind"] for r in records if r["kind"] != "Event"] == ["Start", "Stop"]
    assert len(events) == 50, f"{len(events)} bright frames at the sink, expected 50"
    assert all(r["payload"] == {"shape": [64, 64], "dtype": "<u2", "sum": r["payload"]["sum"]}
               for r in events)  # fmt: skip
    assert sorted(r["metadata"]["frame"] for r in events) == list(range(0, 100, 2))
    assert stats and all(row["errors"] == 0 for row in stats), stats
    runs = sink_runs(json.dumps(stats))
    assert [(r["received"], r["complete"]) for r in runs] == [(50, True)], runs


def sink_runs(status_json: str | subprocess.CompletedProcess[str]) -> list[dict]:
    text = status_json if isinstance(status_json, str) else status_json.stdout
    return [run for row in json.loads(text) if row["stage"] == "sink" for run in row["runs"]]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a tour command the way the reader's shell would find it (this venv's)."""
    program = {"python": sys.executable, "arroyo": arroyo_bin("arroyo")}[command[0]]
    result = subprocess.run(
        [program, *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result
