"""``chat-gateway loadtest``: drive a running gateway and report what it sustains.

Exit codes: 0 when the test ran, whatever it found. 1 when it could not finish,
for example because a worker failed. 2 for bad input: an invalid option, an
unreachable URL or a secret the gateway rejects. 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.auth import SecretError, issue_token, load_secret
from service.loadtest.plan import (
    USERS_PER_TASK,
    BreakingRule,
    StepSpec,
    plan_ramp,
    plan_single,
)
from service.loadtest.report import alert_advice, outcome_to_dict, write_report
from service.loadtest.runner import (
    LoadTestError,
    LoadTestOptions,
    RunOutcome,
    StepResult,
    default_processes,
    run_load_test,
)
from service.loadtest.worker import TaskTokens

__all__ = ["add_loadtest", "run"]

# The gateway's default per-socket limit (CHAT_RATE_LIMIT_PER_SECOND); faster
# users get `rate_limited` acks unless the gateway under test raises it.
_DEFAULT_SOCKET_RATE_LIMIT = 10.0


class InputError(ValueError):
    """An option, URL or secret that makes the test impossible to run."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _factor(text: str) -> float:
    value = _positive_float(text)
    if value <= 1:
        raise argparse.ArgumentTypeError(f"must be greater than 1, not {text!r}")
    return value


def add_loadtest(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``loadtest`` subcommand on ``chat-gateway``'s parser."""
    parser = commands.add_parser(
        "loadtest",
        help="measure what a running gateway sustains",
        description="Connect an operator and a manager per task over websocket, send "
        "messages on a fixed open-loop schedule, and report ack and delivery "
        "latency, achieved rate and errors. With --ramp, step the offered rate up "
        "and report the breaking point: the highest rate with p95 ack latency within "
        "--max-p95-ms, errors below 0.1% and achieved rate within 5% of offered. "
        "A ramp adds users sending at --rate until all --tasks are active, then "
        "raises the rate of each user.",
    )
    _add_load_options(parser)
    _add_ramp_options(parser.add_argument_group("ramp"))
    _add_output_options(parser)
    parser.set_defaults(handler=run)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="gateway base URL (default http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--tasks",
        type=_positive_int,
        default=10,
        help="tasks, each with an operator and a manager socket (default 10)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=1.0,
        help="messages per second per user (default 1)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        help="seconds of sending, per step with --ramp (default 10)",
    )
    parser.add_argument(
        "--processes",
        type=_positive_int,
        help="generator processes (default: enough for the peak rate, at most one "
        "per CPU)",
    )
    parser.add_argument(
        "--secret",
        help="the gateway's JWT secret (default: CHAT_JWT_SECRET, then the file in "
        "--data-dir)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the gateway's data folder, to read its secret (default ./data)",
    )
    parser.add_argument(
        "--text-bytes",
        type=_positive_int,
        default=200,
        help="message text length in bytes (default 200)",
    )


def _add_ramp_options(ramp: argparse._ArgumentGroup) -> None:
    ramp.add_argument(
        "--ramp", action="store_true", help="step the offered rate up until it breaks"
    )
    ramp.add_argument(
        "--ramp-start",
        type=_positive_float,
        help="offered messages/s of the first step (default: tasks x 2 x rate)",
    )
    increment = ramp.add_mutually_exclusive_group()
    increment.add_argument(
        "--ramp-step",
        type=_positive_float,
        help="messages/s added per step (default: the start rate)",
    )
    increment.add_argument(
        "--ramp-factor",
        type=_factor,
        help="multiply the offered rate by this each step, instead of adding",
    )
    ramp.add_argument(
        "--ramp-steps",
        type=_positive_int,
        default=10,
        help="maximum number of steps; the ramp stops at the first failed step "
        "(default 10)",
    )
    ramp.add_argument(
        "--ramp-retries",
        type=int,
        default=1,
        choices=range(4),
        metavar="{0..3}",
        help="run a failed step again up to this many times before the ramp stops; "
        "a step passes if any attempt passes, which rides over short stalls of a "
        "shared machine (default 1)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-p95-ms",
        type=_positive_float,
        default=150.0,
        help="p95 ack latency a step may reach and still pass (default 150)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_positive_float,
        default=5.0,
        help="seconds to wait after a step for its last acks and deliveries "
        "(default 5); later ones count as errors",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("loadtest-results"),
        help="folder for report.json, report.md and report.png "
        "(default ./loadtest-results)",
    )
    parser.add_argument(
        "--metrics-url",
        help="the gateway's Prometheus endpoint, scraped before and after each step "
        "(default: URL/metrics)",
    )
    parser.add_argument(
        "--server-pid",
        type=_positive_int,
        help="pid of a gateway on this machine, to read the CPU time of it and its "
        "children (the embedded SecantusDB) from /proc",
    )
    parser.add_argument("--seed", type=int, help="random seed for the send phases")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress lines on stderr"
    )


