"""The cost of telemetry: gateway throughput with it off, default, and full.

Four configurations of the gateway:

* ``off``: no OTLP endpoint (no spans) and ``CHAT_LOG_MONGO_WRITES=off``;
* ``default``: the defaults, so no spans without an endpoint and 1% of
  MongoDB writes logged (``CHAT_LOG_MONGO_WRITES=sample``);
* ``traced``: every message traced (``OTEL_TRACES_SAMPLER=always_on``),
  exported over OTLP/HTTP to a sink this benchmark runs on 127.0.0.1 that
  accepts and discards ``/v1/traces``, and every MongoDB write logged
  (``CHAT_LOG_MONGO_WRITES=all``);
* ``sampled``: like ``traced`` but with 10% of traces sampled
  (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.1``)
  and the default 1% of MongoDB writes logged: a setting for production.

Metrics cannot be turned off, so every configuration pays for them.

The configurations take turns under the same fixed load (``--load``
messages/s for ``--duration`` seconds, ``--rounds`` times each), so that a
change in the machine's load falls on all of them alike. Each turn starts a
new gateway process, and each round begins with the next configuration.
``--configurations`` runs a subset (``off`` always runs). The figure
compared is the gateway process's CPU time per message, read from /proc, as
the median over the rounds of its ratio to ``off`` in the same round.
While that process is the limit, throughput is inversely proportional to it,
and it is far less sensitive to other work on a shared machine than a
breaking point. ``--ramp`` also ramps each configuration to its breaking
point, for the direct comparison.

Target: telemetry costs at most 10% of throughput.

Run: ``python -m benchmarks.telemetry`` (about 6 minutes), or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.speed_probe import SpeedProbe
from service.loadtest.plan import plan_single
from service.loadtest.runner import LoadTestOptions, default_processes, run_load_test

MAX_COST = 0.10


class _Sink(BaseHTTPRequestHandler):
    """Accept OTLP/HTTP export requests, count them and discard the spans."""

    # Keep connections open between exports, as an OpenTelemetry Collector does.
    protocol_version = "HTTP/1.1"
    requests = 0
    bytes_received = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        with _Sink.lock:
            _Sink.requests += 1
            _Sink.bytes_received += length
        # An empty body is a valid, empty ExportTraceServiceResponse.
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per export request would drown the benchmark's output


def start_sink() -> ThreadingHTTPServer:
    """Serve the OTLP sink on a free 127.0.0.1 port from a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, name="otlp-sink", daemon=True).start()
    return server


