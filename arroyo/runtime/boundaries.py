"""Runs belong to the runtime: what an operator may return around run boundaries.

A run is made by the listener stage that stamps it (``SourceOperator``): its origin,
its id, its predecessor. Downstream, the fan-ins of scaled stages rebuild every run
from the workers' shares using that bookkeeping, so a boundary that an operator
builds in the middle of a run cannot mean anything consistent: a worker sees only
its share (at two workers, "split the run at event 5" would split one worker's share
and not the other's), and a Start with no origin would be filed under no run at all.

So, for each message it is given, an operator's results are vetted here:

* for a ``Start``: exactly one Start goes out, first: the first Start it returned
  (its data; run, seq and routing are the input's), else the input itself;
* for a ``Stop``: exactly one Stop goes out, last, chosen the same way;
* for an ``Event``: no boundary goes out;
* every other Start or Stop is refused (``built_boundary``), and so is an event that
  claims another run than its input's (``foreign_run``). The caller counts each as
  an error and a drop by reason; events stay in the run they were returned in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arroyo.message import Message, Start, Stop

BUILT_BOUNDARY = "built_boundary"
FOREIGN_RUN = "foreign_run"


@dataclass
class Vetted:
    """What goes out for one input message, and what was refused (reason, message)."""

    outputs: list[Message] = field(default_factory=list)
    refused: list[tuple[str, Message]] = field(default_factory=list)
    restored: bool = False  # the operator returned no boundary: the input's goes out


def keep_run(source: Message, outputs: list[Message]) -> Vetted:
    """The results of ``process(source)`` that keep ``source``'s run whole (see the
    module docstring). ``outputs`` are already stamped (``outputs_of``)."""
    kind = type(source) if isinstance(source, Start | Stop) else None
    vetted = Vetted()
    boundary: Message | None = None
    for out in outputs:
        if out.run != source.run:
            vetted.refused.append((FOREIGN_RUN, out))
        elif not isinstance(out, Start | Stop):
            vetted.outputs.append(out)
        elif type(out) is kind and boundary is None:
            boundary = out
        else:
            vetted.refused.append((BUILT_BOUNDARY, out))
    if kind is None:
        return vetted
    if boundary is None:
        boundary, vetted.restored = source, True
    elif boundary is not source:
        # a rebuilt boundary keeps the run's identity and bookkeeping
        boundary.seq, boundary.routing = source.seq, dict(source.routing)
    if kind is Start:
        vetted.outputs.insert(0, boundary)
    else:
        vetted.outputs.append(boundary)
    return vetted
