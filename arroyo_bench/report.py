"""The benchmark's report: the machine it ran on, the targets, the markdown tables."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from typing import Any

from arroyo_bench.run import size_label

# (name, what is compared, threshold, higher is better); issue 14's targets
TARGETS = [
    ("compute in a stage", "events/s, 1 worker / plain process", 0.95, True),
    ("2 workers, numpy operator", "speed-up over 1 worker", 1.85, True),
    ("one hop >= 64 KiB", "Arroyo/raw msg/s, worst size and transport", 0.9, True),
    ("one hop 100 B", "Arroyo/raw msg/s, worst transport", 0.15, True),
    ("chain of three >= 1 MiB", "Arroyo/raw msg/s, worst size", 0.8, True),
    ("p99 latency, 10k msg/s of 100 B", "Arroyo p99 / raw p99, worst transport", 1.2, False),
    ("stats counters", "CPU per message, on/off - 1", 0.02, False),
    # issue 20's, on a 4M-class detector's frames (2,162 x 2,068 uint16, bitshuffle-LZ4)
    ("detector ingest", "Stream V2 listener / plain PULL, frames/s", 0.9, True),
    ("decode in a stage", "1 worker / bitshuffle called directly, frames/s", 0.95, True),
    ("2 workers decoding + reducing", "speed-up over 1 worker", 1.8, True),
    # issue 21's (arroyo_bench.storage_suite, hdf5_suite)
    ("recorder", "Recorder / plain Python file writes, MB/s", 0.9, True),
    ("replay at max", "Replay into a sink / raw pyzmq one hop, msg/s", 0.8, True),
    ("nexus writer", "NexusWriter / pyzmq PULL + h5py loop, frames/s, worst case", 0.8, True),
    # issue 23's (arroyo_bench.pva_suite; the broker rows have no target)
    ("pva listener", "PvaListener / pvapy-hpc-consumer, frames/s", 0.9, True),
]


DETECTOR_ROWS = ("detector ingest", "detector decode", "detector scaling")
STORAGE_ROWS = ("recorder", "replay at max")


def versions() -> dict[str, str]:
    """Versions of the packages the measurements depend on."""
    out = {}
    for name in ("pyzmq", "numpy", "msgpack"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import zmq

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        **versions(),
    }


def _worst(values: list[float | None], higher_better: bool) -> float | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return min(known) if higher_better else max(known)


def _p99_ratio(row: dict[str, Any]) -> float | None:
    ours, raw = row["arroyo"].get("p99_us"), row["raw"].get("p99_us")
    return ours / raw if ours and raw else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured figure (None: not measured in this run)."""
    hop = results.get("one_hop", [])
    big = [r["ratio"] for r in hop if r["size"] >= 64 * 1024]
    small = [r["ratio"] for r in hop if r["size"] < 1024]
    chain = [r["ratio"] for r in results.get("chain", []) if r["size"] >= 1024 * 1024]
    scale = results.get("scaling", {})
    measured = [
        scale.get("compute_ratio"),
        scale.get("ratio"),
        _worst(big, True),
        _worst(small, True),
        _worst(chain, True),
        _worst([_p99_ratio(r) for r in results.get("latency", [])], False),
        results.get("counters", {}).get("cost"),
        *(results.get("detectors", {}).get(k, {}).get("ratio") for k in DETECTOR_ROWS),
        *(results.get("storage", {}).get(k, {}).get("ratio") for k in STORAGE_ROWS),
        _worst([r["ratio"] for r in results.get("nexus", [])], True),
        (results.get("pva", {}).get("row") or {}).get("ratio"),
    ]
    out = []
    for (name, what, limit, higher), value in zip(TARGETS, measured, strict=True):
        met = None if value is None else (value >= limit if higher else value <= limit)
        sign = ">=" if higher else "<="
        out.append(
            {"target": name, "measure": what, "goal": f"{sign} {limit:g}", "value": value,
             "met": met}
        )  # fmt: skip
    return out


# -- markdown ---------------------------------------------------------------------------


def _n(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:+.1f} %"