def _resolve_secret(args: argparse.Namespace) -> str:
    configured = args.secret or os.environ.get("CHAT_JWT_SECRET", "")
    data_dir = args.data_dir or Path(os.environ.get("CHAT_DATA_DIR", "./data"))
    try:
        return load_secret(configured, data_dir, create=False)
    except SecretError as exc:
        raise InputError(str(exc)) from None


def _check_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(
            f"--url must be an http:// or https:// URL such as "
            f"http://127.0.0.1:8000, not {url!r}"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InputError(f"--url has an invalid port: {url!r}") from None
    try:
        with socket.create_connection((parts.hostname, port), timeout=3):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot reach the gateway at {url} ({exc.strerror or exc}): start it "
            "with `chat-gateway serve` or check --url"
        ) from None
    return parts.hostname, port


async def _probe(url: str, token: str) -> None:
    """Connect one socket with a minted token, to check the URL and the secret."""
    import socketio

    rejections: list[Any] = []
    client = socketio.AsyncClient(reconnection=False, handle_sigint=False)
    client.on("connect_error", rejections.append)
    try:
        await client.connect(
            url, auth={"token": token}, transports=["websocket"], wait_timeout=10
        )
    except socketio.exceptions.ConnectionError as exc:
        raise InputError(_probe_failure(url, rejections, exc)) from None
    finally:
        if client.connected:
            await client.disconnect()


def _probe_failure(url: str, rejections: list[Any], exc: Exception) -> str:
    # The gateway rejects a connect with {"message", "data": {"code"}}; any
    # other failure comes before Socket.IO's connect handshake.
    rejection = rejections[0] if rejections else None
    if isinstance(rejection, dict):
        return (
            f"the gateway at {url} rejected the load test's socket: "
            f"{rejection.get('message', rejection)}. Give the gateway's secret with "
            "--secret, CHAT_JWT_SECRET or --data-dir"
        )
    return (
        f"could not open a Socket.IO websocket at {url} ({rejection or exc}): check "
        "that --url points at a chat gateway"
    )


def mint_tasks(secret: str, tasks: int, prefix: str, ttl: float) -> list[TaskTokens]:
    """Return ``tasks`` tasks named ``prefix-N``, each with an operator and a manager token."""
    minted = []
    for number in range(tasks):
        task = f"{prefix}-{number}"
        operator, manager = f"{task}-operator", f"{task}-manager"
        minted.append(
            TaskTokens(
                task=task,
                operator=issue_token(
                    secret, user=operator, task=task, role="operator", ttl=ttl
                ),
                manager=issue_token(
                    secret, user=manager, task=task, role="manager", ttl=ttl
                ),
                operator_user=operator,
                manager_user=manager,
            )
        )
    return minted


def _plan(args: argparse.Namespace) -> list[StepSpec]:
    if not args.ramp:
        ramp_only = ("ramp_start", "ramp_step", "ramp_factor")
        misplaced = [f"--{n.replace('_', '-')}" for n in ramp_only if getattr(args, n)]
        if misplaced:
            raise InputError(f"{', '.join(misplaced)} only apply with --ramp")
        return plan_single(args.tasks, args.rate, args.duration)
    start = args.ramp_start or args.tasks * USERS_PER_TASK * args.rate
    step = args.ramp_step
    if step is None and args.ramp_factor is None:
        step = start
    return plan_ramp(
        tasks=args.tasks,
        rate=args.rate,
        duration=args.duration,
        start=start,
        step=step,
        factor=args.ramp_factor,
        steps=args.ramp_steps,
    )


def _print_step(step: StepResult) -> None:
    spec = step.spec
    p95 = step.ack.percentile(0.95)
    p95_text = "-" if p95 is None else f"{p95 * 1000:.1f} ms"
    verdict = "pass" if step.passed else "FAIL (" + "; ".join(step.failures) + ")"
    attempt = f" attempt {step.attempt}" if step.attempt > 1 else ""
    print(
        f"step {spec.index + 1}{attempt}: offered {spec.offered:.1f}/s by {spec.active_users} "
        f"users, achieved {step.achieved:.1f}/s, p95 ack {p95_text}, "
        f"errors {step.error_count}: {verdict}",
        file=sys.stderr,
        flush=True,
    )
    for warning in step.warnings:
        print(f"  warning: {warning}", file=sys.stderr, flush=True)


