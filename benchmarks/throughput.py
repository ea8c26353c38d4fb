"""Throughput of the full gateway against a bare python-socketio server.

Both run as subprocesses on this machine and get the same ramp from the same
load generator: the offered rate grows by ``--factor`` per step until a step
breaks the rule (p95 ack latency <= 150 ms, errors < 0.1%, achieved within 5%
of offered). The bare server is the ceiling of uvicorn + python-socketio here.
The gateway adds validation, rate limits and the durable MongoDB write
(embedded SecantusDB unless MONGODB_URI is set). It also adds metrics, and
tracing as configured by default, which is off without an OTLP endpoint.

Targets: the gateway sustains at least 60% of the bare server's rate, and at
least 2,000 messages/s with p95 ack latency <= 50 ms.

Run: ``python -m benchmarks.throughput`` (about 3 minutes), or ``--quick``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import harness

TARGET_RATIO = 0.6
TARGET_RATE = 2000.0
TARGET_P95_MS = 50.0


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    point = report["breaking_point_per_second"]
    at_point = harness.passing_step(report, point) if point is not None else None
    server = (at_point or {}).get("server") or {}
    return {
        "sustainable_per_second": point,
        "sustainable_p95_50ms_per_second": harness.sustainable(report, TARGET_P95_MS),
        "broke": report["first_failed_step"] is not None,
        "at_sustainable": {
            "ack_latency": (at_point or {}).get("ack_latency"),
            "server_processes_cpu_seconds": (at_point or {}).get(
                "server_processes_cpu_seconds"
            ),
            "cpu_ms_per_message": harness.cpu_per_message(at_point),
            "mongo_write_p50_ms": server.get("mongo_write_p50_ms"),
            "mongo_write_p95_ms": server.get("mongo_write_p95_ms"),
            "batch_size_mean": server.get("batch_size_mean"),
        },
        "uptime_before": report["uptime_before"],
        "uptime_after": report["uptime_after"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks (2 sockets each)")
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s per user")
    parser.add_argument("--start", type=float, default=100.0, help="first step, msg/s")
    parser.add_argument("--factor", type=float, default=1.3, help="growth per step")
    parser.add_argument("--steps", type=int, default=16, help="maximum steps")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per step")
    parser.add_argument(
        "--retries", type=int, default=1, help="retries of a failed step"
    )
    parser.add_argument("--processes", type=int, help="generator processes")
    parser.add_argument(
        "--quick", action="store_true", help="short steps and fewer tasks (about 1 min)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.duration, args.factor = 100, 3.0, 1.6

    settings = harness.RampSettings(
        tasks=args.tasks,
        rate=args.rate,
        start=args.start,
        factor=args.factor,
        steps=args.steps,
        duration=args.duration,
        retries=args.retries,
        processes=args.processes,
    )
    out = harness.RESULTS_DIR / "throughput"
    machine = harness.machine()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as workdir:
        print("bare python-socketio server:", flush=True)
        with harness.bare_server(Path(workdir) / "bare") as server:
            bare = harness.ramp(server, "bare", settings, out, metrics=False)
        print("gateway:", flush=True)
        with harness.gateway(Path(workdir)) as server:
            gateway = harness.ramp(server, "gateway", settings, out)

    bare_summary, gateway_summary = _summary(bare), _summary(gateway)
    ratio = harness.ratio(
        gateway_summary["sustainable_per_second"],
        bare_summary["sustainable_per_second"],
    )
    rate_50 = gateway_summary["sustainable_p95_50ms_per_second"]
    results = {
        "benchmark": "throughput",
        "machine": machine,
        "ramp": settings.as_dict(),
        "bare": bare_summary,
        "gateway": gateway_summary,
        "gateway_to_bare_ratio": ratio,
        "targets": {
            "ratio_at_least": TARGET_RATIO,
            "ratio_met": ratio is not None and ratio >= TARGET_RATIO,
            "rate_at_p95_50ms_at_least": TARGET_RATE,
            "rate_met": rate_50 is not None and rate_50 >= TARGET_RATE,
        },
        "reports": str(out),
    }
    path = harness.save("throughput", results)

    print()
    print(f"bare server sustains  {bare_summary['sustainable_per_second']} msg/s")
    print(f"gateway sustains      {gateway_summary['sustainable_per_second']} msg/s")
    print(f"gateway / bare        {ratio} (target >= {TARGET_RATIO})")
    print(f"gateway at p95<=50 ms {rate_50} msg/s (target >= {TARGET_RATE:g})")
    for label, summary in (("bare", bare_summary), ("gateway", gateway_summary)):
        cpu = summary["at_sustainable"]["cpu_ms_per_message"]
        per_process = ", ".join(f"{name} {ms} ms" for name, ms in cpu.items())
        print(f"{label} CPU per message at its sustainable rate: {per_process}")
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}; per-step reports under {out}")
    return results


if __name__ == "__main__":
    main()
