"""The benchmark's suites: which measurements, in which (interleaved) order.

Each suite returns plain JSON-able rows: the runs of every side and their medians.
A run that failed is kept with its error and left out of the medians.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from arroyo_bench.detector_suite import detectors
from arroyo_bench.hdf5_suite import nexus
from arroyo_bench.measure import Measure, interleaved, log
from arroyo_bench.plans import Plan
from arroyo_bench.run import MIB, SIZE_100B, Runner
from arroyo_bench.storage_suite import storage

FRAME_BYTES = 256 * 256 * 2  # the compute suite's frame: 256 x 256 uint16


def one_hop(runner: Runner, plan: Plan, hops: int) -> list[dict[str, Any]]:
    suite = "one_hop" if hops == 1 else "chain"
    transports = plan.transports if hops == 1 else plan.transports[:1]
    rows = [
        {"suite": suite, "transport": t, "size": s, "count": plan.count(s)}
        for t in transports
        for s in plan.sizes
    ]

    def run(row: dict[str, Any], side: str) -> Measure:
        t, s, n = row["transport"], row["size"], row["count"]
        if side == "raw":
            return lambda: runner.raw(t, s, n, hops=hops)
        op = "arroyo.stage:PassThrough" if hops == 2 else ""
        return lambda: runner.arroyo(t, s, n, operator=op)

    return interleaved(rows, ["raw", "arroyo"], plan.repeats, run)


def scaling(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Compute in a stage and its scaling, beside the true ceiling: the same numpy work
    (``stages.basic:Temporaries`` on a 256 x 256 uint16 frame) in 1 and 2 plain
    processes that import neither zmq nor arroyo."""
    size, n = FRAME_BYTES, plan.scale_events
    # A small window, so events go to whichever worker is free rather than being
    # dealt out ahead (the default window holds seconds of this work per worker).
    hwm = 8
    op = f"stages.basic:Temporaries rounds={plan.scale_rounds} hwm={hwm}"
    row: dict[str, Any] = {
        "suite": "scaling",
        "transport": "ipc",
        "size": size,
        "count": n,
        "rounds": plan.scale_rounds,
        "hwm": hwm,
    }

    def run(row: dict[str, Any], side: str) -> Measure:
        k = int(side[-1] if side.startswith("plain") else side[0])
        if side.startswith("plain"):
            return lambda: runner.plain(size, n, plan.scale_rounds, k)
        return lambda: runner.arroyo("ipc", size, n, operator=op, workers=k)

    sides = ["plain 1", "plain 2", "1 worker", "2 workers"]
    (row,) = interleaved([row], sides, max(1, plan.repeats - 1), run)
    row["ratio"] = _speedup(row, "1 worker", "2 workers")
    row["plain_speedup"] = _speedup(row, "plain 1", "plain 2")
    # compute in a stage / the same code in a plain process
    row["compute_ratio"] = _speedup(row, "plain 1", "1 worker")
    return row


def _speedup(row: dict[str, Any], one: str, two: str) -> float | None:
    a, b = row[one].get("msg_s"), row[two].get("msg_s")
    return b / a if a and b else None


def latency(runner: Runner, plan: Plan) -> list[dict[str, Any]]:
    rows = [
        {"suite": "latency", "transport": t, "size": SIZE_100B, "count": plan.latency_count,
         "rate": plan.latency_rate}
        for t in plan.transports
    ]  # fmt: skip

    def run(row: dict[str, Any], side: str) -> Measure:
        t, n, rate = row["transport"], row["count"], row["rate"]
        if side == "raw":
            return lambda: runner.raw(t, SIZE_100B, n, rate=rate)
        return lambda: runner.arroyo(t, SIZE_100B, n, rate=rate)

    return interleaved(rows, ["raw", "arroyo"], max(1, plan.repeats - 1), run)


