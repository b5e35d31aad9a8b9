"""Worker counts kept from ``arroyo scale`` (``RUN_DIR/workers.json``): they outlive
``down`` on purpose, so a later ``up`` starts the stage at the count it was scaled to.
So that nobody runs a different graph from the INI without knowing it, ``up`` and
``status`` name every stage whose kept count differs from the INI, and
``up --reset-scale`` returns them to the INI.
"""

from __future__ import annotations

from arroyo.control import supervise
from arroyo.control.render import forget_workers, recorded_workers
from arroyo.errors import ConfigError
from arroyo.topology import Topology


def _stages_of(topology: Topology, chains: tuple[str, ...]) -> list[str]:
    targets = supervise.chains_to_act_on(topology, chains)
    return [s for s in topology.stages if topology.stages[s].chain in targets]


def kept_scale(topology: Topology, chains: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``stage -> (kept count, INI count)`` for the stages of ``chains`` (default: all)
    whose kept count is not the INI's."""
    kept = recorded_workers(topology)
    return {
        stage: (kept[stage], topology.stages[stage].workers)
        for stage in _stages_of(topology, chains)
        if stage in kept and kept[stage] != topology.stages[stage].workers
    }


def _workers(n: int) -> str:
    return f"{n} worker{'s' * (n != 1)}"


def scale_notes(topology: Topology) -> list[str]:
    """One line per stage that runs (or will run) at a count the INI does not say."""
    return [
        f"{stage}: {_workers(kept)}, scaled at runtime; the INI says {ini} "
        f"(`arroyo up --reset-scale {topology.path}` returns to it)"
        for stage, (kept, ini) in kept_scale(topology).items()
    ]


def reset_scale(topology: Topology, chains: tuple[str, ...] = ()) -> list[str]:
    """Return the stages of ``chains`` to their INI worker counts and forget the kept
    ones. Running workers are added or drained as ``arroyo scale`` does it (no other
    process restarts); with supervisord down, the next render simply uses the INI.
    Returns one line per stage whose count changed."""
    if topology.multihost:
        msg = (
            f"{topology.path}: --reset-scale covers one host; with [hosts], "
            "`arroyo scale` each stage back to its INI count"
        )
        raise ConfigError(msg)
    changed = kept_scale(topology, chains)
    if supervise.is_running(topology):
        for stage, (_, ini) in changed.items():
            supervise.scale(topology, stage, ini)
    forget_workers(topology, _stages_of(topology, chains))
    return [
        f"{stage}: back to the INI's {_workers(ini)} (was {kept})"
        for stage, (kept, ini) in changed.items()
    ]
