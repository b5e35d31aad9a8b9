"""Plain pvapy programs for the EPICS tests, run as their own processes (each reads
``EPICS_PVA_*`` from its environment, which a test sets to private ports): a server
that publishes NTNDArrays with the ``uniqueId``\\ s a test asks for, and a client that
records what a PV serves. Neither imports Arroyo.

    python tests/pva_tools.py serve PV IDS [--bad ID] [--fps F] [--hold S] [--acquire PV]
    python tests/pva_tools.py watch OUT.npz PV[,PV...] COUNT [--seconds S]

``serve`` publishes frame ``i`` = ``frame(i)`` for each id in IDS (``1-20,31-40``),
an NTNDArray with an unknown codec at ``--bad``, then stays up ``--hold`` seconds.
With ``--go FILE`` it publishes once FILE exists. With ``--acquire PV`` it also
serves an acquire state (an NTScalar int), and IDS separated by ``/`` are
acquisitions: the state is 1 while each one is published.
``watch`` monitors the PVs until COUNT updates in all (or the time is up) and saves
each update's value as ``PV/i`` (plus ``PV/i/uniqueId`` for an NTNDArray)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (24, 32)  # rows, columns


def frame(i: int) -> np.ndarray:
    return (np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint16).reshape(SHAPE) + i).astype(np.uint16)


def ids(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def serve(args: argparse.Namespace) -> None:
    import pvaccess as pva

    server = pva.PvaServer()
    server.addRecord(args.pv, pva.NtNdArray(), None)
    if args.acquire:
        server.addRecord(args.acquire, pva.NtScalar(pva.INT, 0), None)
    server.start()
    print("serving", flush=True)
    time.sleep(args.delay)
    while args.go and not os.path.exists(args.go):
        time.sleep(0.02)
    for acquisition in args.ids.split("/"):
        if args.acquire:
            server.update(args.acquire, pva.NtScalar(pva.INT, 1))
            time.sleep(0.3)
        for i in ids(acquisition):
            server.update(args.pv, ntndarray(pva, i, i == args.bad))
            time.sleep(1 / args.fps)
        if args.acquire:
            server.update(args.acquire, pva.NtScalar(pva.INT, 0))
            time.sleep(1.0)
    print("published", flush=True)
    time.sleep(args.hold)


def ntndarray(pva: Any, i: int, bad: bool) -> Any:
    nt = pva.NtNdArray()
    nt["uniqueId"] = i
    nt["dimension"] = [pva.PvDimension(n, 0, n, 1, False) for n in reversed(SHAPE)]
    if bad:
        nt["codec"] = pva.PvCodec("zip", pva.PvInt(int(pva.USHORT)))
        nt["value"] = {"ubyteValue": np.zeros(10, np.uint8)}
    else:
        nt["value"] = {"ushortValue": frame(i).reshape(-1)}
    nt["timeStamp"] = pva.PvTimeStamp(time.time())
    nt["attribute"] = [pva.NtAttribute("ColorMode", pva.PvInt(0))]
    return nt


def watch(args: argparse.Namespace) -> None:
    import pvaccess as pva

    got: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(args.pvs.split(","), 0)

    def on(pv: str) -> Any:
        def callback(value: Any) -> None:
            n = counts[pv]
            if "uniqueId" in value.getStructureDict():
                if not value["dimension"]:
                    return  # (the record's initial value)
                (array,) = value["value"][0].values()
                shape = [d["size"] for d in reversed(value["dimension"])]
                got[f"{pv}/{n}"] = np.array(array).reshape(shape)
                got[f"{pv}/{n}/uniqueId"] = np.array(value["uniqueId"])
            else:
                if len(value["value"]) == 0:
                    return
                got[f"{pv}/{n}"] = np.array(value["value"])
            counts[pv] = n + 1

        return callback

    channels = []
    for pv in counts:
        channel = pva.Channel(pv)
        channel.monitor(on(pv), "record[queueSize=1000]field()")
        channels.append(channel)
    print("watching", flush=True)
    deadline = time.monotonic() + args.seconds
    stop = Path(args.stop) if args.stop else None
    while sum(counts.values()) < args.count and time.monotonic() < deadline:
        if stop is not None and stop.exists():
            time.sleep(1.0)  # (what was served before the file came, still on its way)
            break
        time.sleep(0.05)
    for channel in channels:
        channel.stopMonitor()
    np.savez(args.out, **got)
    print("saved", counts, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("pv")
    p.add_argument("ids")
    p.add_argument("--bad", type=int, default=-1)
    p.add_argument("--fps", type=float, default=100)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("--hold", type=float, default=60)
    p.add_argument("--acquire", default="")
    p.add_argument("--go", default="", help="publish once this file exists")
    p = sub.add_parser("watch")
    p.add_argument("out")
    p.add_argument("pvs")
    p.add_argument("count", type=int)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--stop", default="", help="stop watching once this file exists")
    args = parser.parse_args()
    serve(args) if args.command == "serve" else watch(args)


if __name__ == "__main__":
    sys.exit(main())
