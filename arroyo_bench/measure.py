"""Interleaved measurement: for each repeat, every side of every row back to back,
so that noise hits all sides alike; medians of what succeeded."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from arroyo_bench.run import BenchError, median_of, size_label
from arroyo_bench.run import throughput as rates

Measure = Callable[[], dict[str, Any]]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _attempt(label: str, measure: Measure, size: int) -> dict[str, Any]:
    try:
        result = rates(measure(), size)
    except BenchError as e:
        log(f"  {label}: FAILED: {e}")
        return {"error": str(e)}
    extra = f" p99 {result['p99_us']:.0f} us" if "p99_us" in result else ""
    state = "" if result["complete"] else f" (INCOMPLETE: {result['count']} messages)"
    log(f"  {label}: {result['msg_s']:,.0f} msg/s {result['mb_s']:,.1f} MB/s{extra}{state}")
    return result


def interleaved(
    rows: list[dict[str, Any]], sides: list[str], repeats: int, run: Callable[..., Measure]
) -> list[dict[str, Any]]:
    """For each repeat, for each row, every side back to back: noise hits all alike."""
    for row in rows:
        for side in sides:
            row[side] = {"runs": []}
    for rep in range(repeats):
        for row in rows:
            for side in sides:
                label = f"{row['suite']} {row['transport']} {size_label(row['size'])} {side} "
                label += f"#{rep + 1}"
                row[side]["runs"].append(_attempt(label, run(row, side), row["size"]))
    for row in rows:
        for side in sides:
            runs = row[side]["runs"]
            for key in ("msg_s", "mb_s", "cpu_us", "p50_us", "p99_us", "p999_us"):
                value = median_of(runs, key)
                if value is not None:
                    row[side][key] = value
        base, other = row[sides[0]].get("msg_s"), row[sides[-1]].get("msg_s")
        row["ratio"] = other / base if base and other else None
    return rows
