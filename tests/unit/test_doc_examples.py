"""Every INI example in the docs passes ``arroyo check``'s loader.

A block that is a whole topology is checked as it stands. A block of stage sections
(docs/stages.md: "``det`` is a listener stage defined elsewhere in the file") is checked
inside the smallest topology that holds it: a ``[topology]`` section, and a simulated
detector for every input the block names but does not define.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from arroyo.topology import load

DOCS = Path(__file__).resolve().parents[2] / "docs"
STAND_IN = """
[stage:{name}]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 1
shape = 8, 8
"""


def ini_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in ("stages.md", "foreign-frames.md", "redis.md", "topology.md", "operations.md"):
        text = (DOCS / doc).read_text()
        for i, block in enumerate(re.findall(r"^```ini\n(.*?)^```", text, flags=re.M | re.S)):
            found.append((f"{doc}#{i + 1}", block))
    return found


def as_topology(block: str) -> str:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read_string(block)
    text = block if parser.has_section("topology") else "[topology]\nname = example\n" + block
    defined = {s.partition(":")[2] for s in parser.sections() if s.startswith("stage:")}
    named = {
        item.split("(")[0].strip()
        for s in parser.sections()
        for item in parser.get(s, "input", fallback="").split(",")
        if item.strip()
    }
    for name in sorted(named - defined):
        text += STAND_IN.format(name=name)
    return text


@pytest.mark.parametrize(("where", "block"), ini_blocks(), ids=[w for w, _ in ini_blocks()])
def test_doc_ini_example_checks(where: str, block: str, tmp_path: Path) -> None:
    path = tmp_path / "example.ini"
    path.write_text(as_topology(block))
    load(path)  # what `arroyo check` runs; raises TopologyError listing every problem
