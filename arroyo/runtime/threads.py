"""One compute thread per worker process, by default.

Libraries built with OpenMP (bitshuffle's decoder, pyFAI's integrators) start as many
threads as the machine has cores in every process that uses them. A stage scales by
workers instead: N workers of M threads each would ask for N x M cores, and OpenMP
threads that wait for a core spin on it (measured here: bitshuffle's decoder at two
threads per worker, two workers on two cores, ran slower than one worker).

So a worker's OpenMP runtime gets ``OMP_NUM_THREADS=1`` unless the environment already
says otherwise: set it in the shell ``arroyo up`` runs in, or per stage with
``environment = OMP_NUM_THREADS=4`` (docs/topology.md), for a stage of one worker that
should use more cores.
"""

from __future__ import annotations

import os

ENVIRONMENT = {"OMP_NUM_THREADS": "1"}


def defaults() -> dict[str, str]:
    """What a rendered worker's environment gets: nothing the environment sets itself."""
    return {k: v for k, v in ENVIRONMENT.items() if k not in os.environ}


def one_thread() -> None:
    """In this process, before any OpenMP runtime reads its environment (at the import
    of the library that links it)."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
