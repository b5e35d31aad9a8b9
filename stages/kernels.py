"""Plain numpy work, importing nothing but numpy: the same function runs inside a stage
(``stages.basic:Temporaries``) and in the benchmark's plain-process ceiling, which must
not import zmq or arroyo (importing zmq changes how glibc's malloc behaves)."""

from __future__ import annotations

import numpy as np


def temporaries(frame: np.ndarray, rounds: int) -> float:
    """``rounds`` of ``np.sqrt(a * a + 1.0).sum()`` over a float64 copy ``a`` of the
    frame: every round makes two frame-sized temporaries (512 KiB for 256 x 256) and
    frees them, the allocation pattern of most reductions."""
    a = frame.astype(np.float64)
    total = 0.0
    for _ in range(rounds):
        total += float(np.sqrt(a * a + 1.0).sum())
    return total
