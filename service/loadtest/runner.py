"""The parent process of a load test: start workers, run steps, add up results.

Workers are separate processes (``spawn``), so the load generator never
shares an event loop or the GIL with the gateway under test, even when both
run from one Python program. Each step starts at the same monotonic instant in
every worker. After the sends, each worker waits up to ``drain_timeout`` for
the acks and deliveries still in flight before it reports.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from service.loadtest.histogram import LatencyHistogram
from service.loadtest.plan import BreakingRule, StepSpec
from service.loadtest.server_side import ProcessTree, scrape, summarize
from service.loadtest.worker import (
    ConnectReport,
    IntervalReport,
    StepCommand,
    StepReport,
    TaskTokens,
    WorkerConfig,
    WorkerFailed,
    worker_main,
)

__all__ = [
    "GENERATOR_CPU_LIMIT",
    "GENERATOR_LAG_LIMIT_SECONDS",
    "LoadTestError",
    "LoadTestOptions",
    "StepResult",
    "default_processes",
    "run_load_test",
]

# Messages/s given to each generator process by default. Each message costs a
# generator a send, an ack and two `message` events (the sender's own copy and
# the peer's). One process used about 38% of an AMD EPYC core at 690
# messages/s (python-socketio 5.18), so 500 leaves room for bursts.
# NOTE: a slower core needs more processes; --processes sets them.
MESSAGES_PER_PROCESS = 500
GENERATOR_CPU_LIMIT = 0.8  # fraction of one core
GENERATOR_LAG_LIMIT_SECONDS = 0.050
_START_DELAY_SECONDS = 0.5
_CONNECT_TIMEOUT_SECONDS = 300.0


class LoadTestError(RuntimeError):
    """The load test could not run (workers failed, sockets were refused)."""


@dataclass(frozen=True, slots=True)
class LoadTestOptions:
    url: str
    tasks: list[TaskTokens]
    steps: list[StepSpec]
    processes: int
    rule: BreakingRule = field(default_factory=BreakingRule)
    stop_when_broken: bool = False
    retries: int = 0  # extra attempts at a failed step before it counts as broken
    drain_timeout: float = 5.0
    text_bytes: int = 200
    socketio_path: str = "socket.io"
    metrics_url: str | None = None
    server_pid: int | None = None
    seed: int | None = None


@dataclass(slots=True)
class StepResult:
    """One step's figures, from every worker and from the server."""

    spec: StepSpec
    scheduled: int
    sent: int
    acked: int
    delivered: int
    errors: dict[str, int]
    achieved: float  # acks received within the step's sending time, per second
    sent_rate: float
    ack: LatencyHistogram
    delivery: LatencyHistogram
    lag: LatencyHistogram
    generator_cpu: list[float]  # fraction of a core, per worker
    disconnects: int
    wall_seconds: float = 0.0  # from the step's start to the end of its drain
    server: dict[str, Any] | None = None
    server_processes_cpu: dict[str, float] | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    attempt: int = 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def passed(self) -> bool:
        return not self.failures


def default_processes(peak_rate: float, tasks: int) -> int:
    """Return enough worker processes for ``peak_rate``, at most one per core."""
    needed = math.ceil(peak_rate / MESSAGES_PER_PROCESS)
    return max(1, min(needed, os.cpu_count() or 1, tasks))