def traced_settings(sink_port: int) -> dict[str, str]:
    """Return the gateway settings that trace and log every message."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "always_on",
        "CHAT_LOG_MONGO_WRITES": "all",
    }


def _configurations(sink_port: int) -> dict[str, dict[str, str]]:
    return {
        "off": {"CHAT_LOG_MONGO_WRITES": "off"},
        "default": {},
        "traced": traced_settings(sink_port),
        "sampled": {
            **traced_settings(sink_port),
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
            "CHAT_LOG_MONGO_WRITES": "sample",
        },
    }


def _select(
    configurations: dict[str, dict[str, str]], args: argparse.Namespace
) -> dict[str, dict[str, str]]:
    """Return the configurations named by ``--configurations``, ``off`` first."""
    requested = {
        name.strip() for name in args.configurations.split(",") if name.strip()
    }
    unknown = requested - configurations.keys()
    if unknown:
        raise SystemExit(
            f"unknown configuration {', '.join(sorted(unknown))}: "
            f"choose from {', '.join(configurations)}"
        )
    return {
        name: env
        for name, env in configurations.items()
        if name == "off" or name in requested
    }


def _fixed_load_round(
    server: harness.ServerProcess, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """Offer ``args.load`` messages/s for one step; return the per-message costs."""
    steps = plan_single(args.tasks, args.load / (2 * args.tasks), args.duration)
    options = LoadTestOptions(
        url=server.url,
        tasks=harness.mint_tasks(args.tasks, f"telemetry-{label}"),
        steps=steps,
        processes=args.processes or default_processes(args.load, args.tasks),
        metrics_url=server.url + "/metrics",
        server_pid=server.pid,
    )
    probe = SpeedProbe().start()
    try:
        step = run_load_test(options, progress=None).steps[0]
    finally:
        probe.stop()
    cpu = step.server_processes_cpu or {}
    server_figures = step.server or {}
    return {
        "sent": step.sent,
        "achieved_per_second": round(step.achieved, 1),
        "errors": step.error_count,
        "ack_p50_ms": round((step.ack.percentile(0.5) or 0) * 1000, 2),
        "ack_p95_ms": round((step.ack.percentile(0.95) or 0) * 1000, 2),
        "gateway_cpu_ms_per_message": round(
            1000 * cpu.get("chat-gateway", 0) / max(1, step.sent), 3
        ),
        "secantusdb_cpu_ms_per_message": round(
            1000 * cpu.get("secantusd-py", 0) / max(1, step.sent), 3
        ),
        "mongo_write_p95_ms": server_figures.get("mongo_write_p95_ms"),
        # Each batch costs the gateway a round trip: fewer, larger batches
        # lower its CPU time per message.
        "batch_size_mean": server_figures.get("batch_size_mean"),
        # The machine's speed during the round: CPU µs of one probe unit.
        "probe_unit_us": probe.median_us(),
        "uptime": harness.uptime(),
    }


def _fixed_load(
    workdir: Path, configurations: dict[str, dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Run the fixed load on each configuration in turn, ``args.rounds`` times.

    The configurations take turns, each on a gateway started for its turn, so
    that a change in the machine's load during the run falls on all of them
    alike. The median of the rounds is reported.
    """
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in configurations}
    names = list(configurations)
    for number in range(1, args.rounds + 1):
        # Each round starts with the next configuration, so that none of them
        # always runs first or right after the same neighbour.
        shift = (number - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            # A new process each turn, because a process's memory layout and
            # hash seed shift its CPU time by several percent for its whole life.
            with harness.gateway(
                workdir, configurations[name], name=f"{name}-{number}"
            ) as server:
                figures = _fixed_load_round(server, args, f"{name}-{number}")
            rounds[name].append(figures)
            print(
                f"  round {number} [{name}] {figures['achieved_per_second']}/s, "
                f"p95 ack {figures['ack_p95_ms']} ms, gateway CPU "
                f"{figures['gateway_cpu_ms_per_message']} ms/msg, probe unit "
                f"{figures['probe_unit_us']} µs",
                flush=True,
            )
    summary: dict[str, Any] = {}
    for name, results in rounds.items():
        summary[name] = {
            # With an even number of rounds the median is the mean of two values,
            # so it is rounded to drop the float noise.
            key: round(statistics.median(r[key] for r in results), 3)
            for key in ("gateway_cpu_ms_per_message", "ack_p50_ms", "ack_p95_ms")
        }
        summary[name]["rounds"] = results
    # Each round is compared with the `off` run of the same round, because the
    # CPU time per message drifts between rounds on a shared machine.
    for name, figures in summary.items():
        paired = [
            run["gateway_cpu_ms_per_message"] / off["gateway_cpu_ms_per_message"]
            for run, off in zip(rounds[name], rounds["off"], strict=True)
        ]
        figures["cpu_ratio_to_off"] = round(statistics.median(paired), 3)
        figures["cpu_ratio_by_round"] = [round(ratio, 3) for ratio in paired]
        # With the gateway process as the limit, throughput is inversely
        # proportional to its CPU time per message.
        figures["throughput_ratio_to_off"] = round(1 / statistics.median(paired), 3)
        # The same ratio with each round's CPU time divided by the probe's unit
        # time, which takes out the machine's drift between the two turns.
        adjusted = [
            ratio * off["probe_unit_us"] / run["probe_unit_us"]
            for ratio, run, off in zip(paired, rounds[name], rounds["off"], strict=True)
            if run["probe_unit_us"] and off["probe_unit_us"]
        ]
        if adjusted:
            figures["speed_adjusted_ratio_to_off"] = round(
                statistics.median(adjusted), 3
            )
            figures["speed_adjusted_ratio_by_round"] = [round(r, 3) for r in adjusted]
    return summary


def _ramps(
    workdir: Path, configurations: dict[str, dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    settings = harness.RampSettings(
        tasks=args.tasks,
        rate=1.0,
        start=args.start,
        factor=args.factor,
        steps=args.steps,
        duration=args.duration,
        retries=1,
        processes=args.processes,
    )
    out = harness.RESULTS_DIR / "telemetry"
    points: dict[str, float | None] = {}
    for name, env in configurations.items():
        print(f"gateway, telemetry {name}, ramp:", flush=True)
        with harness.gateway(workdir, env, name=f"ramp-{name}") as server:
            points[name] = harness.ramp(server, name, settings, out)[
                "breaking_point_per_second"
            ]
    return {
        name: {
            "sustainable_per_second": point,
            "ratio_to_off": harness.ratio(point, points["off"]),
        }
        for name, point in points.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--load", type=float, default=250.0, help="fixed offered msg/s (default 250)"
    )
    parser.add_argument("--tasks", type=int, default=125, help="tasks (2 sockets each)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per configuration")
    parser.add_argument("--processes", type=int, help="generator processes")
    parser.add_argument(
        "--ramp",
        action="store_true",
        help="also ramp each configuration to its breaking point (3 more minutes)",
    )
    parser.add_argument("--start", type=float, default=100.0, help="ramp: first msg/s")
    parser.add_argument("--factor", type=float, default=1.3, help="ramp: growth")
    parser.add_argument("--steps", type=int, default=16, help="ramp: maximum steps")
    parser.add_argument(
        "--configurations",
        default="off,default,traced,sampled",
        help="comma-separated subset to run; off is always run (default: all four)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of 5 s (about 1 min)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 5.0

    machine = harness.machine()
    sink = start_sink()
    results: dict[str, Any] = {
        "benchmark": "telemetry",
        "machine": machine,
        "fixed_load": {
            "offered_per_second": args.load,
            "users": 2 * args.tasks,
            "duration_seconds": args.duration,
            "rounds": args.rounds,
        },
    }
    try:
        configurations = _select(_configurations(sink.server_port), args)
        with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as workdir:
            results["configurations"] = _fixed_load(Path(workdir), configurations, args)
            if args.ramp:
                results["ramps"] = _ramps(Path(workdir), configurations, args)
    finally:
        sink.shutdown()
    results["otlp_sink"] = {"requests": _Sink.requests, "bytes": _Sink.bytes_received}
    results["target"] = {"max_throughput_cost": MAX_COST}
    for name in [name for name in configurations if name != "off"]:
        ratio = results["configurations"][name]["throughput_ratio_to_off"]
        results["target"][f"{name}_met"] = ratio is not None and ratio >= 1 - MAX_COST
    path = harness.save("telemetry", results)

    print()
    for name, figures in results["configurations"].items():
        print(
            f"{name:8} gateway CPU {figures['gateway_cpu_ms_per_message']} ms/msg "
            f"(x{figures['cpu_ratio_to_off']} of off, so throughput "
            f"x{figures['throughput_ratio_to_off']}), ack p50/p95 "
            f"{figures['ack_p50_ms']}/{figures['ack_p95_ms']} ms; rounds "
            + ", ".join(f"x{ratio}" for ratio in figures["cpu_ratio_by_round"])
        )
        if "speed_adjusted_ratio_to_off" in figures:
            print(
                f"{'':8} adjusted for the machine's speed: "
                f"x{figures['speed_adjusted_ratio_to_off']}; rounds "
                + ", ".join(
                    f"x{ratio}" for ratio in figures["speed_adjusted_ratio_by_round"]
                )
            )
    for name, figures in results.get("ramps", {}).items():
        print(
            f"{name:8} ramp: sustains {figures['sustainable_per_second']} msg/s "
            f"(x{figures['ratio_to_off']} of off)"
        )
    print(
        f"OTLP sink received {_Sink.requests} export requests, "
        f"{_Sink.bytes_received} bytes"
    )
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
