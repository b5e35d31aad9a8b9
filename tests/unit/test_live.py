"""Live parameters without processes: conversion, refusal, storage, applying."""

from __future__ import annotations

from pathlib import Path

import pytest

from arroyo.errors import TopologyError
from arroyo.message import Event, Start
from arroyo.runtime.live import (
    Live,
    convert_live,
    forget_live,
    live_path,
    read_live,
    set_live,
    write_live,
)
from arroyo.stage import Operator
from arroyo.topology import load
from stages.reduce import DarkFlatCorrection, ThresholdFilter

TOPO = """
[topology]
name = live
run_dir = run

[chain:c]
stages = det, hits, sink

[stage:det]
role = listener
class = stages.synthetic:DetectorSimulator
frames = 1
shape = 4, 4

[stage:hits]
role = operator
class = stages.reduce:ThresholdFilter
threshold = 10
input = det

[stage:sink]
role = publisher
class = stages.sinks:Discard
input = hits
"""


def test_convert_live_uses_the_ini_converters() -> None:
    values, problems = convert_live(ThresholdFilter, {"threshold": "2.5", "min_pixels": "3"})
    assert values == {"threshold": 2.5, "min_pixels": 3} and not problems


def test_convert_live_refuses_bad_values_and_keys_that_are_not_live() -> None:
    values, problems = convert_live(ThresholdFilter, {"threshold": "high", "array": "x"})
    assert values == {}
    assert problems == [
        "threshold = high: expected a number (float)",
        "array: not a live option of ThresholdFilter (live: threshold, min_pixels)",
    ]


def test_set_live_stores_versions_and_refuses_without_changing_anything(topo) -> None:
    t = load(topo(TOPO))
    assert set_live(t, "hits", {"threshold": "5"}) == 1
    assert set_live(t, "hits", {"min_pixels": " 2 "}) == 2
    assert read_live(t.run_dir, "hits") == (2, {"threshold": "5", "min_pixels": "2"})
    before = live_path(t.run_dir, "hits").read_bytes()
    for bad in ({"threshold": "x"}, {"threshold": "6", "bins": "3"}, {"min_pixels": "0"}, {}):
        with pytest.raises(TopologyError) as e:
            set_live(t, "hits", bad)
        assert all("[stage:hits]" in line for line in e.value.problems)
    with pytest.raises(TopologyError):
        set_live(t, "nope", {"threshold": "1"})
    assert live_path(t.run_dir, "hits").read_bytes() == before
    forget_live(t.run_dir, ["hits"])
    assert read_live(t.run_dir, "hits") == (0, {})


def test_a_worker_applies_a_change_between_two_messages(tmp_path: Path, topo) -> None:
    t = load(topo(TOPO))
    stage = ThresholdFilter(threshold=10)
    live = Live(t.run_dir, "hits", ThresholdFilter)
    assert live.pending is None and live.values == {}
    set_live(t, "hits", {"threshold": "1.5"})
    live.poll()
    assert live.pending is not None and stage.threshold == 10  # nothing applied yet
    live.apply_pending(stage, Event(run=3, seq=41))
    assert stage.threshold == 1.5 and live.pending is None
    assert live.state() == {
        "version": 1,
        "values": {"threshold": "1.5"},
        "where": {"run": 3, "seq": 41},
        "error": "",
    }
    live.poll()  # the same file again: nothing new
    assert live.pending is None
    # a restarted worker starts with the stored values
    assert Live(t.run_dir, "hits", ThresholdFilter).values == {"threshold": 1.5}


class Picky(Operator):
    live_options = ("level",)

    def __init__(self, level: float = 1.0) -> None:
        self.level = level

    def apply_live(self, changes: dict) -> None:
        if changes.get("level", 0) > 10:
            raise ValueError("level must be <= 10")
        super().apply_live(changes)

    def process(self, message):
        return message


def test_a_change_the_stage_refuses_keeps_the_old_values(tmp_path: Path) -> None:
    stage = Picky()
    live = Live(tmp_path, "picky", Picky)
    write_live(tmp_path, "picky", 1, {"level": "11"})
    live.poll()
    live.apply_pending(stage, Start(run=1))
    assert stage.level == 1.0 and "level must be <= 10" in live.error
    assert live.state()["version"] == 1 and live.state()["values"] == {}


def test_bounds_of_an_option_hold_for_live_values_too() -> None:
    _, problems = convert_live(ThresholdFilter, {"min_pixels": "0"})
    assert problems == ["min_pixels = 0: expected a value >= 1 (int)"]


def test_dark_flat_scale_is_live() -> None:
    import numpy as np

    op = DarkFlatCorrection(dark_value=1.0)
    op.apply_live({"scale": 2.0})
    out = op.process(Event(payload=np.full((2, 2), 3, np.uint16)))
    assert np.array_equal(out.payload, np.full((2, 2), 4.0, np.float32))