def _size(size: int) -> str:
    return size_label(size)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _throughput(rows: list[dict[str, Any]], other: str = "arroyo", cpu: bool = False) -> list[str]:
    head = ["transport", "payload", "raw msg/s", "raw MB/s", f"{other} msg/s",
            f"{other} MB/s", f"{other}/raw"]  # fmt: skip
    body = [
        [r["transport"], _size(r["size"]), _n(r["raw"].get("msg_s")),
         _n(r["raw"].get("mb_s"), 1), _n(r[other].get("msg_s")), _n(r[other].get("mb_s"), 1),
         _n(r["ratio"], 2)]
        for r in rows
    ]  # fmt: skip
    if cpu:  # what the two Arroyo processes spent per message, all threads
        head.append("arroyo CPU µs/msg")
        for line, r in zip(body, rows, strict=True):
            line.append(_n(r[other].get("cpu_us"), 1))
    return _table(head, body)


def _latency(rows: list[dict[str, Any]]) -> list[str]:
    def cell(side: dict[str, Any]) -> str:
        return " / ".join(_n(side.get(k)) for k in ("p50_us", "p99_us", "p999_us"))

    head = ["transport", "offered", "raw p50 / p99 / p99.9 (µs)", "arroyo p50 / p99 / p99.9 (µs)",
            "p99 arroyo/raw"]  # fmt: skip
    body = [
        [r["transport"], f"{r['rate']:,.0f} msg/s of {_size(r['size'])}", cell(r["raw"]),
         cell(r["arroyo"]), _n(_p99_ratio(r), 2)]
        for r in rows
    ]  # fmt: skip
    return _table(head, body)


def _scaling(s: dict[str, Any]) -> list[str]:
    """Arroyo's workers beside the true ceiling: the same numpy work called in a loop
    by as many plain processes (no zmq, no arroyo, no source, no sink)."""
    head = ["workers", "arroyo events/s", "arroyo speed-up", "plain processes events/s",
            "plain speed-up", "compute in a stage / plain process"]  # fmt: skip
    body = []
    for k, side, bare in ((1, "1 worker", "plain 1"), (2, "2 workers", "plain 2")):
        ours, theirs = s[side].get("msg_s"), s.get(bare, {}).get("msg_s")
        speedup = s.get("ratio") if k == 2 else 1.0
        bare_speedup = s.get("plain_speedup") if k == 2 else 1.0
        ratio = ours / theirs if ours and theirs else None
        body.append([str(k), _n(ours), _n(speedup, 2), _n(theirs), _n(bare_speedup, 2),
                     _n(ratio, 2)])  # fmt: skip
    return _table(head, body)


def _detectors(d: dict[str, Any]) -> list[str]:
    packed = d.get("compressed_frame_bytes") or 0
    head = ["case", "reference", "frames/s", "Arroyo", "frames/s", "GB/s compressed",
            "GB/s decoded", "Arroyo/reference"]  # fmt: skip
    body = []
    for key in DETECTOR_ROWS:
        row = d.get(key)
        if not row:
            continue
        ref, ours = row["sides"][0], row["sides"][-1]
        fps = row[ours].get("msg_s") or 0.0
        gb_packed = _n(fps * packed / 1e9 if fps else None, 2)
        gb_decoded = _n(fps * row["size"] / 1e9 if fps else None, 2)
        body.append([key.removeprefix("detector "), ref, _n(row[ref].get("msg_s")), ours,
                     _n(fps), gb_packed, gb_decoded, _n(row["ratio"], 2)])  # fmt: skip
    out = _table(head, body)
    ingest = d.get("detector ingest") or {}
    if "pyzmq relay + PULL" in ingest:
        relay = _n(ingest["pyzmq relay + PULL"].get("msg_s"))
        ratio = _n(ingest.get("ratio_to_relay"), 2)
        out += [
            "",
            "Ingest through the same two hops in plain pyzmq (a relay, then ipc to the "
            f"PULL): {relay} frames/s; the listener and its stage against it: {ratio}.",
        ]
    return out


