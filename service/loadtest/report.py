"""The load-test report: JSON for tools, Markdown for people, a PNG plot.

``report.json`` contains every figure; ``report.md`` and ``report.png`` are drawn
from the same dictionary, so the three never disagree.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from service.loadtest.histogram import LatencyHistogram
from service.loadtest.runner import RunOutcome, StepResult

__all__ = [
    "ALERT_FRACTION",
    "alert_advice",
    "machine_info",
    "outcome_to_dict",
    "write_report",
]

ALERT_FRACTION = 0.8  # the rate alert fires at 80% of the measured breaking point
_RULES_FILE = "alerts/chat-gateway.rules.yml"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _latency(histogram: LatencyHistogram) -> dict[str, Any]:
    return {
        "count": histogram.total,
        "p50_ms": _ms(histogram.percentile(0.50)),
        "p95_ms": _ms(histogram.percentile(0.95)),
        "p99_ms": _ms(histogram.percentile(0.99)),
        "max_ms": _ms(histogram.max),
        "mean_ms": _ms(histogram.mean),
    }


def _step_to_dict(step: StepResult) -> dict[str, Any]:
    spec = step.spec
    return {
        "step": spec.index + 1,
        "attempt": step.attempt,
        "offered_per_second": round(spec.offered, 3),
        "active_users": spec.active_users,
        "user_rate_per_second": round(spec.user_rate, 4),
        "duration_seconds": spec.duration,
        "wall_seconds": round(step.wall_seconds, 3),
        "scheduled": step.scheduled,
        "sent": step.sent,
        "acked": step.acked,
        "delivered": step.delivered,
        "errors": dict(sorted(step.errors.items())),
        "error_fraction": round(step.error_count / step.scheduled, 6)
        if step.scheduled
        else None,
        "achieved_per_second": round(step.achieved, 3),
        "sent_per_second": round(step.sent_rate, 3),
        "ack_latency": _latency(step.ack),
        "delivery_latency": _latency(step.delivery),
        "generator": {
            "cpu_fraction_per_process": [round(c, 3) for c in step.generator_cpu],
            "schedule_lag_p99_ms": _ms(step.lag.percentile(0.99)),
            "schedule_lag_max_ms": _ms(step.lag.max),
        },
        "disconnects": step.disconnects,
        "server": step.server,
        "server_processes_cpu_seconds": step.server_processes_cpu,
        "passed": step.passed,
        "failures": step.failures,
        "warnings": step.warnings,
    }


def machine_info() -> dict[str, Any]:
    """Return the hardware and load the figures were taken on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def alert_advice(breaking_point: float | None) -> str:
    """Return how to set the rate alert from a measured breaking point."""
    if breaking_point is None:
        return (
            "No step passed, so there is no breaking point to set the rate alert "
            "from: start the ramp lower (--ramp-start)."
        )
    threshold = breaking_point * ALERT_FRACTION
    return (
        f"Alert threshold: {ALERT_FRACTION:.0%} of the breaking point "
        f"{breaking_point:.0f} messages/s is {threshold:.0f} messages/s. If the "
        "gateway ran with --workers N, divide by N for the per-process figure. "
        f"In {_RULES_FILE}, alert ChatMessageRateHigh, replace `> 80` with "
        f"`> {threshold:.0f}` in the expression and in the table at the top of the "
        "file. Then move the promtool cases in alerts/chat-gateway.rules.test.yml "
        "and MESSAGE_RATE_LIMIT in dashboards/build.py to the new value, as "
        "docs/alerts.md describes under 'Changing a threshold', and run "
        "`promtool test rules alerts/chat-gateway.rules.test.yml`."
    )


