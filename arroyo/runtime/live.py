"""Live parameters: options of a running stage changed without a restart (DESIGN §15).

``arroyo set`` converts the new values with the INI converters and writes them, as the
INI strings, to ``RUN_DIR/live/STAGE.json`` (``{"version": n, "values": {key: text}}``,
replaced atomically). Every worker of the stage watches that file from a side thread
(a ``stat`` every ``POLL`` seconds) and converts what it finds; the main thread applies
it between two messages (``Live.apply_pending``), calls the stage object's
``apply_live``, logs the run and sequence number it took effect at, and reports the
applied version in its stats. A worker that starts (or restarts) builds its stage
object with the stored values already in place. ``arroyo down`` removes the file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from arroyo import convert
from arroyo.errors import TopologyError
from arroyo.message import Message
from arroyo.options import class_options
from arroyo.topology import Topology

log = logging.getLogger("arroyo.live")

POLL = 0.2


def live_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "live" / f"{stage}.json"


def read_live(run_dir: Path, stage: str) -> tuple[int, dict[str, str]]:
    """The stored version and raw values for ``stage`` ((0, {}) when there are none)."""
    try:
        data = json.loads(live_path(run_dir, stage).read_text())
        return int(data["version"]), {str(k): str(v) for k, v in data["values"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return 0, {}


def write_live(run_dir: Path, stage: str, version: int, values: dict[str, str]) -> None:
    path = live_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": version, "values": values}))
    os.replace(tmp, path)


def live_options(cls: type) -> tuple[str, ...]:
    return tuple(getattr(cls, "live_options", ()))


def convert_live(cls: type, raw: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Convert ``raw`` by ``cls.__init__``'s annotations; returns values and problems
    (a key that is not live, a value its converter refuses), one line each."""
    allowed = live_options(cls)
    _, hints, _ = class_options(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, text in raw.items():
        if key not in allowed:
            names = ", ".join(allowed) or "none"
            problems.append(f"{key}: not a live option of {cls.__name__} (live: {names})")
            continue
        annotation = hints.get(key, str)
        try:
            values[key] = convert.converter_for(annotation)(text)
        except (TypeError, ValueError) as e:
            problems.append(f"{key} = {text}: {e} ({convert.describe(annotation)})")
    return values, problems


class Live:
    """One worker's view of its stage's live values."""

    def __init__(self, run_dir: Path, stage: str, cls: type) -> None:
        self.run_dir = run_dir
        self.stage = stage
        self.cls = cls
        # stat before reading: a change in between is seen by the first poll
        self._stat: tuple[int, int, int] | None = self._stat_now()
        self.version, raw = read_live(run_dir, stage)
        self.values, problems = convert_live(cls, raw)
        for p in problems:
            log.warning("stored live value ignored: %s", p)
        self.raw = {k: raw[k] for k in self.values}
        self.where: dict[str, int | None] | None = None  # run/seq the last change applied at
        self.error = ""
        # (version, raw, converted) seen by the watcher, not yet applied; the main
        # thread reads this one attribute per message.
        self.pending: tuple[int, dict[str, str], dict[str, Any]] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # -- watcher side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="arroyo-live")
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _stat_now(self) -> tuple[int, int, int] | None:
        try:
            st = live_path(self.run_dir, self.stage).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _watch(self) -> None:
        while not self._done.wait(POLL):
            self.poll()

    def poll(self) -> None:
        now = self._stat_now()
        if now == self._stat or now is None:
            self._stat = now
            return
        self._stat = now
        version, raw = read_live(self.run_dir, self.stage)
        if version <= self.version:
            return
        values, problems = convert_live(self.cls, raw)
        for p in problems:
            log.warning("live value ignored: %s", p)
        self.pending = (version, {k: raw[k] for k in values}, values)

    # -- main-thread side --------------------------------------------------------------

    def apply_pending(
        self, target: Any, next_message: Message | None, current_run: int | None = None
    ) -> None:
        """Apply what the watcher found to ``target`` (the stage's object): before
        ``next_message``, or while idle (None) during ``current_run``."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        version, raw, values = pending
        changed = {k: v for k, v in values.items() if self.values.get(k, _UNSET) != v}
        try:
            if changed:
                target.apply_live(dict(changed))
        except Exception as e:
            self.version = version
            self.error = f"version {version} refused: {type(e).__name__}: {e}"
            log.error("live change refused by %s: %s", type(target).__name__, e)
            return
        self.version, self.error = version, ""
        self.values.update(values)
        self.raw.update(raw)
        if next_message is not None:
            self.where = {"run": next_message.run, "seq": next_message.seq}
            at = f"from run {next_message.run} seq {next_message.seq}"
        else:
            self.where = {"run": current_run, "seq": None}
            at = f"while idle (run {current_run or '-'})"
        text = ", ".join(f"{k}={raw[k]}" for k in changed) or "no change"
        log.info("live: %s (version %d) applied %s", text, version, at)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.raw.items())

    def state(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "values": dict(self.raw),
            "where": self.where,
            "error": self.error,
        }


_UNSET = object()


# -- the side that changes them: ``arroyo set`` and the dashboard ----------------------


def set_live(topology: Topology, stage: str, values: dict[str, str]) -> int:
    """Check ``values`` (KEY -> INI text) for ``stage`` and store them for its workers;
    returns the new version. TopologyError, with one line per problem and nothing
    stored, for an unknown stage, a key that is not live or a value refused."""
    spec = topology.stage(stage)
    where = f"{topology.path}: [stage:{stage}]"
    if not values:
        raise TopologyError([f"{where}: nothing to set (give KEY=VALUE)"])
    try:
        cls = spec.load_class()
    except Exception as e:
        raise TopologyError([f"{where}: cannot load {spec.class_path}: {e}"]) from e
    raw = {k.strip(): v.strip() for k, v in values.items()}
    _, problems = convert_live(cls, raw)
    if problems:
        raise TopologyError([f"{where} {p}" for p in problems])
    path = live_path(topology.run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version, stored = read_live(topology.run_dir, stage)
        write_live(topology.run_dir, stage, version + 1, {**stored, **raw})
    return version + 1


def forget_live(run_dir: Path, stages: list[str]) -> None:
    """``arroyo down``: the stages' live values are gone with their run."""
    for stage in stages:
        for path in (live_path(run_dir, stage), live_path(run_dir, stage).with_suffix(".lock")):
            path.unlink(missing_ok=True)