class _Workers:
    """The worker processes and the pipes to them."""

    def __init__(self, options: LoadTestOptions, run_id: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        self.task_counts: list[int] = []
        seed = options.seed if options.seed is not None else time.time_ns()
        for worker in range(options.processes):
            tasks = options.tasks[worker :: options.processes]
            parent, child = context.Pipe()
            config = WorkerConfig(
                worker=worker,
                url=options.url,
                socketio_path=options.socketio_path,
                tasks=tasks,
                text_bytes=options.text_bytes,
                seed=seed + worker,
                run_id=run_id,
            )
            process = context.Process(
                target=worker_main,
                args=(child, config),
                name=f"loadtest-worker-{worker}",
                daemon=True,
            )
            process.start()
            child.close()
            self.processes.append(process)
            self.conns.append(parent)
            self.task_counts.append(len(tasks))

    def receive(self, timeout: float) -> list[Any]:
        """Return the messages that arrive within ``timeout`` seconds."""
        messages = []
        for conn in wait(self.conns, timeout):
            assert isinstance(conn, Connection)
            try:
                message = conn.recv()
            except EOFError:
                index = self.conns.index(conn)
                raise LoadTestError(
                    f"load-test worker {index} exited unexpectedly "
                    f"(exit code {self.processes[index].exitcode})"
                ) from None
            if isinstance(message, WorkerFailed):
                raise LoadTestError(
                    f"load-test worker {message.worker} failed:\n{message.error}"
                )
            messages.append(message)
        return messages

    def send(self, worker: int, command: StepCommand | None) -> None:
        self.conns[worker].send(command)

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process in self.processes:
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.conns:
            conn.close()


def _active_per_worker(active_tasks: int, task_counts: list[int]) -> list[int]:
    """Split the active tasks the way the tasks were dealt: round robin."""
    workers = len(task_counts)
    return [
        min(count, active_tasks // workers + (1 if w < active_tasks % workers else 0))
        for w, count in enumerate(task_counts)
    ]


class _Progress:
    """One line per second of a step on stderr: offered, achieved, p95, errors."""

    def __init__(self, stream: TextIO | None, workers: int) -> None:
        self.stream = stream
        self.workers = workers
        self.pending: dict[int, list[IntervalReport]] = defaultdict(list)

    def add(self, report: IntervalReport, spec: StepSpec, steps: int) -> None:
        self.pending[report.second].append(report)
        if len(self.pending[report.second]) < self.workers:
            return
        reports = self.pending.pop(report.second)
        if self.stream is None:
            return
        ack = LatencyHistogram()
        for item in reports:
            ack.merge(item.ack)
        seconds = spec.duration / max(1, round(spec.duration))
        p95 = ack.percentile(0.95)
        cpu = max(item.cpu_seconds for item in reports) / seconds
        print(
            f"step {spec.index + 1}/{steps} {report.second:>3}s  "
            f"offered {spec.offered:8.1f}/s  "
            f"sent {sum(r.sent for r in reports) / seconds:8.1f}/s  "
            f"acked {sum(r.acked for r in reports) / seconds:8.1f}/s  "
            f"p95 {_format_ms(p95)}  errors {sum(r.errors for r in reports)}  "
            f"generator cpu {cpu:.0%}",
            file=self.stream,
            flush=True,
        )


def _format_ms(seconds: float | None) -> str:
    return "     -" if seconds is None else f"{seconds * 1000:6.1f} ms"


def _combine(spec: StepSpec, reports: list[StepReport]) -> StepResult:
    ack, delivery, lag = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    errors: dict[str, int] = {}
    for report in reports:
        ack.merge(report.ack)
        delivery.merge(report.delivery)
        lag.merge(report.lag)
        for code, count in report.errors.items():
            errors[code] = errors.get(code, 0) + count
    return StepResult(
        spec=spec,
        scheduled=sum(r.scheduled for r in reports),
        sent=sum(r.sent for r in reports),
        acked=sum(r.acked for r in reports),
        delivered=sum(r.delivered for r in reports),
        errors=errors,
        achieved=sum(r.acked_in_window for r in reports) / spec.duration,
        sent_rate=sum(r.sent for r in reports) / spec.duration,
        ack=ack,
        delivery=delivery,
        lag=lag,
        generator_cpu=[
            r.cpu_seconds / r.wall_seconds if r.wall_seconds else 0.0 for r in reports
        ],
        disconnects=sum(r.disconnects for r in reports),
    )


def _judge(result: StepResult, rule: BreakingRule) -> None:
    result.failures = rule.failures(
        offered=result.spec.offered,
        achieved=result.achieved,
        p95=result.ack.percentile(0.95),
        errors=result.error_count,
        sent=result.scheduled,
    )
    busiest = max(result.generator_cpu, default=0.0)
    if busiest > GENERATOR_CPU_LIMIT:
        result.warnings.append(
            f"a generator process used {busiest:.0%} of a core (limit "
            f"{GENERATOR_CPU_LIMIT:.0%}): the generator may be the bottleneck; "
            "add --processes or run it on another machine"
        )
    lag = result.lag.percentile(0.99)
    if lag is not None and lag > GENERATOR_LAG_LIMIT_SECONDS:
        result.warnings.append(
            f"the generator fell behind its schedule (p99 lag {lag * 1000:.0f} ms, "
            f"limit {GENERATOR_LAG_LIMIT_SECONDS * 1000:.0f} ms): its latencies "
            "include its own delay"
        )
    if result.disconnects:
        result.warnings.append(f"{result.disconnects} sockets disconnected")


class _Run:
    def __init__(self, options: LoadTestOptions, progress: TextIO | None) -> None:
        self.options = options
        self.workers = _Workers(options, uuid.uuid4().hex[:8])
        self.progress_stream = progress
        self.tree = ProcessTree(options.server_pid) if options.server_pid else None

    def connect(self) -> float:
        """Wait until every worker has connected its sockets; return the seconds."""
        reports: list[ConnectReport] = []
        deadline = time.monotonic() + _CONNECT_TIMEOUT_SECONDS
        while len(reports) < len(self.workers.conns):
            if time.monotonic() > deadline:
                raise LoadTestError("the workers did not connect within 300 s")
            for message in self.workers.receive(1.0):
                if isinstance(message, ConnectReport):
                    reports.append(message)
        errors = [error for report in reports for error in report.errors]
        expected = 2 * len(self.options.tasks)
        connected = sum(report.connected for report in reports)
        if errors or connected < expected:
            raise LoadTestError(
                f"{expected - connected} of {expected} sockets failed to connect. "
                f"First errors: {'; '.join(errors[:3])}"
            )
        return max(report.seconds for report in reports)

    def run_step(self, spec: StepSpec, steps: int) -> StepResult:
        metrics_url = self.options.metrics_url
        before = scrape(metrics_url) if metrics_url else None
        cpu_before = self.tree.cpu_seconds() if self.tree else None
        started = time.monotonic()
        start_at = started + _START_DELAY_SECONDS
        shares = _active_per_worker(spec.active_tasks, self.workers.task_counts)
        for worker, tasks in enumerate(shares):
            command = StepCommand(spec, tasks, start_at, self.options.drain_timeout)
            self.workers.send(worker, command)

        reports = self._collect(spec, steps)
        result = _combine(spec, reports)
        wall = time.monotonic() - started
        after = scrape(metrics_url) if metrics_url else None
        result.wall_seconds = wall
        if before is not None and after is not None:
            result.server = summarize(before, after, wall)
        if self.tree is not None and cpu_before is not None:
            cpu_after = self.tree.cpu_seconds()
            result.server_processes_cpu = {
                name: round(seconds - cpu_before.get(name, 0.0), 3)
                for name, seconds in cpu_after.items()
            }
        _judge(result, self.options.rule)
        return result

    def _collect(self, spec: StepSpec, steps: int) -> list[StepReport]:
        progress = _Progress(self.progress_stream, len(self.workers.conns))
        reports: list[StepReport] = []
        timeout = spec.duration + self.options.drain_timeout + 60
        deadline = time.monotonic() + timeout
        while len(reports) < len(self.workers.conns):
            if time.monotonic() > deadline:
                raise LoadTestError(
                    f"step {spec.index + 1} did not finish within {timeout:.0f} s"
                )
            for message in self.workers.receive(1.0):
                if isinstance(message, IntervalReport):
                    progress.add(message, spec, steps)
                elif isinstance(message, StepReport):
                    reports.append(message)
        return reports


@dataclass(slots=True)
class RunOutcome:
    steps: list[StepResult]  # every attempt, retries included, in order
    connect_seconds: float
    broken_at: StepResult | None  # the last attempt of the first step that broke

    @property
    def breaking_point(self) -> float | None:
        """Return the highest offered rate that passed, below the first failure."""
        passed = [
            s.spec.offered
            for s in self.steps
            if s.passed
            and (self.broken_at is None or s.spec.offered < self.broken_at.spec.offered)
        ]
        return max(passed) if passed else None


def run_load_test(
    options: LoadTestOptions,
    *,
    progress: TextIO | None = sys.stderr,
    on_step: Callable[[StepResult], None] | None = None,
) -> RunOutcome:
    """Run every step of ``options`` and return their results."""
    run = _Run(options, progress)
    try:
        connect_seconds = run.connect()
        results: list[StepResult] = []
        broken: StepResult | None = None
        for spec in options.steps:
            for attempt in range(1, options.retries + 2):
                result = run.run_step(spec, len(options.steps))
                result.attempt = attempt
                results.append(result)
                if on_step is not None:
                    on_step(result)
                if result.passed:
                    break
            if not result.passed and broken is None:
                broken = result
                if options.stop_when_broken:
                    break
        return RunOutcome(results, connect_seconds, broken)
    finally:
        run.workers.stop()
