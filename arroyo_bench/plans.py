"""What each mode of the benchmark measures (``--full``, ``--quick``, ``--smoke``)."""

from __future__ import annotations

from dataclasses import dataclass

from arroyo_bench.run import KIB, MIB, SIZE_100B


@dataclass(frozen=True)
class Plan:
    """How much of everything one mode measures."""

    mode: str
    sizes: tuple[int, ...]
    transports: tuple[str, ...]
    repeats: int
    max_msgs: int  # messages per throughput run, at most...
    byte_budget: int  # ...and about this many payload bytes
    suites: tuple[str, ...]
    latency_rate: float = 10_000.0
    latency_count: int = 30_000
    scale_events: int = 1_000
    scale_rounds: int = 12  # Temporaries rounds over a 256 x 256 frame: about 1.5 ms
    counter_repeats: int = 5
    detector_frames: int = 2_000  # frames of 2,162 x 2,068 uint16 per detector series

    def count(self, size: int) -> int:
        return max(100, min(self.max_msgs, self.byte_budget // size))


ALL_SUITES = ("one_hop", "chain", "scaling", "latency", "peer", "counters", "curve", "detectors",
              "storage", "nexus", "tiled", "brokers", "pva")  # fmt: skip
PLANS = {
    "full": Plan("full", (SIZE_100B, 64 * KIB, MIB, 4 * MIB), ("ipc", "tcp"), 5, 100_000,
                 2_000 * MIB, ALL_SUITES),
    "quick": Plan("quick", (SIZE_100B, 64 * KIB, MIB), ("ipc",), 2, 30_000, 300 * MIB,
                  ALL_SUITES, latency_count=10_000, scale_events=400, counter_repeats=2,
                  detector_frames=400),
    "smoke": Plan("smoke", (SIZE_100B,), ("ipc",), 1, 2_000, 2_000 * SIZE_100B,
                  ("one_hop", "chain", "scaling", "latency", "counters"), latency_count=2_000,
                  scale_events=100, scale_rounds=2, counter_repeats=1, detector_frames=50),
}  # fmt: skip
