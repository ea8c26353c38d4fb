"""The MongoDB writer: one queue, batched ``insert_many`` calls, one ack each.

Messages that arrive within ``CHAT_BATCH_WINDOW_MS`` of the first one in an
empty queue, up to ``CHAT_BATCH_MAX``, go to MongoDB in a single unordered
``insert_many``. Each message's future resolves only when its batch is
acknowledged with the configured write concern, so an ack to a client always
means "stored". Batching is what makes the store keep up: one round trip and
one journal write are shared by the whole batch.

The queue is bounded (``CHAT_WRITER_QUEUE_MAX``): when it is full, ``submit``
raises ``Overloaded`` at once instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pymongo
from opentelemetry.trace import (
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)
from pymongo.errors import (
    BulkWriteError,
    ExecutionTimeout,
    NetworkTimeout,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)

from service.errors import InvalidPayload, Overloaded, StoreUnavailable
from service.logs import flush_kpis, log_kpi_soon
from service.message_span import (
    BATCH_DUPLICATES,
    WriteSpan,
    start_write_span,
    start_write_span_with_links,
    takes_write_spans,
)
from service.metrics import Metrics
from service.settings import Settings
from service.spans import FLAGS, SharedAttributes
from service.store import Document, MessageStore
from service.tracing import Tracing

__all__ = ["BatchWriter", "WriteResult"]

logger = logging.getLogger("chat.writer")
_DUPLICATE_KEY = 11000


@dataclass(slots=True)
class WriteResult:
    """The outcome of one message's write: stored now, or stored earlier."""

    doc: Document
    duplicate: bool
    batch_id: int
    queued_seconds: float


@dataclass(slots=True)
class _Pending:
    doc: Document
    future: asyncio.Future[WriteResult]
    enqueued: float
    span_context: SpanContext | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _error_kind(exc: PyMongoError) -> str:
    if isinstance(exc, ExecutionTimeout | NetworkTimeout | ServerSelectionTimeoutError):
        return "timeout"
    if isinstance(exc, WTimeoutError) or getattr(exc, "timeout", False):
        return "timeout"
    if isinstance(exc, BulkWriteError):
        return "write_error"
    return "unavailable"


