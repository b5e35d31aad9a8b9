"""Which running processes ``arroyo status`` calls STALLED, from the rows alone."""

from __future__ import annotations

from typing import Any

from arroyo.control.status import mark_stalled
from arroyo.runtime.stats import LinkCounters


def proc(stage: str, worker: int, pid: int, gone: tuple[str, ...] = (), **kw: Any) -> dict:
    link = {"link": "work->sink", "direction": "in", "gone": dict.fromkeys(gone, 1.0)}
    return {"stage": stage, "worker": worker, "pid": pid, "state": "RUNNING", "links": [link], **kw}


def test_a_process_a_live_peer_let_go_is_stalled_and_says_by_whom():
    rows = [proc("sink", 0, 10, gone=("work/1/12@h",)), proc("work", 0, 11), proc("work", 1, 12)]
    mark_stalled(rows)
    assert [r["state"] for r in rows] == ["RUNNING", "RUNNING", "STALLED"]
    assert rows[2]["stalled"] == "let go by sink/0"


def test_only_the_same_process_and_only_by_a_live_peer():
    rows = [
        proc("sink", 0, 10, gone=("work/1/99@h",)),  # an earlier process of work/1
        proc("det", 0, 9, gone=("work/0/11@h",), stale=True),  # its own figures are old
        proc("work", 0, 11),
        proc("work", 1, 12),
    ]
    mark_stalled(rows)
    assert all(r["state"] == "RUNNING" for r in rows)


def test_a_stopped_process_is_stalled_before_any_peer_lets_it_go():
    rows = [proc("work", 1, 12, stalled="stopped (SIGSTOP, or held by a debugger)")]
    mark_stalled(rows)
    assert rows[0]["state"] == "STALLED"


def test_a_link_remembers_a_bounded_number_of_peers_let_go_until_they_return():
    link = LinkCounters("a->b", "out")
    for pid in range(LinkCounters.GONE_KEPT + 10):
        link.gone_since(f"b/0/{pid}@h")
    assert len(link.snapshot()["gone"]) == LinkCounters.GONE_KEPT
    link.back(f"b/0/{LinkCounters.GONE_KEPT + 9}@h")
    assert f"b/0/{LinkCounters.GONE_KEPT + 9}@h" not in link.snapshot()["gone"]


def test_metrics_say_a_stalled_process_is_up_and_stalled(tmp_path):
    from arroyo.control.metrics import render_metrics
    from arroyo.topology import load

    path = tmp_path / "t.ini"
    path.write_text(
        "[topology]\nname = m\n\n[stage:det]\nrole = listener\n"
        "class = stages.synthetic:DetectorSimulator\nframes = 1\nshape = 2\n"
    )
    rows = [
        {**proc("det", 0, 9), "chain": "m", "state": "STALLED", "links": []},
        {**proc("det", 1, 10), "chain": "m", "links": []},
    ]
    body = render_metrics(load(path), rows)
    assert 'arroyo_up{topology="m",stage="det",worker="0"} 1' in body
    assert 'arroyo_stalled{topology="m",stage="det",worker="0"} 1' in body
    assert 'arroyo_stalled{topology="m",stage="det",worker="1"} 0' in body