def _summary(
    report: dict[str, Any], outcome: RunOutcome, paths: dict[str, Path]
) -> str:
    lines = []
    for step in report["steps"]:
        ack = step["ack_latency"]
        lines.append(
            f"offered {step['offered_per_second']:g}/s  achieved "
            f"{step['achieved_per_second']:g}/s  ack p50/p95/p99/max "
            f"{ack['p50_ms']}/{ack['p95_ms']}/{ack['p99_ms']}/{ack['max_ms']} ms  "
            f"delivery p95 {step['delivery_latency']['p95_ms']} ms  "
            f"sent {step['sent']} acked {step['acked']} delivered {step['delivered']}  "
            f"errors {step['errors'] or 0}"
        )
    if report["ramp"]:
        point = outcome.breaking_point
        if point is None:
            lines.append("breaking point: none, the first step already failed")
        elif outcome.broken_at is None:
            lines.append(
                f"breaking point: not reached; every step passed, up to {point:g}/s"
            )
        else:
            lines.append(f"breaking point: {point:g} messages/s")
        lines.append(alert_advice(point))
    lines.append("report: " + ", ".join(str(path) for path in paths.values()))
    return "\n".join(lines)


def _command_line(args: argparse.Namespace) -> str:
    """Return the command that repeats this run, without the secret."""
    words = ["chat-gateway", "loadtest", "--url", args.url]
    for name in ("tasks", "rate", "duration", "text_bytes", "max_p95_ms"):
        words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.ramp:
        words.append("--ramp")
        for name in (
            "ramp_start",
            "ramp_step",
            "ramp_factor",
            "ramp_steps",
            "ramp_retries",
        ):
            value = getattr(args, name)
            if value is not None:
                words += [f"--{name.replace('_', '-')}", str(value)]
    if args.processes:
        words += ["--processes", str(args.processes)]
    return shlex.join(words)


def _options(
    args: argparse.Namespace, steps: list[StepSpec], tasks: list[TaskTokens]
) -> LoadTestOptions:
    peak = max(s.offered for s in steps)
    peak_user_rate = max(s.user_rate for s in steps)
    if peak_user_rate > _DEFAULT_SOCKET_RATE_LIMIT:
        print(
            f"chat-gateway loadtest: note: users will send up to {peak_user_rate:.1f} "
            f"messages/s each, above the gateway's default per-socket limit of "
            f"{_DEFAULT_SOCKET_RATE_LIMIT:g}/s: raise CHAT_RATE_LIMIT_PER_SECOND on "
            "the gateway or use more --tasks",
            file=sys.stderr,
        )
    return LoadTestOptions(
        url=args.url,
        tasks=tasks,
        steps=steps,
        processes=min(
            args.processes or default_processes(peak, args.tasks), args.tasks
        ),
        rule=BreakingRule(max_p95_seconds=args.max_p95_ms / 1000),
        stop_when_broken=args.ramp,
        retries=args.ramp_retries if args.ramp else 0,
        drain_timeout=args.drain_timeout,
        text_bytes=args.text_bytes,
        metrics_url=args.metrics_url or args.url.rstrip("/") + "/metrics",
        server_pid=args.server_pid,
        seed=args.seed,
    )


def _settings(
    args: argparse.Namespace, processes: int, started: float
) -> dict[str, Any]:
    """Return the settings recorded in the report."""
    return {
        "url": args.url,
        "tasks": args.tasks,
        "rate_per_user": args.rate,
        "duration_seconds": args.duration,
        "processes": processes,
        "text_bytes": args.text_bytes,
        "max_p95_ms": args.max_p95_ms,
        "drain_timeout_seconds": args.drain_timeout,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": _command_line(args),
    }


def run(args: argparse.Namespace) -> int:
    """Run the load test that ``args`` describe; return the exit code."""
    try:
        steps = _plan(args)
        _check_url(args.url)
        secret = _resolve_secret(args)
        planned = sum(s.duration + args.drain_timeout for s in steps)
        run_id = uuid.uuid4().hex[:8]
        tasks = mint_tasks(secret, args.tasks, f"loadtest-{run_id}", ttl=planned + 3600)
        asyncio.run(_probe(args.url, tasks[0].operator))
    except InputError as exc:
        print(f"chat-gateway loadtest: {exc}", file=sys.stderr)
        return 2

    options = _options(args, steps, tasks)
    started = time.time()
    try:
        outcome = run_load_test(
            options,
            progress=None if args.quiet else sys.stderr,
            on_step=None if args.quiet else _print_step,
        )
    except LoadTestError as exc:
        print(f"chat-gateway loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("chat-gateway loadtest: interrupted; no report written", file=sys.stderr)
        return 130

    settings = _settings(args, options.processes, started)
    report = outcome_to_dict(outcome, settings=settings, ramp=args.ramp)
    paths = write_report(report, args.out)
    print(_summary(report, outcome, paths))
    return 0