def peer(runner: Runner, plan: Plan, check: Callable[[], str]) -> dict[str, Any]:

    reason = check()
    if reason:
        log(f"  peer arroyopy: n/a ({reason})")
        return {"suite": "peer", "rows": [], "note": reason}
    sizes = [s for s in plan.sizes if s in (SIZE_100B, MIB)] or list(plan.sizes[:1])
    rows: list[dict[str, Any]] = [
        {"suite": "peer", "transport": "ipc", "size": s, "count": plan.count(s)} for s in sizes
    ]

    def run(row: dict[str, Any], side: str) -> Measure:
        s, n = row["size"], row["count"]
        receiver = "raw-recv" if side == "raw" else "peer-recv"
        return lambda: runner.raw("ipc", s, n, receiver=receiver)

    rows = interleaved(rows, ["raw", "arroyopy"], max(1, plan.repeats - 1), run)
    failed = all("msg_s" not in r["arroyopy"] for r in rows)
    note = "arroyopy's ZMQListener (zmq.asyncio PULL) receiving the raw PUSH stream"
    if failed:
        errors = [run["error"] for r in rows for run in r["arroyopy"]["runs"] if "error" in run]
        note = "arroyopy installed but could not receive the stream: " + (errors or ["?"])[0][-300:]
    return {"suite": "peer", "rows": rows, "note": note}


def counters(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Cost of the counters: CPU per message of both ends with them on vs off (the
    throughput of single runs on a shared 2-core machine is too noisy for 5 %)."""
    row: dict[str, Any] = {
        "suite": "counters",
        "transport": "ipc",
        "size": SIZE_100B,
        "count": plan.count(SIZE_100B),
    }

    def run(row: dict[str, Any], side: str) -> Measure:
        env = {"ARROYO_STATS": "1" if side == "stats on" else "0"}
        return lambda: runner.arroyo("ipc", SIZE_100B, row["count"], env=env)

    (row,) = interleaved([row], ["stats off", "stats on"], plan.counter_repeats, run)
    off, on = row["stats off"].get("cpu_us"), row["stats on"].get("cpu_us")
    row["cost"] = on / off - 1 if on and off else None
    off, on = row["stats off"].get("msg_s"), row["stats on"].get("msg_s")
    row["throughput_cost"] = 1 - on / off if on and off else None
    return row


def curve(runner: Runner, plan: Plan) -> list[dict[str, Any]]:
    """What ``security = curve`` costs: one Arroyo hop over tcp, plain beside CURVE."""
    sizes = [s for s in (SIZE_100B, MIB) if s in plan.sizes] or [SIZE_100B]
    rows = [
        {"suite": "curve", "transport": "tcp", "size": s, "count": plan.count(s)} for s in sizes
    ]

    def run(row: dict[str, Any], side: str) -> Measure:
        s, n = row["size"], row["count"]
        return lambda: runner.arroyo("tcp", s, n, curve=side == "curve")

    return interleaved(rows, ["plain", "curve"], plan.repeats, run)


def _tiled(plan: Plan) -> dict[str, Any]:
    from arroyo_bench.tiled_suite import tiled  # (imports Tiled: the tiled extra)

    return tiled(plan)


def _brokers(runner: Runner, plan: Plan) -> dict[str, Any]:
    from arroyo_bench.broker_suite import brokers  # (pika, nats-py: their extras)

    return brokers(runner, plan)


def _pva(runner: Runner, plan: Plan) -> dict[str, Any]:
    from arroyo_bench.pva_suite import pva  # (pvapy: the epics extra)

    return pva(runner, plan)


def run_suites(runner: Runner, plan: Plan, peer_check: Callable[[], str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps: dict[str, Callable[[], Any]] = {
        "one_hop": lambda: one_hop(runner, plan, 1),
        "chain": lambda: one_hop(runner, plan, 2),
        "scaling": lambda: scaling(runner, plan),
        "latency": lambda: latency(runner, plan),
        "peer": lambda: peer(runner, plan, peer_check),
        "counters": lambda: counters(runner, plan),
        "curve": lambda: curve(runner, plan),
        "detectors": lambda: detectors(runner, plan),
        "storage": lambda: storage(runner, plan),
        "nexus": lambda: nexus(runner, plan),
        "tiled": lambda: _tiled(plan),
        "brokers": lambda: _brokers(runner, plan),
        "pva": lambda: _pva(runner, plan),
    }
    for name, step in steps.items():
        if name in plan.suites:
            log(f"== {name}")
            out[name] = step()
    return out
