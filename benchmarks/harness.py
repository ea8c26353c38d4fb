"""Shared parts of the benchmarks: servers as subprocesses, ramps, results.

Every server under test runs as its own process (``chat-gateway serve`` or
``python -m benchmarks.bare_server``) on a free 127.0.0.1 port, and the load
generator runs in worker processes of its own, so no two share an event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.embedded import free_port
from service.loadtest import cli as loadtest_cli
from service.loadtest.plan import BreakingRule, plan_ramp
from service.loadtest.report import machine_info, outcome_to_dict, write_report
from service.loadtest.runner import (
    LoadTestOptions,
    StepResult,
    default_processes,
    run_load_test,
)
from service.loadtest.worker import TaskTokens

SECRET = "benchmark-secret-" + "b" * 40
RESULTS_DIR = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent

# Per-socket and per-user limits protect a real deployment from one noisy
# client; a benchmark raises them so that only capacity limits the rate.
UNLIMITED_USERS = {
    "CHAT_RATE_LIMIT_PER_SECOND": "100000",
    "CHAT_RATE_LIMIT_BURST": "100000",
    "CHAT_USER_RATE_LIMIT_PER_SECOND": "100000",
    "CHAT_USER_RATE_LIMIT_BURST": "100000",
}


@dataclass
class ServerProcess:
    """A server under test, started as a subprocess on 127.0.0.1."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _clean_environment(overrides: dict[str, str]) -> dict[str, str]:
    """Return this environment without settings that would change the server."""
    prefixes = ("CHAT_", "OTEL_", "MONGODB_", "QDRANT_", "REDIS_", "GOOGLE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(overrides)
    return env


def _wait_until_up(server: ServerProcess, path: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{server.name} exited at start-up; its log ends:\n{tail}"
            )
        try:
            if path is None:
                with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                    return
            elif httpx.get(server.url + path, timeout=1).status_code == 200:
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} was not up within {timeout:.0f} s")


