"""One load-generator process: its share of the tasks, run step by step.

The parent process sends commands through a ``multiprocessing`` pipe and gets
reports back the same way (the messages are the dataclasses below). Each task
has an operator and a manager, both python-socketio ``AsyncClient`` sockets
over websocket. Latencies are measured from a message's scheduled send time,
so a generator that falls behind shows up in the latency and in its schedule
lag, instead of quietly sending less.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from service.loadtest.histogram import LatencyHistogram
from service.loadtest.plan import StepSpec, send_offsets

__all__ = [
    "ConnectReport",
    "IntervalReport",
    "StepCommand",
    "StepReport",
    "TaskTokens",
    "WorkerConfig",
    "WorkerFailed",
    "worker_main",
]

_CONNECT_CONCURRENCY = 20
_CONNECT_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True, slots=True)
class TaskTokens:
    """A task and the access tokens of its operator and manager."""

    task: str
    operator: str
    manager: str
    operator_user: str
    manager_user: str


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    worker: int
    url: str
    socketio_path: str
    tasks: list[TaskTokens]
    text_bytes: int
    seed: int
    run_id: str


@dataclass(frozen=True, slots=True)
class StepCommand:
    """Run ``spec`` on this worker's first ``tasks`` tasks from ``start_at``.

    ``start_at`` is on the ``time.monotonic()`` clock, which all processes of
    the machine share on Linux (CLOCK_MONOTONIC).
    """

    spec: StepSpec
    tasks: int
    start_at: float
    drain_timeout: float


@dataclass(frozen=True, slots=True)
class ConnectReport:
    worker: int
    connected: int
    errors: list[str]
    seconds: float


@dataclass(slots=True)
class IntervalReport:
    """Counts and ack latencies of one worker in one second of a step."""

    worker: int
    step: int
    second: int
    sent: int = 0
    acked: int = 0
    errors: int = 0
    cpu_seconds: float = 0.0
    ack: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class StepReport:
    """Counts and latencies of one worker in a whole step, drain included."""

    worker: int
    step: int
    scheduled: int = 0
    sent: int = 0
    acked: int = 0
    acked_in_window: int = 0
    delivered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ack: LatencyHistogram = field(default_factory=LatencyHistogram)
    delivery: LatencyHistogram = field(default_factory=LatencyHistogram)
    lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    cpu_seconds: float = 0.0  # used while sending
    wall_seconds: float = 0.0  # the sending time
    disconnects: int = 0


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    worker: int
    error: str


class _Sent:
    __slots__ = ("acked", "delivered", "scheduled")

    def __init__(self, scheduled: float) -> None:
        self.scheduled = scheduled
        self.acked = False
        self.delivered = False


class _User:
    """One socket: a user of a task, and the handlers that time its messages."""

    def __init__(self, worker: _Worker, user: str, token: str) -> None:
        import socketio

        self.worker = worker
        self.user = user
        self.token = token
        self.rejection: Any = None
        self.sio = socketio.AsyncClient(
            reconnection=False,
            handle_sigint=False,
            http_session=worker.session,
            request_timeout=_CONNECT_TIMEOUT_SECONDS,
        )
        self.sio.on("message", self._on_message)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)

    def _on_connect_error(self, data: Any) -> None:
        self.rejection = data

    def _on_disconnect(self, reason: Any = None) -> None:
        self.worker.disconnects += 1

    def _on_message(self, view: Any) -> None:
        # The room includes the sender, so it gets its own message back. Only
        # the peer's copy counts as a delivery.
        if not isinstance(view, dict) or view.get("sender") == self.user:
            return
        self.worker.delivered(view.get("client_msg_id"))

    async def connect(self, url: str, path: str) -> None:
        await self.sio.connect(
            url,
            auth={"token": self.token},
            transports=["websocket"],
            socketio_path=path,
            wait_timeout=_CONNECT_TIMEOUT_SECONDS,
        )


class _Worker:
    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        self.session: Any = None
        self.users: list[tuple[_User, _User]] = []
        self.in_flight: dict[str, _Sent] = {}
        self.rng = random.Random(config.seed)  # noqa: S311 - send phases, not security
        self.text = ("load test message " * (config.text_bytes // 18 + 1))[
            : config.text_bytes
        ]
        self.sequence = 0
        self.disconnects = 0
        self.report = StepReport(config.worker, -1)
        self.interval = IntervalReport(config.worker, -1, 0)
        self.window_end = 0.0

    async def run(self) -> None:
        import aiohttp

        # No limit: every websocket keeps one connection of the pool for life.
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(connector=connector)
        try:
            await self._connect_all()
            while True:
                command = await asyncio.to_thread(self.conn.recv)
                if command is None:
                    break
                await self._run_step(command)
        finally:
            await self._close_all()
            await self.session.close()

    # -- sockets ------------------------------------------------------------

    async def _connect_all(self) -> None:
        started = time.monotonic()
        gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
        errors: list[str] = []

        async def connect(user: _User) -> None:
            async with gate:
                try:
                    await user.connect(self.config.url, self.config.socketio_path)
                except Exception as exc:
                    errors.append(_describe_rejection(user, exc))

        for task in self.config.tasks:
            pair = (
                _User(self, task.operator_user, task.operator),
                _User(self, task.manager_user, task.manager),
            )
            self.users.append(pair)
        await asyncio.gather(*(connect(u) for pair in self.users for u in pair))
        connected = sum(u.sio.connected for pair in self.users for u in pair)
        seconds = time.monotonic() - started
        self.conn.send(
            ConnectReport(self.config.worker, connected, errors[:5], seconds)
        )
        self.disconnects = 0

    async def _close_all(self) -> None:
        async def close(user: _User) -> None:
            with contextlib.suppress(Exception):
                if user.sio.connected:
                    await user.sio.disconnect()

        await asyncio.gather(*(close(u) for pair in self.users for u in pair))

    # -- one step -----------------------------------------------------------

    def _schedule(self, command: StepCommand) -> list[tuple[float, _User]]:
        spec = command.spec
        schedule: list[tuple[float, _User]] = []
        for pair in self.users[: command.tasks]:
            for user in pair:
                offsets = send_offsets(spec.user_rate, spec.duration, self.rng)
                schedule.extend((offset, user) for offset in offsets)
        schedule.sort(key=lambda item: item[0])
        return schedule

    async def _run_step(self, command: StepCommand) -> None:
        spec = command.spec
        schedule = self._schedule(command)
        self.report = StepReport(
            self.config.worker, spec.index, scheduled=len(schedule)
        )
        self.interval = IntervalReport(self.config.worker, spec.index, 1)
        self.window_end = command.start_at + spec.duration
        self.disconnects = 0

        await asyncio.sleep(max(0.0, command.start_at - time.monotonic()))
        cpu_started = time.process_time()
        ticker = asyncio.create_task(self._tick(command, cpu_started))
        try:
            await self._send_all(schedule, command.start_at)
        finally:
            await ticker
        # CPU over the sending time only: the drain that follows is mostly idle
        # and would hide a busy generator.
        report = self.report
        report.cpu_seconds = time.process_time() - cpu_started
        report.wall_seconds = time.monotonic() - command.start_at
        await self._drain(command)
        report.disconnects = self.disconnects
        self.conn.send(report)

    async def _send_all(
        self, schedule: list[tuple[float, _User]], start: float
    ) -> None:
        for offset, user in schedule:
            due = start + offset
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic()
            self.report.lag.record(now - due)
            await self._send(user, due)

    async def _send(self, user: _User, scheduled: float) -> None:
        self.sequence += 1
        client_msg_id = f"{self.config.run_id}-{self.config.worker}-{self.sequence}"
        if not user.sio.connected:
            self._count_error("disconnected")
            return
        sent = _Sent(scheduled)
        self.in_flight[client_msg_id] = sent
        payload = {"client_msg_id": client_msg_id, "text": self.text}
        self.report.sent += 1
        self.interval.sent += 1
        await user.sio.emit(
            "send_message",
            payload,
            callback=lambda *ack: self._acked(client_msg_id, sent, ack),
        )

    def _acked(self, client_msg_id: str, sent: _Sent, ack: tuple[Any, ...]) -> None:
        now = time.monotonic()
        if self.in_flight.get(client_msg_id) is not sent:
            return  # acked after its step gave up on it
        body = ack[0] if ack else None
        if not isinstance(body, dict) or body.get("ok") is not True:
            del self.in_flight[client_msg_id]
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            self._count_error(str(code or "bad_ack"))
            return
        latency = now - sent.scheduled
        self.report.acked += 1
        self.report.ack.record(latency)
        self.interval.acked += 1
        self.interval.ack.record(latency)
        if now <= self.window_end:
            self.report.acked_in_window += 1
        sent.acked = True
        if sent.delivered:
            del self.in_flight[client_msg_id]

    def delivered(self, client_msg_id: object) -> None:
        if not isinstance(client_msg_id, str):
            return
        sent = self.in_flight.get(client_msg_id)
        if sent is None or sent.delivered:
            return
        sent.delivered = True
        self.report.delivered += 1
        self.report.delivery.record(time.monotonic() - sent.scheduled)
        if sent.acked:
            del self.in_flight[client_msg_id]

    def _count_error(self, code: str) -> None:
        self.report.errors[code] = self.report.errors.get(code, 0) + 1
        self.interval.errors += 1

    async def _tick(self, command: StepCommand, cpu_started: float) -> None:
        """Send an interval report at each whole second of the step."""
        cpu_before = cpu_started
        seconds = max(1, round(command.spec.duration))
        for second in range(1, seconds + 1):
            at = command.start_at + second * command.spec.duration / seconds
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            cpu_now = time.process_time()
            interval = self.interval
            interval.cpu_seconds = cpu_now - cpu_before
            cpu_before = cpu_now
            self.interval = IntervalReport(
                self.config.worker, command.spec.index, second + 1
            )
            self.conn.send(interval)

    async def _drain(self, command: StepCommand) -> None:
        deadline = time.monotonic() + command.drain_timeout
        # Polling keeps the ack path free of Event bookkeeping per message.
        while self.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for sent in self.in_flight.values():
            self._count_error("not_delivered" if sent.acked else "timeout")
        self.in_flight.clear()


def _describe_rejection(user: _User, exc: Exception) -> str:
    rejection = user.rejection
    if isinstance(rejection, dict):
        message = rejection.get("message")
        data = rejection.get("data")
        code = data.get("code") if isinstance(data, dict) else None
        return f"{code or 'rejected'}: {message}"
    if rejection is not None:
        return f"rejected: {rejection}"
    return f"{type(exc).__name__}: {exc}"


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of a worker process: run until the parent sends None."""
    try:
        import uvloop
    except ImportError:  # uvloop is optional; the stdlib loop works, only slower
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(_Worker(conn, config).run())
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(WorkerFailed(config.worker, traceback.format_exc()))
    finally:
        conn.close()
