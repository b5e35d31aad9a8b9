"""Arroyo beside raw pyzmq, in one run (DESIGN §13): ``scripts/bench [--quick]``.

Every measurement starts fresh processes, the reference and Arroyo one after the
other for the same case, repeat after repeat, so machine noise hits both alike; the
table shows medians. Receivers time a stream from its first to its last message.

    one hop   raw PUSH -> PULL            vs  source stage -> sink stage
    chain     raw PUSH -> relay -> PULL   vs  source -> PassThrough operator -> sink
    scaling   source -> numpy operator at 1 and 2 workers -> sink, beside the true
              ceiling: the same numpy work in 1 and 2 plain processes that import
              neither zmq nor arroyo (arroyo_bench.plain)
    latency   paced 100 B stream: receive time - send time, both sides
    peer      raw PUSH -> arroyopy's ZMQ listener (when it installs) vs raw PULL
    counters  the one-hop 100 B case with ARROYO_STATS=1 and =0
    storage   Recorder vs plain f.write of the frames; Replay at max vs raw one hop
    nexus     a plain h5py loop writing 1 MiB frames vs NexusWriter in a stage
    tiled     Tiled's client writing runs vs TiledWriter; the TiledListener's latency
              vs Tiled's own Subscription (a local Tiled server; the tiled extra)
    brokers   pika / nats-py consuming and publishing vs the RabbitMQ and NATS ends
    pva       pvapy-hpc-consumer vs PvaListener on one pvapy-ad-sim-server stream

Child processes run in their own sessions and are killed (process group) on every
way out, Ctrl-C included. The peer package is only ever installed into the virtual
environment the bench runs in, never made a dependency of Arroyo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from arroyo_bench import report as bench_report
from arroyo_bench.plans import ALL_SUITES, PLANS, Plan
from arroyo_bench.run import Runner
from arroyo_bench.suites import run_suites


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` (and child cleanup) runs."""

    def handler(*_: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def ensure_peer(allow_install: bool) -> str:
    """'' when arroyopy can be imported (installing it into this venv if allowed),
    else the reason why not."""
    if importlib.util.find_spec("arroyopy") is not None:
        return ""
    if not allow_install:
        return "arroyopy not installed (--no-install)"
    if sys.prefix == sys.base_prefix:
        return "arroyopy not installed, and the bench only installs into a virtualenv"
    pins = Path(tempfile.mkdtemp()) / "pins.txt"
    # The peer must not move the versions Arroyo itself runs on.
    pins.write_text("".join(f"{p}=={v}\n" for p, v in bench_report.versions().items()))
    print("installing arroyopy into", sys.prefix, file=sys.stderr)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "arroyopy", "-c", str(pins)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return "pip install arroyopy timed out"
    finally:
        shutil.rmtree(pins.parent, ignore_errors=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return f"pip install arroyopy failed: {lines[-1] if lines else proc.returncode}"
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="under two minutes: fewer "
                      "messages and repeats, ipc only, no 4 MiB")  # fmt: skip
    mode.add_argument("--smoke", action="store_true", help="a few seconds: 100 B only")
    p.add_argument("--json", type=Path, default=Path("bench-results/latest.json"),
                   help="where to write the results (default: %(default)s)")  # fmt: skip
    p.add_argument("--only", default="", help=f"comma-separated suites of {','.join(ALL_SUITES)}")
    p.add_argument("--repeats", type=int, default=0, help="override the mode's repeats")
    p.add_argument("--no-install", action="store_true", help="never pip install arroyopy")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.only:
        plan = _replace(plan, suites=tuple(s for s in args.only.split(",") if s in ALL_SUITES))
    if args.repeats > 0:
        plan = _replace(plan, repeats=args.repeats, counter_repeats=args.repeats)
    root = Path(tempfile.mkdtemp(prefix="abench-"))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    runner = Runner(root)
    try:
        with exit_on_sigterm():
            results = run_suites(runner, plan, lambda: ensure_peer(not args.no_install))
    except KeyboardInterrupt:
        print("interrupted; every benchmark process was stopped", file=sys.stderr)
        return 130
    finally:
        runner.children.kill_all()
        if args.keep:
            print("work directory kept:", root, file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    results = {
        "mode": plan.mode,
        "plan": asdict(plan),
        "machine": {
            **bench_report.machine(),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        },
        **results,
        "seconds": round(time.monotonic() - started, 1),
    }
    results["targets"] = bench_report.targets(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(bench_report.markdown(results))
    print(f"\n(JSON: {args.json}; {results['seconds']:.0f} s)", file=sys.stderr)
    return 0


def _replace(plan: Plan, **changes: Any) -> Plan:
    return Plan(**{**asdict(plan), **changes})


if __name__ == "__main__":
    sys.exit(main())