def _storage(s: dict[str, Any]) -> list[str]:
    head = ["case", "reference", "msg/s", "MB/s", "Arroyo", "msg/s", "MB/s", "Arroyo/reference"]
    body = []
    for key in STORAGE_ROWS:
        row = s.get(key)
        if row:
            ref, ours = row["sides"][0], row["sides"][-1]
            body.append([key, ref, _n(row[ref].get("msg_s")), _n(row[ref].get("mb_s"), 1), ours,
                         _n(row[ours].get("msg_s")), _n(row[ours].get("mb_s"), 1),
                         _n(row["ratio"], 2)])  # fmt: skip
    out = _table(head, body)
    replay = s.get("replay at max") or {}
    if "Arroyo one hop" in replay:
        hop = _n(replay["Arroyo one hop"].get("msg_s"))
        ratio = _n(replay.get("ratio_to_one_hop"), 2)
        out += ["", f"Arroyo's own one hop at 1 MiB (a source stage -> the same sink) in the "
                f"same run: {hop} msg/s; Replay against it: {ratio}."]  # fmt: skip
    return out


def _nexus(rows: list[dict[str, Any]]) -> list[str]:
    fed, loop, ours = "pyzmq PULL + h5py loop", "h5py loop in memory", "NexusWriter"
    head = ["frames arrive", f"{fed} frames/s", f"{loop} frames/s", f"{ours} frames/s",
            "MB/s decoded", f"{ours}/{fed}"]  # fmt: skip
    body = [
        [r["case"], _n(r[fed].get("msg_s")), _n(r[loop].get("msg_s")), _n(r[ours].get("msg_s")),
         _n(r[ours].get("mb_s"), 0), _n(r["ratio"], 2)]
        for r in rows
    ]  # fmt: skip
    return _table(head, body)


def _tiled(t: dict[str, Any]) -> list[str]:
    ref, ours = "tiled client loop", "TiledWriter"
    head = ["events", f"{ref} events/s", f"{ours} events/s", "MB/s", f"{ours}/{ref}"]
    body = [
        [r["case"], _n(r[ref].get("events_s")), _n(r[ours].get("events_s")),
         _n(r[ours].get("mb_s"), 1), _n(r["ratio"], 2)]
        for r in t.get("writer", [])
    ]  # fmt: skip
    out = _table(head, body)
    out += ["", "Latency, write request begun -> frame in hand (100 appends, 50 ms apart)", ""]
    head = ["frames", "Subscription median ms", "p90", "TiledListener median ms", "p90",
            "TiledListener/Subscription"]  # fmt: skip
    body = [
        [r["frame"], _n(r["Subscription"]["median_ms"], 1), _n(r["Subscription"]["p90_ms"], 1),
         _n(r["TiledListener"]["median_ms"], 1), _n(r["TiledListener"]["p90_ms"], 1),
         _n(r["ratio"], 2)]
        for r in t.get("latency", [])
    ]  # fmt: skip
    return out + _table(head, body)


def _brokers(b: dict[str, Any]) -> list[str]:
    head = ["end", "payload", "messages", "reference", "msg/s", "MB/s", "Arroyo", "msg/s",
            "MB/s", "Arroyo/reference"]  # fmt: skip
    body = []
    for r in b.get("rows", []):
        ref, ours = r["sides"]
        body.append([r["suite"], _size(r["size"]), _n(r["count"]), ref, _n(r[ref].get("msg_s")),
                     _n(r[ref].get("mb_s"), 1), ours, _n(r[ours].get("msg_s")),
                     _n(r[ours].get("mb_s"), 1), _n(r["ratio"], 2)])  # fmt: skip
    return _table(head, body) + [f"\n{note}" for note in b.get("notes", [])]


def _pva(p: dict[str, Any]) -> list[str]:
    r = p.get("row")
    if not r:
        return [f"n/a: {p.get('note', '')}"]
    ref, ours = r["sides"]
    head = ["offered", f"{ref} frames/s", "received", f"{ours} frames/s", "received",
            f"{ours}/{ref}"]  # fmt: skip
    offered = f"{r['fps']} frames/s for {r['seconds']} s"
    body = [[offered, _n(r[ref].get("msg_s")), _pct_of(r[ref].get("fraction")),
             _n(r[ours].get("msg_s")), _pct_of(r[ours].get("fraction")),
             _n(r["ratio"], 2)]]  # fmt: skip
    return _table(head, body)


