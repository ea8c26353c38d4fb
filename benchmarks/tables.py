"""Print the Markdown tables of docs/capacity.md from benchmarks/results/.

After a rerun of the benchmarks, ``python -m benchmarks.tables`` prints each
table with the new figures, ready to paste over the old ones.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.harness import RESULTS_DIR


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / name
    return json.loads(path.read_text()) if path.exists() else None


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_DATABASE = "secantusd-py"


def _per_message_ms(step: dict[str, Any], database: bool) -> float | None:
    """Return the CPU ms per message of the server, or of its embedded database."""
    usage = step.get("server_processes_cpu_seconds") or {}
    cpu = [s for name, s in usage.items() if (name == _DATABASE) == database]
    return 1000 * sum(cpu) / step["sent"] if cpu and step["sent"] else None


def users_table(report: dict[str, Any]) -> str:
    """Return one row per ramp step: users, rate, latency, CPU, MongoDB, memory."""
    lines = [
        "| users | offered msg/s | achieved msg/s | ack p50 / p95 / p99 ms "
        "| delivery p95 ms | server CPU ms/msg | SecantusDB CPU ms/msg "
        "| MongoDB write p50 / p95 ms | batch mean | loop lag p95 ms | RSS MB | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    last = {step["step"]: step for step in report["steps"]}
    for number in sorted(last):
        step = last[number]
        ack, server = step["ack_latency"], step["server"] or {}
        result = "pass" if step["passed"] else "FAIL"
        lines.append(
            f"| {step['active_users']} | {step['offered_per_second']:g} "
            f"| {step['achieved_per_second']:.0f} "
            f"| {_cell(ack['p50_ms'])} / {_cell(ack['p95_ms'])} / {_cell(ack['p99_ms'])} "
            f"| {_cell(step['delivery_latency']['p95_ms'])} "
            f"| {_cell(_per_message_ms(step, database=False), 2)} "
            f"| {_cell(_per_message_ms(step, database=True), 2)} "
            f"| {_cell(server.get('mongo_write_p50_ms'))} / "
            f"{_cell(server.get('mongo_write_p95_ms'))} "
            f"| {_cell(server.get('batch_size_mean'))} "
            f"| {_cell(server.get('event_loop_lag_p95_ms'))} "
            f"| {_cell(server.get('rss_mb'))} | {result} |"
        )
    return "\n".join(lines)


def memory_table(results: dict[str, Any]) -> str:
    lines = [
        "| server and clients | sockets | RSS growth KB | KB per socket "
        "| idle CPU, cores |",
        "|---|---|---|---|---|",
    ]
    for mode, figures in results["modes"].items():
        for level in figures["levels"]:
            idle = ", ".join(
                f"{name} {cores}"
                for name, cores in level.get("idle_cpu_cores", {}).items()
            )
            lines.append(
                f"| {figures['server']}, {mode} | {level['sockets']} "
                f"| {level['rss_delta_kb']} | {level['kb_per_socket']} | {idle} |"
            )
    return "\n".join(lines)


def wire_table(results: dict[str, Any]) -> str:
    lines = [
        "| client | TCP payload B/msg | frames/msg | with IPv4+TCP headers B/msg |",
        "|---|---|---|---|",
    ]
    for mode, figures in results["modes"].items():
        lines.append(
            f"| {mode} | {figures['measured_bytes_per_message']['total']} "
            f"| {figures['frames_per_message']} "
            f"| {figures['with_tcp_ip_headers_per_message']} |"
        )
    return "\n".join(lines)


def main() -> None:
    gateway = _load("throughput/gateway/report.json")
    if gateway is not None:
        print("Gateway ramp (benchmarks.throughput):\n")
        print(users_table(gateway), end="\n\n")
    bare = _load("throughput/bare/report.json")
    if bare is not None:
        print("Bare server ramp (benchmarks.throughput):\n")
        print(users_table(bare), end="\n\n")
    memory = _load("idle_memory.json")
    if memory is not None:
        print("Idle sockets (benchmarks.idle_memory):\n")
        print(memory_table(memory), end="\n\n")
    wire = _load("wire.json")
    if wire is not None:
        print("Bytes on the wire (benchmarks.wire):\n")
        print(wire_table(wire))


if __name__ == "__main__":
    main()
