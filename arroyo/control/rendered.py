"""The topology that runs, when its file no longer loads.

``arroyo up`` keeps a copy of the topology file it rendered in run_dir
(``rendered-topology.ini``, written beside ``supervisord.conf``). A typo saved into the
file while its stages run must not lock the user out of them: ``status``, ``top`` and
``down`` then load that copy (as if it were the file, so relative paths mean the same)
and say so in one line. ``check``, ``up`` and every command that would start something
still refuse the broken file.

Finding the copy without the file: run_dir is read from whatever of the file's
``[topology]`` section still parses; failing that (the file is gone, or broken before
its first section), from the running supervisords, whose rendered config names the
topology file it came from on its first line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from arroyo.control.render import CONF, RENDERED_TOPOLOGY, rendered_source
from arroyo.errors import ConfigError, TopologyError
from arroyo.topology import Topology, load, run_dir_hint


def load_running(path: str) -> tuple[Topology, str]:
    """The topology at ``path``, and "" when it loads; else the copy ``up`` kept of it
    and the line that says so. Raises the file's own error when there is no copy."""
    try:
        return load(path), ""
    except ConfigError as e:
        error = e
    source = Path(path).absolute()
    for run_dir in dict.fromkeys(_run_dirs(source)):
        copy = run_dir / RENDERED_TOPOLOGY
        if rendered_source(run_dir / CONF) != source or not copy.is_file():
            continue
        try:
            topology = load(source, copy.read_text(encoding="utf-8"))
        except (ConfigError, OSError):
            continue  # the copy does not load either (a stage's module broke, say)
        return topology, f"{_first(error)}; using the topology `arroyo up` started ({copy})"
    raise error


def _first(error: ConfigError) -> str:
    problems = error.problems if isinstance(error, TopologyError) else [str(error)]
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more: arroyo check)" if more else "")


def _run_dirs(source: Path) -> Iterator[Path]:
    hint = run_dir_hint(source)
    if hint is not None:
        yield hint
    yield from _supervised_run_dirs(source)


def _supervised_run_dirs(source: Path) -> Iterator[Path]:
    """run_dirs of the running supervisords whose config was rendered from ``source``."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not any(Path(word).name == "supervisord" for word in cmdline[:2]):
            continue
        with contextlib.suppress(ValueError, IndexError):
            conf = Path(cmdline[cmdline.index("-c") + 1])
            if conf.name == CONF and rendered_source(conf) == source:
                yield conf.parent
