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

from arroyo.errors import TopologyError
from arroyo.topology import describe, load

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
    docs = ("stages.md", "foreign-frames.md", "redis.md", "topology.md", "operations.md",
            "detectors.md", "storage.md", "tiled.md", "epics.md",
            "brokers.md")  # fmt: skip
    for doc in docs:
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


# -- what the docs say about the repository itself ------------------------------------

ROOT = DOCS.parent
DEMO = ROOT / "deploy" / "demo.ini"
TILED = ROOT / "deploy" / "tiled.ini"


def doc_section(doc: str, heading: str) -> str:
    """The text of ``doc`` under the ``## `` heading that starts with ``heading``."""
    sections = re.split(r"^## ", (DOCS / doc).read_text(), flags=re.M)
    (found,) = [s for s in sections if s.startswith(heading)]
    return found


def code_blocks(text: str, lang: str = "") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def without_comments(text: str) -> str:
    """An INI text as the docs print it: comments and their blank lines gone."""
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith((";", "#")):
            continue
        line = re.split(r"\s[;#]", line, maxsplit=1)[0].rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def test_topology_md_first_example_is_deploy_demo_ini() -> None:
    section = doc_section("topology.md", "1. A first example")
    assert "`deploy/demo.ini` without its comments" in section
    assert code_blocks(section, "ini")[0] == without_comments(DEMO.read_text())


def test_tiled_md_shows_deploy_tiled_ini() -> None:
    section = doc_section("tiled.md", "The Tiled demo")
    assert "`deploy/tiled.ini` without its comments" in section
    assert code_blocks(section, "ini")[0] == without_comments(TILED.read_text())


def test_topology_md_shows_what_check_prints_for_the_demo() -> None:
    section = doc_section("topology.md", "1. A first example")
    printed = code_blocks(section.split("`arroyo check deploy/demo.ini` prints:", 1)[1])[0]
    topology = load(DEMO)
    # the doc writes the clone's folder as /…, and the socket folder as under run_dir
    # (where a short clone path puts it)
    text = describe(topology).replace(str(topology.socket_dir), "/…/.arroyo/demo/sock")
    assert printed == text.replace(str(ROOT), "/…") + "\n"


CHECK_EXAMPLE = """
[topology]
name = x

[chain:main]
stages = det, op, ghost

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = abc
shape = 4, 4

[stage:op]
class = stages.basic:Scale
input = det
"""


def test_topology_md_check_messages_are_what_check_prints(tmp_path: Path) -> None:
    section = doc_section("topology.md", "11. What `arroyo check` reports")
    path = tmp_path / "topo.ini"
    path.write_text(CHECK_EXAMPLE)
    with pytest.raises(TopologyError) as caught:
        load(path)
    printed = {p.replace(str(path), "/abs/path/topo.ini") for p in caught.value.problems}
    quoted = code_blocks(section)[0].splitlines()
    assert set(quoted) <= printed, printed
    # the lists of allowed keys and sections, quoted in the tables, as the loader says them
    for bad in ("topology_unknown_key", "chain_unknown_key", "unknown_section"):
        with pytest.raises(TopologyError) as caught:
            load(ROOT / "tests" / "topologies" / "bad" / f"{bad}.ini")
        (problem,) = caught.value.problems
        expected = "(expected " + problem.split("(expected ", 1)[1]
        assert expected in section, f"{bad}: docs/topology.md §11 lacks {expected!r}"


def test_every_markdown_file_the_docs_name_exists() -> None:
    for doc in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for name in set(re.findall(r"[\w./-]+\.md\b", doc.read_text())):
            where = [ROOT / name, DOCS / name, doc.parent / name]
            assert any(p.exists() for p in where), f"{doc.name} names {name}, not in the repo"