def _pct_of(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f} %"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['system']}; Python {m['python']}, "
        f"pyzmq {m.get('pyzmq', '?')} (libzmq {m['libzmq']}), numpy {m.get('numpy', '?')}. "
        f"Mode: {results['mode']}, medians of {results['plan']['repeats']} repeats; "
        f"load average {m['load_before']:.1f} before, {m['load_after']:.1f} after.",
    ]
    if "one_hop" in results:
        out += ["", "**One hop** (2 processes; MB = 10^6 payload bytes)", ""]
        out += _throughput(results["one_hop"], cpu=True)
    if "chain" in results:
        out += ["", "**Chain** (3 processes: source -> pass-through -> sink)", ""]
        out += _throughput(results["chain"])
    if "scaling" in results:
        s = results["scaling"]
        what = (
            f"stages.basic:Temporaries, {s['rounds']} rounds of np.sqrt(a * a + 1.0).sum()"
            f" on a float64 copy of a {_size(s['size'])} uint16 frame, hwm = {s['hwm']}"
        )
        out += ["", f"**Compute and scaling** ({what})", ""]
        out += _scaling(s)
    if "latency" in results:
        out += ["", "**Latency** per hop (receive - send time, first 5 % left out)", ""]
        out += _latency(results["latency"])
    if "peer" in results:
        peer = results["peer"]
        out += ["", "**Peer**: arroyopy (PyPI) receiving the raw PUSH stream", ""]
        if peer["rows"]:
            out += _throughput(peer["rows"], "arroyopy")
            out += ["", f"({peer['note']})"]
        else:
            out += _table(["transport", "payload", "arroyopy msg/s"], [["ipc", "—", "n/a"]])
            out += ["", f"n/a: {peer['note']}"]
    if "counters" in results:
        c = results["counters"]
        out += ["", "**Stats counters** (one hop, 100 B, ipc)", ""]
        off, on = c["stats off"], c["stats on"]
        out += _table(
            ["ARROYO_STATS", "msg/s", "CPU µs per message (both ends)", "cost"],
            [["0", _n(off.get("msg_s")), _n(off.get("cpu_us"), 1), ""],
             ["1", _n(on.get("msg_s")), _n(on.get("cpu_us"), 1), _pct(c["cost"])]],
        )  # fmt: skip
    if "curve" in results:
        out += ["", "**CURVE** (one Arroyo hop over tcp, `security = curve` beside plain)", ""]
        body = [
            [_size(r["size"]), _n(r["plain"].get("msg_s")), _n(r["plain"].get("mb_s"), 1),
             _n(r["curve"].get("msg_s")), _n(r["curve"].get("mb_s"), 1), _n(r["ratio"], 2)]
            for r in results["curve"]
        ]  # fmt: skip
        head = ["payload", "plain msg/s", "plain MB/s", "curve msg/s", "curve MB/s", "curve/plain"]
        out += _table(head, body)
    if "detectors" in results:
        out += [
            "",
            "**Detector** (one Stream V2 series from `arroyo simulate` over tcp; "
            "decoded = 2,162 x 2,068 uint16, 8.94 MB; 1 OpenMP thread per process)",
            "",
        ]
        out += _detectors(results["detectors"])
    if "storage" in results:
        reps = results["storage"].get("repeats", "?")
        out += ["", f"**Storage** (1 MiB frames, ipc, medians of {reps}; MB = 10^6 payload "
                "bytes; a sync before every side)", ""]  # fmt: skip
        out += _storage(results["storage"])
    if "nexus" in results:
        out += ["", "**NeXus writer** (1 MiB uint16 frames, one run, SWMR, a flush per frame)", ""]
        out += _nexus(results["nexus"])
    if "tiled" in results:
        out += ["", "**Tiled** (a local `tiled serve config`: SQLite catalog, file storage; "
                "no target, figures for issue 22)", ""]  # fmt: skip
        out += _tiled(results["tiled"])
    if "brokers" in results:
        out += ["", "**Brokers** (each end beside the broker's own Python client; RabbitMQ "
                "at 127.0.0.1:5672, a private nats-server; no target, figures for issue 23)",
                ""]  # fmt: skip
        out += _brokers(results["brokers"])
    if "pva" in results:
        out += ["", "**PVA** (`pvapy-ad-sim-server`, 512 x 512 uint16, in turns with each "
                "receiver; frames/s first to last frame received)", ""]  # fmt: skip
        out += _pva(results["pva"])
    out += ["", "**Targets**", ""]
    rows = []
    for t in results["targets"]:
        state = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        rows.append([t["target"], t["measure"], t["goal"], _n(t["value"], 2), state])
    out += _table(["target", "measure", "goal", "measured", ""], rows)
    return "\n".join(out)