@contextlib.contextmanager
def gateway(
    workdir: Path,
    env: dict[str, str] | None = None,
    *,
    name: str = "gateway",
    prefix: Sequence[str] = (),
    timeout: float = 90,
) -> Iterator[ServerProcess]:
    """Run ``chat-gateway serve`` with ``env`` on a free port and a fresh data dir.

    ``prefix`` runs the gateway under another program, such as valgrind, with
    this virtual environment's Python; ``timeout`` bounds its start.
    """
    port = free_port()
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    overrides = {
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_INDEXING_ENABLED": "false",
        **UNLIMITED_USERS,
        **(env or {}),
    }
    log_path = data_dir / "gateway.log"
    launcher = [*prefix, sys.executable] if prefix else []
    command = [
        *launcher,
        str(BIN / "chat-gateway"),
        "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_clean_environment(overrides),
        )
    server = ServerProcess(name, process, port, log_path)
    try:
        _wait_until_up(server, "/readyz", timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def bare_server(
    workdir: Path, ws: str = "websockets-sansio"
) -> Iterator[ServerProcess]:
    """Run ``benchmarks.bare_server`` on a free port with uvicorn's ``ws`` protocol."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "bare-server.log"
    command = [
        sys.executable, "-m", "benchmarks.bare_server", "--port", str(port), "--ws", ws
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_clean_environment({}),
            cwd=Path(__file__).parent.parent,
        )
    server = ServerProcess("bare python-socketio", process, port, log_path)
    try:
        _wait_until_up(server, None, 60)
        yield server
    finally:
        server.stop()


def mint_tasks(count: int, prefix: str, ttl: float = 3 * 3600) -> list[TaskTokens]:
    """Return ``count`` tasks with an operator and a manager token each."""
    return loadtest_cli.mint_tasks(SECRET, count, prefix, ttl)


@dataclass(frozen=True)
class RampSettings:
    """One ramp procedure, applied the same way to every server of a benchmark."""

    tasks: int
    rate: float
    start: float
    factor: float
    steps: int
    duration: float
    retries: int
    processes: int | None
    max_p95_ms: float = 150.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def _print_step(label: str, step: StepResult) -> None:
    p95 = step.ack.percentile(0.95)
    p95_text = "-" if p95 is None else f"{p95 * 1000:.1f} ms"
    server = step.server or {}
    print(
        f"  [{label}] offered {step.spec.offered:7.1f}/s  achieved "
        f"{step.achieved:7.1f}/s  p95 ack {p95_text:>9}  errors {step.error_count}  "
        f"server cpu/msg {server.get('cpu_ms_per_message', '-')} ms  "
        f"generator cpu {max(step.generator_cpu, default=0):.0%}  "
        f"{'pass' if step.passed else 'FAIL ' + '; '.join(step.failures)}"
        + (f"  (attempt {step.attempt})" if step.attempt > 1 else ""),
        flush=True,
    )
    for warning in step.warnings:
        print(f"  [{label}]   warning: {warning}", flush=True)


def ramp(
    server: ServerProcess,
    label: str,
    settings: RampSettings,
    out: Path,
    *,
    metrics: bool = True,
) -> dict[str, Any]:
    """Ramp the offered rate against ``server`` and return the report data."""
    steps = plan_ramp(
        tasks=settings.tasks,
        rate=settings.rate,
        duration=settings.duration,
        start=settings.start,
        step=None,
        factor=settings.factor,
        steps=settings.steps,
    )
    peak = max(step.offered for step in steps)
    processes = settings.processes or default_processes(peak, settings.tasks)

    options = LoadTestOptions(
        url=server.url,
        tasks=mint_tasks(settings.tasks, f"bench-{label}-{os.getpid()}"),
        steps=steps,
        processes=processes,
        rule=BreakingRule(max_p95_seconds=settings.max_p95_ms / 1000),
        stop_when_broken=True,
        retries=settings.retries,
        metrics_url=server.url + "/metrics" if metrics else None,
        server_pid=server.pid,
        seed=1,
    )
    uptime_before = uptime()
    outcome = run_load_test(
        options, progress=None, on_step=lambda step: _print_step(label, step)
    )
    report = outcome_to_dict(
        outcome,
        settings={
            "url": server.url,
            "label": label,
            "processes": processes,
            "tasks": settings.tasks,
            "text_bytes": options.text_bytes,
            "max_p95_ms": settings.max_p95_ms,
            **settings.as_dict(),
        },
        ramp=True,
    )

    report["uptime_before"] = uptime_before
    report["uptime_after"] = uptime()
    write_report(report, out / label)
    return report


def sustainable(report: dict[str, Any], max_p95_ms: float) -> float | None:
    """Return the highest passing offered rate when p95 must stay <= max_p95_ms.

    Counts only steps below the first step that failed this stricter limit,
    with every attempt of a step considered.
    """
    best: float | None = None
    by_step: dict[int, list[dict[str, Any]]] = {}
    for step in report["steps"]:
        by_step.setdefault(step["step"], []).append(step)
    for number in sorted(by_step):
        attempts = by_step[number]
        ok = [
            a
            for a in attempts
            if a["passed"]
            and a["ack_latency"]["p95_ms"] is not None
            and a["ack_latency"]["p95_ms"] <= max_p95_ms
        ]
        if not ok:
            break
        best = attempts[0]["offered_per_second"]
    return best


def passing_step(report: dict[str, Any], offered: float) -> dict[str, Any] | None:
    """Return the last passing attempt of the step that offered ``offered``."""
    found = None
    for step in report["steps"]:
        if step["offered_per_second"] == offered and step["passed"]:
            found = step
    return found


def cpu_per_message(step: dict[str, Any] | None) -> dict[str, float]:
    """Return each server process's CPU time per message in a step, in ms."""
    if not step or not step.get("server_processes_cpu_seconds") or not step["sent"]:
        return {}
    return {
        name: round(1000 * seconds / step["sent"], 3)
        for name, seconds in step["server_processes_cpu_seconds"].items()
    }


def uptime() -> str:
    """Return `uptime`'s line: the machine load next to each figure."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        return f"load average: {load}"


def machine() -> dict[str, Any]:
    """Return the hardware, with the note that the generator shares it."""
    info = machine_info()
    info["uptime"] = uptime()
    info["note"] = "the load generator and the server under test share these CPUs"
    return info


def raise_open_files(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def save(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)
