"""Sinks: publishers that give messages to files or nowhere."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from arroyo.convert import Bounds
from arroyo.message import Event, Message, Start, Stop
from arroyo.stage import Publisher


def describe_payload(payload: Any) -> dict[str, Any]:
    """A small JSON-able summary of a payload (shape, dtype, sum)."""
    if payload is None:
        return {}
    if isinstance(payload, np.ndarray):
        return {
            "shape": list(payload.shape),
            "dtype": payload.dtype.str,
            "sum": float(payload.sum()) if payload.dtype.kind in "biuf" else None,
        }
    if isinstance(payload, dict):
        return {name: describe_payload(a) for name, a in payload.items()}
    return {"bytes": len(payload)}


class JsonLinesLog(Publisher):
    """Appends one JSON line per message to ``path``: kind, run, seq, metadata or data,
    and a payload summary. Flushed at every Stop and on close."""

    def __init__(self, path: Path, flush_every: Annotated[int, Bounds(ge=1)] = 1) -> None:
        self.path = path
        self.flush_every = flush_every
        self._file: Any = None
        self._n = 0

    def setup(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def publish(self, message: Message) -> None:
        if self._file is None:
            self.setup()
        record: dict[str, Any] = {
            "kind": type(message).__name__,
            "run": message.run,
            "seq": message.seq,
        }
        if isinstance(message, Event):
            record["metadata"] = message.metadata
            record["payload"] = describe_payload(message.payload)
        elif isinstance(message, Start | Stop):
            record["data"] = message.data
        self._file.write(json.dumps(record, default=str) + "\n")
        self._n += 1
        if isinstance(message, Stop) or self._n % self.flush_every == 0:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Discard(Publisher):
    """Counts and drops everything (for benchmarks); ``delay_ms`` makes it a slow
    consumer (for testing backpressure and PUB drops)."""

    def __init__(self, delay_ms: Annotated[float, Bounds(ge=0)] = 0.0) -> None:
        self.count = 0
        self.delay = delay_ms / 1000

    def publish(self, message: Message) -> None:
        self.count += 1
        if self.delay:
            time.sleep(self.delay)