class BatchWriter:
    """Batches message inserts and resolves one future per message."""

    def __init__(
        self,
        store: MessageStore,
        settings: Settings,
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._tracing = tracing
        self._queue: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._batch_seq = 0
        self._closing = False
        self._outage_since: float | None = None
        self._shared: SharedAttributes | None = None  # of the batch spans
        # The tracer that starts WriteSpan objects, if this one may.
        self._write_tracer = (
            tracing.tracer if takes_write_spans(tracing.tracer) else None
        )
        self._shared_address: tuple[str, int | None] | None = None

    @property
    def depth(self) -> int:
        """Return the number of messages queued or being written."""
        return len(self._queue) + self._in_flight

    @property
    def saturated(self) -> bool:
        return len(self._queue) >= self._settings.writer_queue_max * 0.9

    def start(self) -> None:
        for number in range(self._settings.writer_concurrency):
            task = asyncio.create_task(self._run(), name=f"mongo-writer-{number}")
            self._tasks.append(task)

    def submit(
        self, doc: Document, span_context: SpanContext | None = None
    ) -> asyncio.Future[WriteResult]:
        """Queue ``doc`` for the next batch and return its future."""
        if self._closing:
            raise Overloaded("the gateway is shutting down: reconnect and resend")
        if len(self._queue) >= self._settings.writer_queue_max:
            raise Overloaded(
                f"the write queue is full ({self._settings.writer_queue_max} "
                "messages): retry with backoff"
            )
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(doc, future, time.perf_counter(), span_context))
        self._metrics.writer_queue_depth.set(len(self._queue))
        self._ready.set()
        return future

    async def drain(self, seconds: float) -> bool:
        """Stop taking messages and wait until every queued one is written."""
        self._closing = True
        deadline = time.monotonic() + seconds
        # Polling keeps the writer free of drain bookkeeping on its hot path.
        while self.depth and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return self.depth == 0

    async def stop(self) -> None:
        """Cancel the writer tasks and fail what is still queued."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    StoreUnavailable("the gateway stopped before the write: resend")
                )
        flush_kpis()  # the per-write lines still waiting

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        window = self._settings.batch_window_ms / 1000
        if window and len(self._queue) < self._settings.batch_max:
            await asyncio.sleep(window)
        size = min(len(self._queue), self._settings.batch_max)
        batch = [self._queue.popleft() for _ in range(size)]
        self._metrics.writer_queue_depth.set(len(self._queue))
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self._in_flight += len(batch)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                # stop() cancelled the write, but the insert may still land.
                self._fail(
                    batch,
                    StoreUnavailable(
                        "the gateway stopped before MongoDB acknowledged the write: "
                        "the message may not be stored; resend it with the same "
                        "client_msg_id"
                    ),
                )
                raise
            except Exception as exc:  # a bug here must not stop every later write
                logger.exception("batch write failed unexpectedly")
                self._fail(batch, StoreUnavailable(f"write failed: {exc}"))
            finally:
                self._in_flight -= len(batch)

    async def _write(self, batch: list[_Pending]) -> None:
        self._batch_seq += 1
        batch_id = self._batch_seq
        span = self._start_span(batch, batch_id)
        started = time.perf_counter()
        error: PyMongoError | None = None
        write_errors: dict[int, dict[str, Any]] = {}
        try:
            with pymongo.timeout(self._settings.mongo_timeout_seconds):
                await self._store.insert_batch([p.doc for p in batch])
        except BulkWriteError as exc:
            write_errors = {e["index"]: e for e in exc.details.get("writeErrors", [])}
            if exc.details.get("writeConcernErrors"):
                error = exc
        except PyMongoError as exc:
            error = exc
        elapsed = time.perf_counter() - started

        self._observe(span, len(batch), elapsed, error, write_errors)
        if error is not None:
            self._record_outage(error, len(batch))
            message = (
                f"MongoDB did not acknowledge the write ({type(error).__name__}): "
                "the message may not be stored; resend it with the same "
                "client_msg_id, which stores it once either way"
            )
            self._fail(batch, StoreUnavailable(message))
            return
        self._record_recovery()
        await self._resolve(batch, batch_id, started, write_errors)

    def _start_span(self, batch: list[_Pending], batch_id: int) -> Any:
        if not self._tracing.enabled:
            return None
        # Only sampled message spans are exported: a link to any other would
        # point at a span that no backend has.
        linked = [
            p.span_context
            for p in batch
            if p.span_context is not None and p.span_context[FLAGS] & TraceFlags.SAMPLED  # type: ignore[operator]
        ]
        shared = self._shared_attributes()
        if self._write_tracer is not None:
            return start_write_span(
                self._write_tracer, shared, linked, len(batch), batch_id
            )
        return start_write_span_with_links(
            self._tracing.tracer, shared, linked, len(batch), batch_id
        )

    def _shared_attributes(self) -> SharedAttributes:
        """Return the batch span's attributes that only change with the server."""
        address = self._store.address
        if self._shared is None or address != self._shared_address:
            attributes: dict[str, Any] = {
                "db.system.name": "mongodb",
                "db.namespace": self._store.database_name,
                "db.collection.name": "messages",
                "db.operation.name": "insert",
            }
            if address is not None:
                attributes["server.address"] = address[0]
                if address[1] is not None:
                    attributes["server.port"] = address[1]
            self._shared = SharedAttributes(attributes)
            self._shared_address = address
        return self._shared

    def _observe(
        self,
        span: Any,
        size: int,
        elapsed: float,
        error: PyMongoError | None,
        write_errors: dict[int, dict[str, Any]],
    ) -> None:
        context = None
        if span is not None:
            context = span.get_span_context()
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            elif any(e.get("code") != _DUPLICATE_KEY for e in write_errors.values()):
                span.set_status(Status(StatusCode.ERROR, "write errors"))
            if error is None:  # unknown when the write failed as a whole
                duplicates = sum(
                    e.get("code") == _DUPLICATE_KEY for e in write_errors.values()
                )
                if type(span) is WriteSpan:
                    span.set_duplicates(duplicates)
                else:
                    span.set_attribute(BATCH_DUPLICATES, duplicates)
            span.end()

        self._metrics.mongo_write_traced.observe(elapsed, context)
        self._metrics.mongo_write_batch_size.observe(size)
        if error is not None:
            self._metrics.mongo_write_errors.labels(error=_error_kind(error)).inc()
        elif any(e.get("code") != _DUPLICATE_KEY for e in write_errors.values()):
            self._metrics.mongo_write_errors.labels(error="write_error").inc()

        mode = self._settings.log_mongo_writes
        if mode == "all" or (
            mode == "sample"
            and random.random() < self._settings.log_mongo_writes_sample_rate  # noqa: S311 - sampling, not security
        ):
            log_kpi_soon("mongo_write_ms", value=round(elapsed * 1000, 3))

    def _record_outage(self, error: PyMongoError, size: int) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.error(
                "MongoDB write failed; rejecting messages with store_unavailable "
                "until it recovers",
                extra={"error": repr(error), "batch_size": size},
            )
        else:
            logger.debug("MongoDB write failed again", extra={"error": repr(error)})

    def _record_recovery(self) -> None:
        if self._outage_since is not None:
            seconds = time.monotonic() - self._outage_since
            self._outage_since = None
            logger.info(
                "MongoDB writes recovered", extra={"outage_seconds": round(seconds, 3)}
            )

    def _fail(self, batch: list[_Pending], error: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def _resolve(
        self,
        batch: list[_Pending],
        batch_id: int,
        started: float,
        write_errors: dict[int, dict[str, Any]],
    ) -> None:
        duplicates = {
            index
            for index, e in write_errors.items()
            if e.get("code") == _DUPLICATE_KEY
        }
        existing: dict[tuple[str, str], Document] = {}
        if duplicates:
            keys = [
                (batch[i].doc["task_id"], batch[i].doc["client_msg_id"])
                for i in duplicates
            ]
            try:
                with pymongo.timeout(self._settings.mongo_timeout_seconds):
                    found = await self._store.find_by_client_ids(keys)
            except PyMongoError as exc:
                logger.warning(
                    "looking up duplicate messages failed", extra={"error": repr(exc)}
                )
                found = []
            existing = {(d["task_id"], d["client_msg_id"]): d for d in found}

        for index, pending in enumerate(batch):
            if pending.future.done():
                continue
            queued = started - pending.enqueued
            if index in duplicates:
                key = (pending.doc["task_id"], pending.doc["client_msg_id"])
                earlier = existing.get(key)
                if earlier is not None and earlier["sender"] != pending.doc["sender"]:
                    # Not a retry: acking it as a duplicate would drop this text.
                    logger.warning(
                        "client_msg_id reused by another sender",
                        extra={"task_id": key[0], "client_msg_id": key[1]},
                    )
                    pending.future.set_exception(
                        InvalidPayload(
                            f"client_msg_id {key[1]!r} is already used by another "
                            f"sender in task {key[0]!r}: send a unique id such as "
                            "a UUID"
                        )
                    )
                elif earlier is not None:
                    result = WriteResult(earlier, True, batch_id, queued)
                    pending.future.set_result(result)
                else:
                    pending.future.set_exception(
                        StoreUnavailable(
                            "the earlier copy of this message could not be read: resend"
                        )
                    )
            elif index in write_errors:
                reason = write_errors[index].get("errmsg", "write error")
                pending.future.set_exception(
                    StoreUnavailable(f"MongoDB rejected the message: {reason}")
                )
            else:
                pending.future.set_result(
                    WriteResult(pending.doc, False, batch_id, queued)
                )
