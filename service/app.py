"""The ASGI application: FastAPI and python-socketio, and the parts they share.

``create_app()`` builds one ``Gateway`` (store, writer, indexer, telemetry) and
returns a single ASGI app: Socket.IO on ``/socket.io/``, FastAPI for the rest.
The FastAPI lifespan starts and stops the gateway's parts in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pymongo
import socketio
from bson import ObjectId
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import TracerProvider
from pymongo import WriteConcern

from service import __version__
from service.api import ERRORS, error_response, router
from service.auth import load_secret
from service.embedded import EmbeddedMongo
from service.embedders import Embedder, create_embedder
from service.errors import ChatError, InvalidPayload, StoreUnavailable
from service.indexer import Indexer
from service.logs import configure_logging
from service.messages import MessageService
from service.metrics import Metrics
from service.monitors import Monitors
from service.page import install_page
from service.settings import Settings
from service.sockets import SocketGateway, create_socket_server
from service.store import MessageStore, message_view
from service.tracing import Tracing, create_tracer_provider
from service.vectors import VectorIndex

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("chat.app")
_STATUS = {cls.code: cls.http_status for cls in ChatError.__subclasses__()}


def _redact(uri: str) -> str:
    """Hide the password in a connection string."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


class Gateway:
    """Everything one gateway process runs, wired together."""

    def __init__(
        self, settings: Settings, tracer_provider: TracerProvider | None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = Tracing(tracer_provider)
        span_queue = getattr(tracer_provider, "span_queue", None)
        if span_queue is not None:
            span_queue.on_drop = self.metrics.count_dropped_spans
        self.secret = load_secret(settings.jwt_secret, settings.data_dir, create=True)
        self.embedded: EmbeddedMongo | None = None
        self.closing = False
        self.started = time.monotonic()
        self.last_scrape_seconds = 0.0

        self.sio = create_socket_server(settings)
        self.store: MessageStore
        self.writer: Any = None
        self.indexer: Indexer | None = None
        self.embedder: Embedder | None = None
        self.vectors: VectorIndex | None = None
        self.service: MessageService
        self.sockets: SocketGateway
        self.monitors: Monitors
        self._metrics_server: Any = None
        self._drain_task: asyncio.Task[None] | None = None

    @staticmethod
    def error_status(code: str) -> int:
        return _STATUS.get(code, 500)

    # -- start and stop -----------------------------------------------------

    async def start(self) -> None:
        from service.writer import BatchWriter

        settings = self.settings
        uri = settings.mongodb_uri
        if not uri:
            self.embedded = EmbeddedMongo(settings.data_dir / "secantusdb")
            # Started from this thread, not a pool thread, because the child gets
            # SIGTERM when the thread that started it exits (see EmbeddedMongo).
            self.embedded.start()
            uri = self.embedded.gateway_uri

        self.store = MessageStore(
            uri,
            settings.mongodb_database,
            timeout_seconds=settings.mongo_timeout_seconds,
            write_concern=WriteConcern(
                w=settings.write_concern_w, j=settings.write_journal
            ),
        )
        await self._ensure_indexes()

        self.writer = BatchWriter(self.store, settings, self.metrics, self.tracing)
        if settings.indexing_enabled:
            self.embedder = create_embedder(
                settings.embedder,
                google_api_key=settings.google_api_key or None,
                google_model=settings.google_model,
                google_base_url=settings.google_base_url,
                google_dimension=settings.google_dimension,
            )
            self.vectors = VectorIndex(
                url=settings.qdrant_url,
                api_key=settings.qdrant_api_key,
                path=settings.data_dir / "qdrant",
                collection=settings.qdrant_collection,
            )
            self.indexer = Indexer(
                self.store,
                self.vectors,
                self.embedder,
                settings,
                self.metrics,
                self.tracing,
            )

        self.sockets = SocketGateway(
            self.sio, settings, self.metrics, self._make_service(), self.secret
        )
        self.monitors = Monitors(
            self.metrics,
            runtime_interval=settings.runtime_log_interval_seconds,
            memory_limit=settings.memory_limit_bytes,
            accepted=lambda: self.service.accepted_count,
            active_sockets=lambda: self.sockets.active,
        )
        await self._open_vectors()
        self.writer.start()
        if self.indexer is not None:
            self.indexer.start()
        self.monitors.start()
        self._start_metrics_port()
        self.install_signal_handlers()
        _freeze_startup_heap()
        self._log_started(uri)

    async def _open_vectors(self) -> None:
        if self.vectors is None or self.embedder is None:
            return
        try:
            await asyncio.wait_for(self.vectors.open(self.embedder.dimension), 30)
        except Exception as exc:  # chat works without Qdrant; the indexer retries
            logger.warning(
                "Qdrant is not available; chat works, indexing waits and retries",
                extra={"qdrant": self.vectors.location, "error": repr(exc)},
            )

    def _make_service(self) -> MessageService:
        self.service = MessageService(
            self.settings,
            self.metrics,
            self.tracing,
            self.writer,
            self.indexer,
            fanout=lambda room, view: self.sockets.fanout(room, view),
        )
        return self.service

    async def _ensure_indexes(self, attempts: int = 15) -> None:
        for attempt in range(1, attempts + 1):
            try:
                with pymongo.timeout(self.settings.mongo_timeout_seconds):
                    await self.store.ensure_indexes()
                return
            except pymongo.errors.PyMongoError as exc:
                if attempt == attempts:
                    raise RuntimeError(
                        f"MongoDB at {_redact(self.store.uri)} is unreachable after "
                        f"{attempts} attempts ({exc}): check MONGODB_URI and that the "
                        "server is up"
                    ) from exc
                logger.warning(
                    "MongoDB not reachable yet; retrying",
                    extra={"attempt": attempt, "error": repr(exc)},
                )
                await asyncio.sleep(1)

    def _start_metrics_port(self) -> None:
        port = self.settings.metrics_port
        if port is None or self.settings.workers > 1:
            return  # with several workers the supervisor serves the metrics port
        from prometheus_client import start_http_server

        server, _thread = start_http_server(
            port, addr=self.settings.host, registry=self.metrics.exposition_registry()
        )
        self._metrics_server = server
        logger.info("serving metrics on their own port", extra={"port": port})

    def _log_started(self, uri: str) -> None:
        settings = self.settings
        qdrant = self.vectors.location if self.vectors else "off"
        url = f"http://{settings.host}:{settings.port}"
        command = Path(sys.executable).with_name("chat-gateway")
        logger.info(
            "chat gateway started on %s; mint a token with `%s token "
            "--task TASK --user USER --role operator --data-dir %s`",
            url,
            command if command.exists() else "chat-gateway",
            settings.data_dir,
            extra={
                "url": url,
                "version": __version__,
                "mongodb": _redact(uri),
                "mongodb_embedded": self.embedded is not None,
                "qdrant": qdrant,
                "embedder": self.embedder.name if self.embedder else "off",
                "redis": _redact(settings.redis_url) if settings.redis_url else "off",
                "tracing": "otlp" if self.tracing.enabled else "off",
                "data_dir": str(settings.data_dir.resolve()),
                "transports": "polling+websocket"
                if settings.allow_polling
                else "websocket",
            },
        )

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM or SIGINT before uvicorn closes any socket.

        uvicorn closes every websocket as soon as it receives the signal, which would
        drop the acks of messages still being written. This handler runs first:
        it rejects new messages with ``overloaded``, waits up to
        ``CHAT_DRAIN_TIMEOUT_SECONDS`` for the writer to empty, and then hands the
        signal to uvicorn's own handler. A second signal goes to uvicorn at once.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread receives signals (tests run servers in threads)
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)
            if not callable(previous):
                continue

            def forward(number: int = number, previous: Any = previous) -> None:
                previous(number, None)

            def on_signal(number: int = number, forward: Any = forward) -> None:
                if self.closing:
                    forward()
                    return
                task = loop.create_task(self.drain())
                task.add_done_callback(lambda _: forward())
                self._drain_task = task

            loop.add_signal_handler(number, on_signal)

    async def drain(self) -> None:
        """Stop taking messages and write out every one already accepted."""
        if self.closing:
            return
        self.closing = True
        started = time.monotonic()
        depth = self.writer.depth if self.writer else 0
        logger.info("draining: new messages are rejected", extra={"in_flight": depth})
        flushed = await self.writer.drain(self.settings.drain_timeout_seconds)
        if not flushed:
            # Fail what is left now, while the sockets can still carry the acks.
            await self.writer.stop()
        await self._wait_for_acks(started + self.settings.drain_timeout_seconds + 1)
        logger.info(
            "drained" if flushed else "drain timed out; unwritten messages get errors",
            extra={
                "seconds": round(time.monotonic() - started, 3),
                "left": self.writer.depth,
            },
        )

    async def _wait_for_acks(self, deadline: float) -> None:
        """Wait until every handled message's ack has left its socket's queue.

        A resolved write still has to pass the fan-out, the ack packet and
        Engine.IO's per-socket send queue. Closing the websockets before that
        would drop acks of stored messages. The state must hold on two polls
        in a row, because an ack is briefly in none of those places.
        """
        quiet_polls = 0
        while quiet_polls < 2 and time.monotonic() < deadline:
            busy = self.service.in_flight > 0 or any(
                not socket.queue.empty()
                for socket in list(self.sio.eio.sockets.values())
            )
            quiet_polls = 0 if busy else quiet_polls + 1
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.writer is not None:
            await self.drain()
            await self.writer.stop()
        if self.indexer is not None:
            await self.indexer.stop()
        with contextlib.suppress(AttributeError):
            await self.monitors.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.vectors is not None:
            await self.vectors.close()
        with contextlib.suppress(AttributeError):
            await self.store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
        self.tracing.shutdown()
        self.metrics.mark_dead(os.getpid())
        gc.unfreeze()  # what start() froze may now be garbage
        logger.info("chat gateway stopped")

    # -- queries ------------------------------------------------------------

    async def search(self, task: str, query: str, limit: int) -> list[dict[str, Any]]:
        if self.embedder is None or self.vectors is None:
            raise StoreUnavailable(
                "search is off on this gateway (CHAT_INDEXING_ENABLED=false)"
            )
        started = time.perf_counter()
        try:
            if not self.vectors.is_open:
                await self.vectors.open(self.embedder.dimension)
            vector = (await self.embedder.embed([query]))[0]
            hits = await self.vectors.search(vector, task_id=task, limit=limit)
        except ChatError:
            raise
        except Exception as exc:
            logger.warning("search failed", extra={"task_id": task, "error": repr(exc)})
            raise StoreUnavailable(
                f"search is unavailable ({type(exc).__name__}): retry later; chat still works"
            ) from exc
        finally:
            self.metrics.qdrant_duration.labels(operation="search").observe(
                time.perf_counter() - started
            )
        docs = await self.store.get_many([ObjectId(hit.message_id) for hit in hits])
        return [
            {
                "score": hit.score,
                "message": message_view(docs[ObjectId(hit.message_id)]),
            }
            for hit in hits
            if ObjectId(hit.message_id) in docs
        ]

    async def readiness(self) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        try:
            with pymongo.timeout(1.0):
                await self.store.ping()
            checks["mongodb"] = {"ok": True}
        except Exception as exc:
            checks["mongodb"] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}"[:300],
            }

        if self.vectors is not None:
            ok = self.vectors.is_open
            error = None
            if ok:
                try:
                    await asyncio.wait_for(self.vectors.ping(), 2.0)
                except Exception as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"[:300]
            elif self.indexer is not None:
                error = self.indexer.last_error or "not opened yet"
            checks["qdrant"] = {"ok": ok} if ok else {"ok": False, "error": error}

        saturated = self.writer.saturated
        checks["writer"] = {
            "ok": not saturated and not self.closing,
            "queue_depth": self.writer.depth,
        }
        if self.closing:
            checks["writer"]["error"] = "shutting down"
        return checks


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ChatError)
    async def chat_error(request: Request, exc: ChatError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            position = first.get("loc", ("body", 0))[-1]
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            return error_response(
                InvalidPayload(
                    f"the request body is not valid JSON ({reason} at character "
                    f"{position}): send a JSON object such as "
                    '{"client_msg_id": "...", "text": "..."}'
                )
            )
        where = ".".join(str(part) for part in first.get("loc", ()))
        detail = (
            f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        )
        return error_response(InvalidPayload(f"invalid request: {detail}"))


class GatewayApp(socketio.ASGIApp):  # type: ignore[misc]  # python-socketio is untyped
    """The ASGI app, with the gateway it serves attached."""

    gateway: Gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            receive = _end_on_undecodable_frame(receive)
        await super().__call__(scope, receive, send)


def _end_on_undecodable_frame(receive: Any) -> Any:
    """Turn a text frame that is not an Engine.IO packet into a disconnect.

    python-engineio 4.15 decodes each frame outside its error handling. An empty
    frame, or one that does not start with a packet type digit, raised out of the
    connection and left its socket in every room until the ping timeout (45 s).
    """

    async def receive_checked() -> Any:
        message = await receive()
        text = message.get("text") if message["type"] == "websocket.receive" else None
        if text is not None and (not text or text[0] not in "0123456789"):
            return {"type": "websocket.disconnect", "code": 1003}
        return message

    return receive_checked


def _freeze_startup_heap() -> None:
    """Keep the collector off the objects made at start-up.

    Modules, settings, clients and models live as long as the process. Frozen,
    they are skipped by every later collection. Without this, each full
    collection walked all of them again and held the event loop for 150-250 ms
    on the reference host. Messages keep objects alive for a while (spans wait for
    their export batch), so full collections came every few thousand messages.
    """
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> GatewayApp:
    """Build the gateway and its ASGI app.

    ``tracer_provider`` overrides the one the ``OTEL_*`` variables describe
    (tests pass one with an in-memory exporter).
    """
    settings = settings or Settings()
    provider = tracer_provider or create_tracer_provider()
    gateway = Gateway(settings, provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    api = FastAPI(
        title="chat-gateway",
        version=__version__,
        lifespan=lifespan,
        responses=ERRORS,
        description="HTTP side of the chat gateway. Real-time chat is on Socket.IO.",
    )
    api.state.gateway = gateway
    api.include_router(router)
    _install_error_handlers(api)
    install_page(api, settings)

    if provider is not None:
        FastAPIInstrumentor.instrument_app(
            api,
            tracer_provider=provider,
            excluded_urls="/metrics,/healthz,/readyz,/static",
        )

    app = GatewayApp(gateway.sio, other_asgi_app=api)
    app.gateway = gateway
    return app


def create_app_from_env() -> GatewayApp:
    """Factory for uvicorn workers: settings and logging from the environment."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
