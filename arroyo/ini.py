"""Reading a topology INI file: the parser, its errors as one line each, the
``[kind:NAME]`` sections and the ``input =`` syntax. Nothing here knows stage classes."""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterator
from pathlib import Path

from arroyo.errors import TopologyError
from arroyo.spec import Pattern

SECTION_KINDS = ("topology", "hosts", "chain", "stage")
UNNAMED = ("topology", "hosts")  # sections without a :NAME
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INPUT_RE = re.compile(r"^\s*([^\s(]+)\s*(?:\(([^)]*)\))?\s*$")


class Problems:
    """Collects problems, each prefixed with the file and section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(
        self, section: str, text: str, key: str | None = None, value: str | None = None
    ) -> None:
        where = f"{self.path}: [{section}]"
        if key is not None:
            where += f" {key}"
            if value is not None:
                where += f" = {value!r}"
        self.items.append(f"{where}: {text}")


def read_ini(path: Path, text: str | None = None) -> configparser.ConfigParser:
    """Parse the topology file ``path``, or ``text`` as if it were that file's."""
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        strict=True,
        empty_lines_in_values=False,
        # No [DEFAULT] magic: its keys would leak into every section. "" can never be a
        # section header, so a [DEFAULT] section is reported as an unknown section.
        default_section="",
    )
    if text is None:
        text = _read_text(path)
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as e:
        msg = f"{path}: [{e.section}] duplicate section (line {e.lineno}): merge the two"
        raise TopologyError([msg]) from None
    except configparser.DuplicateOptionError as e:
        msg = f"{path}: [{e.section}] {e.option}: duplicate key (line {e.lineno})"
        raise TopologyError([msg]) from None
    except configparser.MissingSectionHeaderError as e:
        msg = (
            f"{path}: [topology] not a valid INI file: line {e.lineno} comes before any "
            f"[section] header: {e.line.strip()!r}"
        )
        raise TopologyError([msg]) from None
    except configparser.ParsingError as e:
        lines = text.splitlines()
        msgs = [
            f"{path}: [{_section_at(lines, lineno)}] not a valid INI line {lineno}: "
            f"{lines[lineno - 1].strip()!r} (expected key = value)"
            for lineno, _ in e.errors
        ]
        raise TopologyError(msgs) from None
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        msg = f"{path}: [topology] not a valid INI file: {first}"
        raise TopologyError([msg]) from None
    return parser


def _read_text(path: Path) -> str:
    if not path.is_file():
        msg = f"{path}: no such topology file"
        raise TopologyError([msg])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        msg = f"{path}: [topology] not a valid INI file: not UTF-8 text (byte {e.start})"
        raise TopologyError([msg]) from None


def _section_at(lines: list[str], lineno: int) -> str:
    """The section header in force at 1-based ``lineno`` (``topology`` before any)."""
    for line in reversed(lines[: lineno - 1]):
        m = configparser.ConfigParser.SECTCRE.match(line.strip())
        if m:
            return m.group("header")
    return "topology"


def sections(
    parser: configparser.ConfigParser, problems: Problems
) -> Iterator[tuple[str, str, str]]:
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind not in SECTION_KINDS or (kind in UNNAMED) != (name == ""):
            problems.add(
                section,
                "unknown section (expected [topology], [hosts], [chain:NAME] or [stage:NAME])",
            )
            continue
        if name and not NAME_RE.match(name):
            problems.add(section, "names use letters, digits, '_', '.' and '-' only")
            continue
        yield section, kind, name


def parse_inputs(
    section: str, text: str, problems: Problems
) -> list[tuple[str, Pattern, str | None]]:
    inputs: list[tuple[str, Pattern, str | None]] = []
    for item in _split_inputs(text):
        m = INPUT_RE.match(item)
        if not m:
            problems.add(section, "expected NAME or NAME (pub|push [ENDPOINT])", "input", item)
            continue
        name, opts = m.group(1), (m.group(2) or "").split()
        pattern: Pattern = "push"
        endpoint = None
        for opt in opts:
            if opt in ("push", "pub"):
                pattern = opt  # type: ignore[assignment]
            elif "://" in opt:
                endpoint = opt
            else:
                problems.add(
                    section,
                    f"unknown link option {opt!r} (push, pub or an endpoint)",
                    "input",
                    item,
                )
        inputs.append((name, pattern, endpoint))
    return inputs


def _split_inputs(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]
