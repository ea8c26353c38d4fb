"""Fixtures that start real parts: SecantusDB, the gateway on a free port, clients.

The gateway runs in a background thread with its own event loop and a real
uvicorn server on 127.0.0.1, so tests talk to it over real sockets exactly as
a client would. Each gateway gets a fresh MongoDB database and data folder.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
import socketio
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.app import GatewayApp, create_app
from service.auth import issue_token
from service.embedded import EmbeddedMongo, free_port
from service.settings import Settings

SECRET = "test-secret-" + "x" * 40
_database_numbers = itertools.count()

# Keep the gateway's own OTEL settings out of tests unless a test sets them.
for _name in [name for name in os.environ if name.startswith("OTEL_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def secantus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    """One SecantusDB server for the session, with test commands enabled."""
    server = EmbeddedMongo(tmp_path_factory.mktemp("secantus"), test_commands=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mongo(secantus: EmbeddedMongo) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    """A synchronous client for checking what the gateway stored."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        secantus.uri, tz_aware=True
    )
    yield client
    client.close()


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider that keeps finished spans in memory, and its exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def figures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., dict[str, Any]]:
    """Record a test's measured figures as JSON under <basetemp>/reliability/."""

    def record(**values: Any) -> dict[str, Any]:
        folder = tmp_path_factory.getbasetemp() / "reliability"
        folder.mkdir(exist_ok=True)
        row = {"test": request.node.nodeid, **values}
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        (folder / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row))
        return row

    return record


def fail_point(
    uri: str, data: dict[str, Any] | None, *, times: int | None = None
) -> None:
    """Arm (or with ``data=None`` disarm) SecantusDB's ``failCommand`` fail point."""
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        if data is None:
            client.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
            return
        mode: Any = {"times": times} if times else "alwaysOn"
        client.admin.command(
            {"configureFailPoint": "failCommand", "mode": mode, "data": data}
        )


@dataclass
class RunningGateway:
    """A gateway serving on 127.0.0.1 from a background thread."""

    app: GatewayApp
    settings: Settings
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    clients: list[socketio.AsyncClient] = field(default_factory=list)

    @property
    def gateway(self) -> Any:
        return self.app.gateway

    @property
    def database(self) -> str:
        return self.settings.mongodb_database

    def token(
        self, task: str, user: str, role: str = "operator", ttl: float = 600
    ) -> str:
        return issue_token(SECRET, user=user, task=task, role=role, ttl=ttl)

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's own event loop and return its result."""
        loop = self.server_loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    server_loop: asyncio.AbstractEventLoop = field(init=False)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _serve_in_thread(app: GatewayApp, settings: Settings) -> RunningGateway:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        lifespan="on",
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes + 1024,
    )
    server = uvicorn.Server(config)
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        holder["loop"] = loop
        loop.run_until_complete(server.serve())
        # Engine.IO leaves its ping and service tasks behind; end them quietly.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start; see the log above")
        time.sleep(0.05)
    running = RunningGateway(
        app, settings, f"http://127.0.0.1:{settings.port}", server, thread
    )
    running.server_loop = holder["loop"]
    return running


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def gateway_factory(
    secantus: EmbeddedMongo, tmp_path: Path
) -> Iterator[GatewayFactory]:
    """Start gateways with settings overrides; all are stopped after the test."""
    started: list[RunningGateway] = []

    def start(*, tracer_provider: Any = None, **overrides: Any) -> RunningGateway:
        values: dict[str, Any] = {
            "port": free_port(),
            "data_dir": tmp_path / f"gateway-{len(started)}",
            "mongodb_uri": secantus.uri,
            "mongodb_database": f"chat_test_{os.getpid()}_{next(_database_numbers)}",
            "jwt_secret": SECRET,
            "reconcile_interval_seconds": 1.0,
            "index_retry_seconds": 0.2,
            "runtime_log_interval_seconds": 1.0,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings, tracer_provider=tracer_provider)
        running = _serve_in_thread(app, settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    """A gateway on the embedded defaults (SecantusDB, local Qdrant, local embedder)."""
    return gateway_factory()


class Client:
    """A python-socketio client that records the ``message`` events it receives."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: list[dict[str, Any]] = []
        self.sio.on("message", self.received.append)

    async def connect(self) -> Client:
        await self.sio.connect(
            self.url, auth={"token": self.token}, transports=["websocket"]
        )
        return self

    async def send(self, text: str, client_msg_id: str, **extra: Any) -> dict[str, Any]:
        payload = {"client_msg_id": client_msg_id, "text": text, **extra}
        ack: dict[str, Any] = await self.sio.call("send_message", payload, timeout=30)
        return ack

    async def wait_for(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.received

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """Connect Socket.IO clients; all are closed after the test."""
    clients: list[Client] = []

    async def open_client(gateway: RunningGateway, token: str) -> Client:
        client = Client(gateway.url, token)
        clients.append(client)
        return await client.connect()

    yield open_client
    for client in clients:
        await client.close()


def http(gateway: RunningGateway, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=30)


async def eventually(
    check: Callable[[], Any], timeout: float = 20, every: float = 0.1
) -> Any:
    """Poll ``check`` until it returns a truthy value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


@dataclass
class GatewayProcess:
    """``chat-gateway serve`` running as a child process, its stdout captured."""

    process: Any
    url: str
    port: int
    log_path: Path
    env: dict[str, str]

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except Exception:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def wait_ready(url: str, timeout: float = 60, process: Any = None) -> None:
    """Wait until ``url``/readyz returns 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {timeout} s")


@pytest.fixture
def spawn_gateway(
    secantus: EmbeddedMongo, tmp_path: Path
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start ``chat-gateway serve`` subprocesses; all are stopped after the test."""
    import subprocess
    import sys

    started: list[GatewayProcess] = []

    def spawn(
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready: bool = True,
    ) -> GatewayProcess:
        port = port or free_port()
        number = len(started)
        values = {
            "MONGODB_URI": secantus.uri,
            "CHAT_MONGODB_DATABASE": f"chat_proc_{os.getpid()}_{next(_database_numbers)}",
            "CHAT_JWT_SECRET": SECRET,
            "CHAT_RECONCILE_INTERVAL_SECONDS": "1",
            "CHAT_RUNTIME_LOG_INTERVAL_SECONDS": "1",
        }
        values.update(env or {})
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CHAT_"))
        }
        full_env.update(values)
        log_path = tmp_path / f"gateway-{number}.log"
        command = [
            str(Path(sys.executable).with_name("chat-gateway")), "serve",
            "--port", str(port), "--data-dir", str(tmp_path / f"proc-{number}"), *args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=full_env
            )
        running = GatewayProcess(
            process, f"http://127.0.0.1:{port}", port, log_path, values
        )
        started.append(running)
        if ready:
            wait_ready(running.url, process=process)
        return running

    yield spawn
    for running in started:
        running.stop()
