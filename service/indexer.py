"""Semantic indexing off the hot path: embed messages, upsert them into Qdrant.

MongoDB is the source of truth and the durable queue. Each stored message has
``indexed_at: null`` until its vector is in Qdrant. The hot path offers new
messages to a bounded in-process queue and never waits for it. Whatever the
queue cannot take (it is full, the process restarted, or the embedder or Qdrant
was down) is found again by the reconciler, which re-queues unindexed messages
at start-up and every ``CHAT_RECONCILE_INTERVAL_SECONDS``. An outage therefore
delays indexing and never loses a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from service.embedders import Embedder
from service.metrics import Metrics
from service.settings import Settings
from service.store import Document, MessageStore
from service.tracing import Tracing, trace_id_of
from service.vectors import VectorIndex

__all__ = ["IndexItem", "Indexer"]

logger = logging.getLogger("chat.indexer")
_MAX_BACKOFF_SECONDS = 60.0


@dataclass(slots=True)
class IndexItem:
    """One message waiting to be indexed."""

    message_id: ObjectId
    task_id: str
    text: str
    created_at: datetime
    span_context: SpanContext | None = None

    @classmethod
    def from_doc(
        cls, doc: Document, span_context: SpanContext | None = None
    ) -> IndexItem:
        return cls(
            doc["_id"], doc["task_id"], doc["text"], doc["created_at"], span_context
        )


class Indexer:
    """Embeds queued messages in batches and records them as indexed."""

    def __init__(
        self,
        store: MessageStore,
        vectors: VectorIndex,
        embedder: Embedder,
        settings: Settings,
        metrics: Metrics,
        tracing: Tracing,
    ) -> None:
        self._store = store
        self._vectors = vectors
        self._embedder = embedder
        self._settings = settings
        self._metrics = metrics
        self._tracing = tracing
        self._queue: deque[IndexItem] = deque()
        self._pending: set[ObjectId] = set()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self._healthy = True
        self.last_error: str | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """Return False while the last indexing attempt failed."""
        return self._healthy

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="indexer"),
            asyncio.create_task(self._reconcile_forever(), name="index-reconciler"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def offer(self, item: IndexItem) -> bool:
        """Queue a message unless the queue is full, without blocking or raising."""
        if item.message_id in self._pending:
            return True
        if len(self._queue) >= self._settings.index_queue_max:
            return False
        self._queue.append(item)
        self._pending.add(item.message_id)
        self._metrics.index_queue_depth.set(len(self._queue))
        self._ready.set()
        return True

    async def reconcile(self) -> int:
        """Re-queue stored messages that are not indexed; return how many."""
        backlog = await self._store.count_unindexed()
        self._metrics.index_backlog.set(backlog)
        room = self._settings.index_queue_max - len(self._queue)
        if backlog == 0 or room <= 0:
            return 0

        # Messages younger than one interval are normally still in the queue of
        # the process that stored them; leaving them avoids indexing them twice.
        cutoff = datetime.now(UTC) - timedelta(
            seconds=self._settings.reconcile_interval_seconds
        )
        docs = await self._store.unindexed(created_before=cutoff, limit=room)
        added = sum(
            1
            for doc in docs
            if doc["_id"] not in self._pending and self.offer(IndexItem.from_doc(doc))
        )
        if added:
            logger.info(
                "re-queued unindexed messages",
                extra={"count": added, "backlog": backlog},
            )
        return added

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as exc:
                logger.warning(
                    "reconciling the index failed", extra={"error": repr(exc)}
                )
            await asyncio.sleep(self._settings.reconcile_interval_seconds)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = [
                self._queue[i]
                for i in range(min(len(self._queue), self._settings.index_batch_max))
            ]
            try:
                await self._index(batch)
            except Exception as exc:
                await self._back_off(exc, len(batch))
                continue

            for _ in batch:
                done = self._queue.popleft()
                self._pending.discard(done.message_id)
            self._metrics.index_queue_depth.set(len(self._queue))
            self._recovered()

    async def _back_off(self, exc: Exception, size: int) -> None:
        self._failures += 1
        self._healthy = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        delay = min(
            _MAX_BACKOFF_SECONDS,
            self._settings.index_retry_seconds * 2 ** min(self._failures - 1, 6),
        )
        if self._failures == 1:
            logger.warning(
                "indexing failed; messages stay queued and in MongoDB, retrying",
                extra={
                    "error": self.last_error,
                    "batch_size": size,
                    "retry_in_seconds": delay,
                },
            )
        await asyncio.sleep(delay)

    def _recovered(self) -> None:
        if self._failures:
            logger.info("indexing recovered", extra={"failed_attempts": self._failures})
        self._failures = 0
        self._healthy = True
        self.last_error = None

    async def _index(self, batch: list[IndexItem]) -> None:
        # Only sampled message spans are exported: a link to any other would
        # point at a span that no backend has.
        links = [
            Link(i.span_context)
            for i in batch
            if i.span_context is not None and i.span_context.trace_flags.sampled
        ]
        tracer = self._tracing.tracer
        with tracer.start_as_current_span(
            "index messages",
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "chat.indexer",
                "messaging.operation.type": "process",
                "messaging.batch.message_count": len(batch),
            },
        ) as span:
            try:
                await self._index_batch(batch)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    async def _index_batch(self, batch: list[IndexItem]) -> None:
        tracer = self._tracing.tracer
        if not self._vectors.is_open:
            try:
                await self._vectors.open(self._embedder.dimension)
            except Exception:
                self._metrics.index_errors.labels(stage="upsert").inc()
                raise
            logger.info(
                "Qdrant collection ready",
                extra={
                    "collection": self._vectors.collection,
                    "location": self._vectors.location,
                },
            )

        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"embeddings {self._embedder.model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "embeddings",
                "gen_ai.request.model": self._embedder.model,
                "gen_ai.provider.name": self._embedder.name,
                "chat.embedder.batch_size": len(batch),
            },
        ):
            try:
                vectors = await self._embedder.embed([item.text for item in batch])
            except Exception:
                self._metrics.index_errors.labels(stage="embed").inc()
                raise
            finally:
                self._metrics.embedder_duration.labels(
                    embedder=self._embedder.name
                ).observe(time.perf_counter() - started, exemplar=_current_exemplar())

        payloads: list[dict[str, Any]] = [
            {
                "message_id": str(item.message_id),
                "task_id": item.task_id,
                "created_at": item.created_at.timestamp(),
            }
            for item in batch
        ]
        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"upsert {self._vectors.collection}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "qdrant",
                "db.operation.name": "upsert",
                "db.collection.name": self._vectors.collection,
                "db.operation.batch.size": len(batch),
            },
        ):
            try:
                await self._vectors.upsert(vectors, payloads)
            except Exception:
                self._metrics.index_errors.labels(stage="upsert").inc()
                raise
            finally:
                self._metrics.qdrant_duration.labels(operation="upsert").observe(
                    time.perf_counter() - started, exemplar=_current_exemplar()
                )

        now = datetime.now(UTC)
        with tracer.start_as_current_span(
            "update messages",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "mongodb",
                "db.operation.name": "update",
                "db.collection.name": "messages",
                "db.operation.batch.size": len(batch),
            },
        ):
            try:
                await self._store.mark_indexed([item.message_id for item in batch], now)
            except Exception:
                self._metrics.index_errors.labels(stage="mark").inc()
                raise

        self._metrics.indexed.inc(len(batch))
        exemplar = _current_exemplar()
        for item in batch:
            lag = (now - item.created_at).total_seconds()
            self._metrics.index_lag.observe(max(lag, 0.0), exemplar=exemplar)


def _current_exemplar() -> dict[str, str] | None:
    """Return an exemplar naming the current span's trace, if it is sampled."""
    trace_id = trace_id_of(trace.get_current_span().get_span_context())
    return {"trace_id": trace_id} if trace_id else None