def outcome_to_dict(
    outcome: RunOutcome, *, settings: dict[str, Any], ramp: bool
) -> dict[str, Any]:
    """Return the whole report as plain data (the content of report.json)."""
    broken = outcome.broken_at
    return {
        "settings": settings,
        "ramp": ramp,
        "connect_seconds": round(outcome.connect_seconds, 3),
        "steps": [_step_to_dict(step) for step in outcome.steps],
        "breaking_point_per_second": outcome.breaking_point,
        "first_failed_step": broken.spec.index + 1 if broken else None,
        "alert_threshold_per_second": round(outcome.breaking_point * ALERT_FRACTION, 1)
        if outcome.breaking_point is not None
        else None,
        "machine": machine_info(),
    }


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    machine = report["machine"]
    lines = [
        f"# Load test of {settings['url']}",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
        f"{machine['memory_gib']} GiB; load average after the run "
        f"{' '.join(str(x) for x in machine['load_average'])}. "
        f"Generator: {settings['processes']} processes, {settings['tasks']} tasks "
        f"({2 * settings['tasks']} sockets) connected in "
        f"{report['connect_seconds']} s.",
        "",
        "Latencies run from each message's scheduled send time: ack is send to "
        "ack, delivery is send to the peer's `message` event. Achieved is acks "
        "received during the step's sending time, per second.",
        "",
        "| step | offered/s | users | achieved/s | ack p50 | ack p95 | ack p99 "
        "| ack max | delivery p95 | errors | server CPU ms/msg | Mongo p50/p95 ms "
        "| batch mean | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        ack, delivery = step["ack_latency"], step["delivery_latency"]
        server = step["server"] or {}
        result = "pass" if step["passed"] else "FAIL: " + "; ".join(step["failures"])
        errors = ", ".join(f"{k} {v}" for k, v in step["errors"].items()) or "0"
        mongo = (
            f"{_cell(server.get('mongo_write_p50_ms'))}/"
            f"{_cell(server.get('mongo_write_p95_ms'))}"
        )
        number = f"{step['step']}" + (
            f" (attempt {step['attempt']})" if step["attempt"] > 1 else ""
        )
        lines.append(
            f"| {number} | {step['offered_per_second']:g} "
            f"| {step['active_users']} | {step['achieved_per_second']:g} "
            f"| {_cell(ack['p50_ms'])} | {_cell(ack['p95_ms'])} "
            f"| {_cell(ack['p99_ms'])} | {_cell(ack['max_ms'])} "
            f"| {_cell(delivery['p95_ms'])} | {errors} "
            f"| {_cell(server.get('cpu_ms_per_message'))} | {mongo} "
            f"| {_cell(server.get('batch_size_mean'))} "
            f"| {result} |"
        )
    lines.append("")
    for step in report["steps"]:
        for warning in step["warnings"]:
            lines.append(f"- Step {step['step']}: {warning}")
    if report["ramp"]:
        point = report["breaking_point_per_second"]
        found = "none passed" if point is None else f"{point:g} messages/s"
        lines += [
            "",
            "Breaking point (highest offered rate with p95 ack <= "
            f"{settings['max_p95_ms']:g} ms, errors < 0.1% and achieved within 5% "
            f"of offered): {found}"
            + (
                ""
                if report["first_failed_step"]
                else " (no step failed: the real breaking point is higher)"
            ),
            "",
            alert_advice(point),
        ]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A retried step is drawn once, with its last attempt.
    last = {s["step"]: s for s in report["steps"]}
    steps = [last[number] for number in sorted(last)]
    offered = [s["offered_per_second"] for s in steps]
    figure, (latency, rate) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for key, label in (
        ("p50_ms", "ack p50"),
        ("p95_ms", "ack p95"),
        ("p99_ms", "ack p99"),
    ):
        values = [s["ack_latency"][key] for s in steps]
        latency.plot(offered, values, marker="o", label=label)
    latency.plot(
        offered,
        [s["delivery_latency"]["p95_ms"] for s in steps],
        marker="x",
        linestyle="--",
        label="delivery p95",
    )
    latency.axhline(
        report["settings"]["max_p95_ms"], color="red", linewidth=0.8, label="p95 limit"
    )
    latency.set_ylabel("latency (ms)")
    latency.set_yscale("log")
    latency.legend()
    latency.grid(True, which="both", alpha=0.3)
    label = report["settings"].get("label")
    target = (
        f"{label} at {report['settings']['url']}"
        if label
        else report["settings"]["url"]
    )
    latency.set_title(f"Load test of {target}")

    rate.plot(
        offered, [s["achieved_per_second"] for s in steps], marker="o", label="achieved"
    )
    rate.plot(offered, offered, color="grey", linestyle=":", label="offered")
    point = report["breaking_point_per_second"]
    if point is not None:
        rate.axvline(point, color="green", linewidth=0.8, label="breaking point")
    rate.set_xlabel("offered messages/s")
    rate.set_ylabel("messages/s")
    rate.legend()
    rate.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "plot": out / "report.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(_markdown(report))
    _plot(report, paths["plot"])
    return paths
