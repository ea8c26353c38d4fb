"""Generate the Grafana dashboard dashboards/chat-gateway.json.

PANELS defines every panel's queries, units and threshold line. ROWS defines the
layout: which panels share a row, in which order. After editing either,
regenerate the JSON and commit both files:

    python dashboards/build.py          # write dashboards/chat-gateway.json
    python dashboards/build.py --check  # exit 1 if the JSON on disk is stale

panel_queries() returns each panel's PromQL with the Grafana variables filled
in, ready to send to the Prometheus HTTP API.

Panel ids are part of the dashboard's interface: links such as
``?viewPanel=5`` and image renders use them. Keep an id when a panel moves,
and give a new panel an unused one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DASHBOARD_PATH",
    "EVENT_LOOP_LAG_P95_LIMIT",
    "MESSAGE_RATE_LIMIT",
    "MONGO_WRITE_P95_LIMIT",
    "PANELS",
    "ROWS",
    "Panel",
    "Target",
    "build_dashboard",
    "panel_queries",
    "render_dashboard",
]

DASHBOARD_PATH = Path(__file__).with_name("chat-gateway.json")
DASHBOARD_UID = "chat-gateway"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Threshold lines, in the panels' units (messages/s and seconds). They equal
# the thresholds of ChatMessageRateHigh, ChatMongoWriteLatencyHigh and
# ChatEventLoopLagHigh in alerts/chat-gateway.rules.yml, and
# tests/test_alert_rules.py checks that they stay equal.
MESSAGE_RATE_LIMIT = 80.0
MONGO_WRITE_P95_LIMIT = 0.030
EVENT_LOOP_LAG_P95_LIMIT = 0.050

PANEL_HEIGHT = 8
GRID_WIDTH = 24


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str
    # Exemplars carry the trace_id of a sampled observation. The Prometheus
    # data source turns them into Jaeger links (exemplarTraceIdDestinations in
    # dashboards/provisioning/datasources/datasources.yaml). With
    # `serve --workers N` the multiprocess exposition has no exemplars.
    exemplar: bool = False


@dataclass(frozen=True)
class Panel:
    """A time-series panel: title, unit, queries and an optional threshold line."""

    id: int
    title: str
    description: str
    unit: str
    targets: tuple[Target, ...]
    threshold: float | None = None
    axis_label: str = ""


INSTANCE_MATCHER = 'instance=~"$instance"'


def _selector(metric: str, *matchers: str) -> str:
    """Return a selector for ``metric`` on the instances picked in the dashboard."""
    return f"{metric}{{{', '.join((*matchers, INSTANCE_MATCHER))}}}"


def _rate(metric: str, *matchers: str, window: str = "$__rate_interval") -> str:
    return f"rate({_selector(metric, *matchers)}[{window}])"


def _quantile(quantile: float, histogram: str, by: str = "instance") -> str:
    """Return the PromQL for a quantile of ``histogram`` over 5 minutes.

    Each bucket is rated before the sum, and the sum keeps ``le``, as
    histogram_quantile needs. The 5m window is the one of the KPI definitions
    and of the latency alerts.
    """
    buckets = _rate(f"{histogram}_bucket", window="5m")
    return f"histogram_quantile({quantile}, sum by (le, {by}) ({buckets}))"


# The rules count processes per instance the same way: one series of
# process_resident_memory_bytes per worker, else one process.
_PROCESSES = (
    f"count by (instance) ({_selector('process_resident_memory_bytes')})\n"
    "  or\n"
    f"  count by (instance) ({_selector('chat_active_sockets')})"
)

_ACCEPTED_RATE_1M = _rate("chat_messages_total", 'outcome="accepted"', window="1m")
_REJECTED = 'outcome="rejected"'

# Rate windows: "Messages per second" uses the 1m window of ChatMessageRateHigh
# and the quantiles use the 5m window of the latency alerts, so a line crossing
# on a panel is what the alert evaluates. The other counters use
# $__rate_interval, which Grafana keeps at four scrape intervals or more.
PANELS: dict[int, Panel] = {
    panel.id: panel
    for panel in (
        Panel(
            id=1,
            title="Messages per second",
            description=(
                "Accepted messages per second per gateway process: the instance's "
                "rate divided by its worker processes. ChatMessageRateHigh fires "
                "above the line (80/s for 2 minutes), the low end of the estimate "
                "that one process breaks at 80-100 messages/s."
            ),
            unit="mps",
            threshold=MESSAGE_RATE_LIMIT,
            targets=(
                Target(
                    expr=(
                        f"sum by (instance) ({_ACCEPTED_RATE_1M})"
                        f"\n/\n(\n  {_PROCESSES}\n)"
                    ),
                    legend="{{instance}} per process",
                ),
            ),
        ),
        Panel(
            id=2,
            title="Active sockets",
            description="Connected Socket.IO sockets per instance.",
            unit="short",
            targets=(
                Target(
                    expr=f"sum by (instance) ({_selector('chat_active_sockets')})",
                    legend="{{instance}}",
                ),
            ),
        ),
        Panel(
            id=3,
            title="Rejections by code",
            description=(
                "Rejected messages per second by error code. overloaded (writer "
                "queue full) and store_unavailable (MongoDB write failed) feed "
                "ChatMessagesRejected. The other codes are client errors."
            ),
            unit="mps",
            targets=(
                Target(
                    expr=(f"sum by (code) ({_rate('chat_messages_total', _REJECTED)})"),
                    legend="{{code}}",
                ),
            ),
        ),
        Panel(
            id=4,
            title="Socket connections",
            description="Socket.IO connection attempts per second, by outcome.",
            unit="short",
            axis_label="connections/s",
            targets=(
                Target(
                    expr=f"sum by (outcome) ({_rate('chat_socket_connections_total')})",
                    legend="{{outcome}}",
                ),
            ),
        ),
        Panel(
            id=5,
            title="MongoDB write latency",
            description=(
                "p50, p95 and p99 of one insert_many batch. ChatMongoWriteLatencyHigh "
                "fires when the p95 stays above the 30 ms line for 5 minutes. The "
                "capacity estimate assumed a p50/p95 of 8/15 ms."
            ),
            unit="s",
            threshold=MONGO_WRITE_P95_LIMIT,
            targets=tuple(
                Target(
                    expr=_quantile(quantile, "chat_mongo_write_duration_seconds"),
                    legend=f"p{round(quantile * 100)} {{{{instance}}}}",
                    exemplar=True,
                )
                for quantile in (0.5, 0.95, 0.99)
            ),
        ),
        Panel(
            id=6,
            title="Ack latency p95",
            description=(
                "p95 time from receiving send_message to sending its ack, which "
                "includes the MongoDB write."
            ),
            unit="s",
            targets=(
                Target(
                    expr=_quantile(0.95, "chat_message_ack_duration_seconds"),
                    legend="{{instance}}",
                    exemplar=True,
                ),
            ),
        ),
        Panel(
            id=7,
            title="Event-loop lag p95",
            description=(
                "p95 of how late the event loop runs a timer due every 20 ms. "
                "ChatEventLoopLagHigh fires when it stays above the 50 ms line for "
                "5 minutes."
            ),
            unit="s",
            threshold=EVENT_LOOP_LAG_P95_LIMIT,
            targets=(
                Target(
                    expr=_quantile(0.95, "chat_event_loop_lag_seconds"),
                    legend="{{instance}}",
                    exemplar=True,
                ),
            ),
        ),
        Panel(
            id=8,
            title="Fan-out latency p95",
            description="p95 time to emit one accepted message to its room.",
            unit="s",
            targets=(
                Target(
                    expr=_quantile(0.95, "chat_fanout_duration_seconds"),
                    legend="{{instance}}",
                    exemplar=True,
                ),
            ),
        ),
        Panel(
            id=9,
            title="MongoDB write errors",
            description=(
                "Failed insert_many batches per second, by kind of error. Every "
                "message of a failed batch is rejected with store_unavailable. "
                "ChatMongoWriteErrors pages when errors continue for about 3 minutes."
            ),
            unit="short",
            axis_label="errors/s",
            targets=(
                Target(
                    expr=(
                        "sum by (instance, error) "
                        f"({_rate('chat_mongo_write_errors_total')})"
                    ),
                    legend="{{error}} {{instance}}",
                ),
            ),
        ),
        Panel(
            id=10,
            title="MongoDB write batch size",
            description=(
                "Messages per insert_many batch. Batches grow with load because "
                "messages wait in the writer queue while a write is in flight."
            ),
            unit="short",
            targets=tuple(
                Target(
                    expr=_quantile(quantile, "chat_mongo_write_batch_size"),
                    legend=f"p{round(quantile * 100)} {{{{instance}}}}",
                )
                for quantile in (0.5, 0.95)
            ),
        ),
        Panel(
            id=11,
            title="Writer queue depth",
            description=(
                "Messages waiting for the MongoDB writer. When the queue reaches "
                "CHAT_WRITER_QUEUE_MAX, new messages are rejected with overloaded."
            ),
            unit="short",
            targets=(
                Target(
                    expr=f"sum by (instance) ({_selector('chat_writer_queue_depth')})",
                    legend="{{instance}}",
                ),
            ),
        ),
        Panel(
            id=12,
            title="Memory (RSS and heap)",
            description=(
                "Resident memory (RSS), private anonymous memory (heap: Python "
                "objects, C allocations, thread stacks) and the memory limit, "
                "summed over worker processes. ChatMemoryNearLimit fires when RSS "
                "stays above 90% of the limit for 5 minutes."
            ),
            unit="bytes",
            targets=(
                Target(
                    expr=(
                        "sum by (instance) "
                        f"({_selector('process_resident_memory_bytes')})"
                    ),
                    legend="RSS {{instance}}",
                ),
                Target(
                    expr=f"sum by (instance) ({_selector('chat_heap_bytes')})",
                    legend="heap {{instance}}",
                ),
                Target(
                    expr=f"max by (instance) ({_selector('chat_memory_limit_bytes')})",
                    legend="limit {{instance}}",
                ),
            ),
        ),
        Panel(
            id=13,
            title="CPU usage",
            description=(
                "CPU seconds per second. One event loop uses at most one core, so "
                "a single process near 1.0 is saturated. Empty with "
                "`serve --workers N`, because multiprocess mode does not export "
                "process_cpu_seconds_total."
            ),
            unit="short",
            axis_label="cores",
            targets=(
                Target(
                    expr=f"sum by (instance) ({_rate('process_cpu_seconds_total')})",
                    legend="{{instance}}",
                ),
            ),
        ),
        Panel(
            id=18,
            title="Trace spans dropped",
            description=(
                "Spans never exported, by reason: export_failed (the collector "
                "rejected the batch or did not answer in time), queue_full (the "
                "gateway's spans came faster than they were sent) or shutdown. "
                "Above zero, traces in Jaeger miss spans."
            ),
            unit="short",
            axis_label="spans/s",
            targets=(
                Target(
                    expr=(
                        "sum by (instance, reason) "
                        f"({_rate('chat_trace_spans_dropped_total')})"
                    ),
                    legend="{{instance}} {{reason}}",
                ),
            ),
        ),
        Panel(
            id=14,
            title="Indexing queue depth and backlog",
            description=(
                "Queue: messages waiting in each process's indexing queue. Backlog: "
                "messages stored in MongoDB but not yet indexed, counted by the "
                "reconciler every 15 s. Every instance counts the same collection, "
                "so the backlog is shown once. ChatIndexBacklogGrowing fires when "
                "the backlog is above 1000 and keeps growing for 10 minutes."
            ),
            unit="short",
            targets=(
                Target(
                    expr=f"sum by (instance) ({_selector('chat_index_queue_depth')})",
                    legend="queue {{instance}}",
                ),
                Target(
                    expr=f"max({_selector('chat_index_backlog_messages')})",
                    legend="backlog",
                ),
            ),
        ),
        Panel(
            id=15,
            title="Indexing lag",
            description=(
                "p50 and p95 time from a message's creation to its being indexed "
                "and so found by semantic search."
            ),
            unit="s",
            targets=tuple(
                Target(
                    expr=_quantile(quantile, "chat_index_lag_seconds"),
                    legend=f"p{round(quantile * 100)} {{{{instance}}}}",
                    exemplar=True,
                )
                for quantile in (0.5, 0.95)
            ),
        ),
        Panel(
            id=16,
            title="Indexing throughput and errors",
            description=(
                "Messages indexed per second, and failed indexing attempts per "
                "second by stage (embed, upsert into Qdrant, mark in MongoDB)."
            ),
            unit="short",
            axis_label="per second",
            targets=(
                Target(
                    expr=f"sum({_rate('chat_indexed_messages_total')})",
                    legend="indexed",
                ),
                Target(
                    expr=f"sum by (stage) ({_rate('chat_index_errors_total')})",
                    legend="errors: {{stage}}",
                ),
            ),
        ),
        Panel(
            id=17,
            title="Embedder and Qdrant latency p95",
            description=(
                "p95 duration of one embedder call (a batch of texts) and of one "
                "Qdrant call, by embedder and by operation."
            ),
            unit="s",
            targets=(
                Target(
                    expr=_quantile(
                        0.95, "chat_embedder_request_duration_seconds", by="embedder"
                    ),
                    legend="embed {{embedder}}",
                    exemplar=True,
                ),
                Target(
                    expr=_quantile(
                        0.95, "chat_qdrant_request_duration_seconds", by="operation"
                    ),
                    legend="qdrant {{operation}}",
                    exemplar=True,
                ),
            ),
        ),
    )
}

# (row id, row title, panel ids from left to right). Panels in a row share its
# width equally.
ROWS: tuple[tuple[int, str, tuple[int, ...]], ...] = (
    (100, "Traffic", (1, 2, 3, 4)),
    (101, "Latency", (5, 6, 7, 8)),
    (102, "MongoDB writer", (9, 10, 11)),
    (103, "Process", (12, 13, 18)),
    (104, "Semantic indexing", (14, 15, 16, 17)),
)


def _thresholds(threshold: float | None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if threshold is not None:
        steps.append({"color": "red", "value": threshold})
    return {"mode": "absolute", "steps": steps}


def _panel_json(panel: Panel, grid_pos: dict[str, int]) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "axisLabel": panel.axis_label,
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "thresholdsStyle": {"mode": "off" if panel.threshold is None else "dashed"},
    }
    targets = [
        {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "exemplar": target.exemplar,
            "expr": target.expr,
            "legendFormat": target.legend,
            "range": True,
            "refId": chr(ord("A") + index),
        }
        for index, target in enumerate(panel.targets)
    ]
    return {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "palette-classic"},
                "custom": custom,
                "min": 0,
                "thresholds": _thresholds(panel.threshold),
                "unit": panel.unit,
            },
            "overrides": [],
        },
        "gridPos": grid_pos,
        "id": panel.id,
        "options": {
            "legend": {
                "calcs": [],
                "displayMode": "list",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
        "title": panel.title,
        "type": "timeseries",
    }


def _layout() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row_id, row_title, panel_ids in ROWS:
        panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "id": row_id,
                "panels": [],
                "title": row_title,
                "type": "row",
            }
        )
        y += 1

        width = GRID_WIDTH // len(panel_ids)
        for column, panel_id in enumerate(panel_ids):
            grid_pos = {"h": PANEL_HEIGHT, "w": width, "x": column * width, "y": y}
            panels.append(_panel_json(PANELS[panel_id], grid_pos))
        y += PANEL_HEIGHT
    return panels


def _templating() -> dict[str, Any]:
    # `current` stays empty, so Grafana selects the default Prometheus data
    # source when it loads the dashboard, from a file or through import.
    datasource_variable = {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }
    # No allValue: "All" expands to the instances found, because a regex such
    # as .+ would also match the process_* series of every other job.
    instance_variable = {
        "current": {},
        "datasource": DATASOURCE,
        "definition": "label_values(chat_active_sockets, instance)",
        "hide": 0,
        "includeAll": True,
        "label": "Instance",
        "multi": True,
        "name": "instance",
        "options": [],
        "query": "label_values(chat_active_sockets, instance)",
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }
    return {"list": [datasource_variable, instance_variable]}


def build_dashboard() -> dict[str, Any]:
    """Build the dashboard model that Grafana imports."""
    return {
        # __inputs and __requires are read by Grafana's import dialog only.
        # The panels reference the `datasource` variable, so the dashboard
        # also works when provisioned from a file, where no input is resolved.
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "Prometheus that scrapes the chat gateway.",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {
                "type": "grafana",
                "id": "grafana",
                "name": "Grafana",
                "version": "10.3.0",
            },
            {
                "type": "datasource",
                "id": "prometheus",
                "name": "Prometheus",
                "version": "1.0.0",
            },
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "annotations": {"list": []},
        "description": (
            "Chat gateway: traffic, latency, MongoDB writer, process memory and "
            "semantic indexing. Generated by dashboards/build.py."
        ),
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": _layout(),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["chat-gateway"],
        "templating": _templating(),
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "Chat gateway",
        "uid": DASHBOARD_UID,
        "version": 1,
    }


def render_dashboard() -> str:
    """Return the dashboard as the JSON text committed in DASHBOARD_PATH."""
    return json.dumps(build_dashboard(), indent=2) + "\n"


def panel_queries(
    instance: str = ".+", rate_interval: str = "1m"
) -> dict[str, list[str]]:
    """Return each panel's PromQL by title, with the Grafana variables filled in.

    ``instance`` is a regular expression for the instance label and
    ``rate_interval`` a PromQL duration that replaces ``$__rate_interval``.
    """
    queries: dict[str, list[str]] = {}
    for panel in PANELS.values():
        queries[panel.title] = [
            target.expr.replace("$__rate_interval", rate_interval).replace(
                "$instance", instance
            )
            for target in panel.targets
        ]
    return queries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate dashboards/chat-gateway.json."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 if {DASHBOARD_PATH.name} differs from the generated JSON",
    )
    args = parser.parse_args(argv)

    generated = render_dashboard()
    if args.check:
        if DASHBOARD_PATH.read_text() != generated:
            message = f"{DASHBOARD_PATH} is stale: run `python dashboards/build.py`"
            print(message, file=sys.stderr)
            return 1
        return 0

    DASHBOARD_PATH.write_text(generated)
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
