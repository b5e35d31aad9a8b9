"""Prometheus text-format metrics for one topology (``arroyo metrics TOPOLOGY``).

Off unless started; binds loopback by default. Each scrape reads the same per-process
stats files and supervisor state as ``arroyo status``, so it adds nothing to the
stages' hot loops.
"""

from __future__ import annotations

import logging
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from arroyo.control.status import STALLED
from arroyo.runtime.stats import link_totals
from arroyo.topology import Topology

log = logging.getLogger("arroyo.metrics")

_PROCESS_METRICS = [
    ("arroyo_events_received_total", "counter", "received", "Events received by the process"),
    ("arroyo_events_sent_total", "counter", "sent", "Events sent by the process"),
    ("arroyo_errors_total", "counter", "errors", "Exceptions in process() or publish()"),
    ("arroyo_dropped_total", "counter", "dropped", "Messages dropped, all reasons"),
    ("arroyo_rss_bytes", "gauge", "rss_bytes", "Resident memory of the process"),
    ("arroyo_cpu_percent", "gauge", "cpu_percent", "CPU use of the process"),
    ("arroyo_process_ms_p99", "gauge", "process_ms_p99", "p99 of process() time, ms"),
    ("arroyo_runs_complete_total", "counter", "runs_complete", "Runs that arrived whole"),
    ("arroyo_runs_incomplete_total", "counter", "runs_incomplete", "Runs that arrived with losses"),
    ("arroyo_run_events_missing_total", "counter", "events_missing", "Events missing from runs"),
]


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(topology: Topology, rows: list[dict[str, Any]]) -> str:
    topo = f'topology="{_label(topology.name)}"'
    lines: list[str] = []
    for name, kind, key, help_text in _PROCESS_METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for r in rows:
            value = r.get(key)
            if value is None:
                continue
            if kind == "counter":  # the worker's earlier processes count too
                value += r.get("past", {}).get(key, 0)
            labels = (
                f'topology="{_label(topology.name)}",chain="{_label(r["chain"])}",'
                f'stage="{_label(r["stage"])}",worker="{r["worker"]}"'
            )
            lines.append(f"{name}{{{labels}}} {float(value):g}")
    lines += ["# HELP arroyo_up 1 if the process is running", "# TYPE arroyo_up gauge"]
    for r in rows:
        labels = f'{topo},stage="{_label(r["stage"])}",worker="{r["worker"]}"'
        lines.append(f"arroyo_up{{{labels}}} {1 if r['state'] in ('RUNNING', STALLED) else 0}")
    lines += [
        "# HELP arroyo_stalled 1 if the process runs but is stopped or was let go by a peer",
        "# TYPE arroyo_stalled gauge",
    ]
    for r in rows:
        labels = f'{topo},stage="{_label(r["stage"])}",worker="{r["worker"]}"'
        lines.append(f"arroyo_stalled{{{labels}}} {1 if r['state'] == STALLED else 0}")
    lines += [
        "# HELP arroyo_link_dropped_total Messages dropped on a link, by reason",
        "# TYPE arroyo_link_dropped_total counter",
    ]
    for t in link_totals(rows):
        for reason, n in t["dropped"].items():
            labels = (
                f'topology="{_label(topology.name)}",link="{_label(t["link"])}",reason="{reason}"'
            )
            lines.append(f"arroyo_link_dropped_total{{{labels}}} {n}")
    lines += [
        "# HELP arroyo_link_auth_refused_total CURVE handshakes refused on a link",
        "# TYPE arroyo_link_auth_refused_total counter",
    ]
    for t in link_totals(rows):
        labels = f'topology="{_label(topology.name)}",link="{_label(t["link"])}"'
        lines.append(f"arroyo_link_auth_refused_total{{{labels}}} {t.get('auth_refused', 0)}")
    return "\n".join(lines) + "\n"


def serve(topology: Topology, host: str = "127.0.0.1", port: int = 9464) -> ThreadingHTTPServer:
    """An HTTP server answering ``GET /metrics``; call ``serve_forever()`` on it."""
    from arroyo.control.supervise import status_rows

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/metrics":
                self.send_error(404, "try /metrics")
                return
            try:
                body = render_metrics(topology, status_rows(topology)).encode()
            except xmlrpc.client.Error as e:  # supervisord shutting down, say: one line
                log.warning("scrape not answered: supervisord: %s", e)
                self.send_error(503, "supervisord did not answer")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return ThreadingHTTPServer((host, port), Handler)
