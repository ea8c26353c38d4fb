"""The message pipeline shared by the Socket.IO event and the REST endpoint.

receive → validate → rate-limit → batch write (await the ack of MongoDB) →
fan out to the room → hand off to the indexer → ack. Every failure becomes a
``ChatError`` with a stable code; nothing is acked before it is stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson import ObjectId
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode

from service.auth import Principal
from service.errors import (
    ChatError,
    InvalidPayload,
    RateLimited,
    StoreUnavailable,
    TextTooLong,
)
from service.indexer import Indexer, IndexItem
from service.message_span import (
    BATCH_ID,
    BATCH_WAIT,
    BODY_SIZE,
    CONVERSATION_ID,
    DUPLICATE,
    EMIT_NAME,
    ENQUEUE_NAME,
    MESSAGE_ID,
    MESSAGE_NAME,
    MessageSpan,
    emit_attributes,
    enqueue_attributes,
    socket_attributes,
    start_message_span,
    takes_message_spans,
)
from service.metrics import Metrics
from service.ratelimit import TokenBucket
from service.settings import Settings
from service.store import message_view
from service.tracing import Tracing, extract_context
from service.writer import BatchWriter

__all__ = ["Incoming", "MessageService", "validate_payload"]

logger = logging.getLogger("chat.messages")
_ALLOWED_KEYS = frozenset({"client_msg_id", "text", "traceparent"})

Fanout = Callable[[str, dict[str, Any]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A validated ``send_message`` payload."""

    client_msg_id: str
    text: str
    traceparent: str | None


def _describe(value: object) -> str:
    return (
        type(value).__name__
        if not isinstance(value, str)
        else f"a {len(value)}-char string"
    )


def validate_payload(payload: object, settings: Settings) -> Incoming:
    """Check a payload's shape and limits; raise ``InvalidPayload``/``TextTooLong``."""
    if not isinstance(payload, dict):
        raise InvalidPayload(
            f"payload must be an object {{client_msg_id, text}}, not {_describe(payload)}"
        )
    extra = set(payload) - _ALLOWED_KEYS
    if extra:
        names = ", ".join(sorted(str(k)[:40] for k in extra)[:5])
        raise InvalidPayload(
            f"unexpected fields: {names}; send only client_msg_id, text and traceparent"
        )

    client_msg_id = payload.get("client_msg_id")
    limit = settings.max_client_msg_id_chars
    if not isinstance(client_msg_id, str) or not 0 < len(client_msg_id) <= limit:
        raise InvalidPayload(
            f"client_msg_id must be a string of 1 to {limit} characters, "
            f"not {_describe(client_msg_id)}: send a unique id such as a UUID"
        )
    if not client_msg_id.isprintable():
        raise InvalidPayload(f"client_msg_id must be printable, not {client_msg_id!r}")

    text = payload.get("text")
    if not isinstance(text, str):
        raise InvalidPayload(f"text must be a string, not {_describe(text)}")
    if len(text) > settings.max_text_chars:
        raise TextTooLong(
            f"text is {len(text)} characters; the limit is {settings.max_text_chars}: "
            "split the message"
        )
    if not text.strip():
        raise InvalidPayload("text must contain at least one non-blank character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPayload(
            "text is not valid Unicode (it contains a lone surrogate): send UTF-8 text"
        ) from None

    traceparent = payload.get("traceparent")
    if traceparent is not None and (
        not isinstance(traceparent, str) or len(traceparent) > 128
    ):
        raise InvalidPayload(
            f"traceparent must be a W3C traceparent string, not {_describe(traceparent)}"
        )
    return Incoming(client_msg_id, text, traceparent)


class MessageService:
    """Runs the pipeline for one message and returns its ack."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        tracing: Tracing,
        writer: BatchWriter,
        indexer: Indexer | None,
        fanout: Fanout,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._tracing = tracing
        self._writer = writer
        self._indexer = indexer
        self._fanout = fanout
        # The tracer that starts MessageSpan objects, if this one may.
        self._message_tracer = (
            tracing.tracer if takes_message_spans(tracing.tracer) else None
        )
        self._user_buckets: dict[str, TokenBucket] = {}
        self.accepted_count = 0
        self.in_flight = 0  # messages between receive and ack, for the drain
        self._accepted = metrics.messages.labels(outcome="accepted", code="")
        self._duplicate = metrics.messages.labels(outcome="duplicate", code="")

    def user_bucket(self, user: str) -> TokenBucket:
        bucket = self._user_buckets.get(user)
        if bucket is None:
            bucket = TokenBucket(
                self._settings.user_rate_limit_burst,
                self._settings.user_rate_limit_per_second,
            )
            self._user_buckets[user] = bucket
        return bucket

    def forget_user(self, user: str) -> None:
        """Drop a user's bucket once their last socket has gone."""
        self._user_buckets.pop(user, None)

    async def handle(
        self,
        principal: Principal,
        payload: object,
        *,
        socket_bucket: TokenBucket | None,
        parent: Context | None = None,
        client_id: str | None = None,
        tracestate: str | None = None,
    ) -> dict[str, Any]:
        """Run the pipeline for one payload and return the ack to send.

        ``tracestate`` is the W3C header that came with the payload's
        ``traceparent`` (the REST route's headers).
        """
        received = time.perf_counter()
        span = self._start_span(principal, payload, parent, client_id, tracestate)
        self.in_flight += 1
        context = token = None
        if span is not None:
            context = span.get_span_context()
            # The span is current while the message is handled, so that log
            # lines carry its ids. trace.use_span would cost a generator.
            token = context_api.attach(trace.set_span_in_context(span))
        try:
            ack = await self._process(principal, payload, socket_bucket, span, context)
        except ChatError as error:
            self._metrics.messages.labels(outcome="rejected", code=error.code).inc()
            if span is not None:
                self._identify(span, payload)
                span.set_status(Status(StatusCode.ERROR, error.code))
                span.set_attribute("error.type", error.code)
            ack = error.to_ack()
        except BaseException as exc:  # recorded as trace.use_span records it
            if span is not None and span.is_recording():
                span.record_exception(exc)
                span.set_status(
                    Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                )
            raise
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - received
            if token is not None:
                context_api.detach(token)
            if span is not None:
                span.end()
        self._metrics.ack_traced.observe(elapsed, context)
        return ack

    def _identify(self, span: Span, payload: object) -> None:
        """Give a rejected message's span its valid client_msg_id, if not set yet.

        A payload rejected by validation would otherwise leave no id to find
        its trace by.
        """
        if type(span) is MessageSpan and span.conversation_id is not None:
            return
        client_msg_id = (
            payload.get("client_msg_id") if isinstance(payload, dict) else None
        )
        if (
            isinstance(client_msg_id, str)
            and 0 < len(client_msg_id) <= self._settings.max_client_msg_id_chars
            and client_msg_id.isprintable()
        ):
            span.set_attribute(CONVERSATION_ID, client_msg_id)

    def reject(
        self, principal: Principal, error: ChatError, *, client_id: str | None = None
    ) -> dict[str, Any]:
        """Count and trace a message rejected before its payload is read; return the ack.

        For an event with the wrong number of arguments: its span carries the
        error as any rejected message's span does.
        """
        self._metrics.messages.labels(outcome="rejected", code=error.code).inc()
        span = self._start_span(principal, None, None, client_id, None)
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, error.code))
            span.set_attribute("error.type", error.code)
            span.end()
        return error.to_ack()

    def _start_span(
        self,
        principal: Principal,
        payload: object,
        parent: Context | None,
        client_id: str | None,
        tracestate: str | None,
    ) -> Span | None:
        if not self._tracing.enabled:
            return None
        traceparent = payload.get("traceparent") if isinstance(payload, dict) else None
        context = extract_context(traceparent, tracestate) or parent
        socket = (principal.room, principal.user, principal.role, client_id or "")
        if self._message_tracer is not None:
            return start_message_span(self._message_tracer, context, socket)
        return self._tracing.tracer.start_span(
            MESSAGE_NAME,
            context=context,
            kind=SpanKind.CONSUMER,
            attributes=socket_attributes(socket),
        )

    async def _process(
        self,
        principal: Principal,
        payload: object,
        socket_bucket: TokenBucket | None,
        span: Span | None,
        context: SpanContext | None,
    ) -> dict[str, Any]:
        incoming = validate_payload(payload, self._settings)
        if type(span) is MessageSpan:  # fields: see service.message_span
            span.conversation_id = incoming.client_msg_id
            span.body_size = len(incoming.text.encode())
        elif span is not None:
            span.set_attributes(
                {
                    CONVERSATION_ID: incoming.client_msg_id,
                    BODY_SIZE: len(incoming.text.encode()),
                }
            )
        if span is not None and self._settings.index_text_in_spans:
            span.set_attribute("chat.message.text", incoming.text)
        self._check_rate(principal, socket_bucket)

        doc = {
            "_id": ObjectId(),
            "task_id": principal.task,
            "sender": principal.user,
            "role": principal.role,
            "client_msg_id": incoming.client_msg_id,
            "text": incoming.text,
            "created_at": _now_ms(),
            "indexed_at": None,
        }
        future = self._writer.submit(doc, context)
        try:
            result = await future
        except asyncio.CancelledError:
            raise
        except ChatError:
            raise
        except Exception as exc:  # a write outcome we did not classify
            logger.exception("message write failed", extra={"task_id": principal.task})
            raise StoreUnavailable(f"write failed: {type(exc).__name__}") from exc

        view = message_view(result.doc)
        if type(span) is MessageSpan:
            span.message_id = view["id"]
            span.batch_id = result.batch_id
            span.batch_wait = result.queued_seconds
            span.duplicate = result.duplicate
        elif span is not None:
            span.set_attributes(
                {
                    MESSAGE_ID: view["id"],
                    BATCH_ID: result.batch_id,
                    BATCH_WAIT: result.queued_seconds,
                    DUPLICATE: result.duplicate,
                }
            )
        ack = {"ok": True, "id": view["id"], "created_at": view["created_at"]}
        if result.duplicate:
            self._duplicate.inc()
            ack["duplicate"] = True
            return ack

        self._accepted.inc()
        self.accepted_count += 1
        await self._emit(principal, view, span, context)
        self._hand_off(result.doc, span, context)
        return ack

    def _check_rate(
        self, principal: Principal, socket_bucket: TokenBucket | None
    ) -> None:
        user_bucket = self.user_bucket(principal.user)
        for bucket, scope in ((socket_bucket, "socket"), (user_bucket, "user")):
            if bucket is not None and not bucket.take():
                raise RateLimited(
                    f"{scope} rate limit of {bucket.rate:g} messages/s "
                    f"(burst {bucket.burst:g}) exceeded: retry in "
                    f"{bucket.retry_after():.2f} s"
                )

    async def _emit(
        self,
        principal: Principal,
        view: dict[str, Any],
        span: Span | None,
        context: SpanContext | None,
    ) -> None:
        started = time.perf_counter()
        recording = _records(span)
        started_ns = time.time_ns() if recording else 0
        sockets = 0
        error: BaseException | None = None
        try:
            sockets = await self._fanout(principal.room, view)
        except Exception as exc:  # the message is stored: the ack must still go
            logger.warning(
                "fan-out failed",
                extra={
                    "task_id": principal.task,
                    "message_id": view["id"],
                    "error": repr(exc),
                },
            )
            error = exc
        except BaseException as exc:  # cancelled: recorded, then passed on
            if recording and span is not None:
                self._emit_span(span, principal, view, started_ns, sockets, exc, True)
            raise
        if type(span) is MessageSpan and error is None:
            span.emit = (span.child_id(), started_ns, time.time_ns(), sockets)
        elif recording and span is not None:
            self._emit_span(span, principal, view, started_ns, sockets, error, False)
        # The emit span shares the message span's trace, and so its trace id.
        self._metrics.fanout_traced.observe(time.perf_counter() - started, context)

    def _emit_span(
        self,
        span: Span,
        principal: Principal,
        view: dict[str, Any],
        started_ns: int,
        sockets: int,
        error: BaseException | None,
        escaped: bool,
    ) -> None:
        self._tracing.add_child(
            span,
            EMIT_NAME,
            SpanKind.PRODUCER,
            started_ns,
            emit_attributes(principal.room, view["id"], sockets),
            error=error,
            escaped=escaped,
        )

    def _hand_off(
        self, doc: dict[str, Any], span: Span | None, context: SpanContext | None
    ) -> None:
        if self._indexer is None:
            return
        recording = _records(span)
        started_ns = time.time_ns() if recording else 0
        queued = False
        try:
            queued = self._indexer.offer(IndexItem.from_doc(doc, context))
        finally:
            # A full queue defers the message to the reconciler: not lost.
            outcome = "queued" if queued else "deferred"
            if type(span) is MessageSpan:
                span.hand_off = (span.child_id(), started_ns, time.time_ns(), outcome)
            elif recording and span is not None:
                self._tracing.add_child(
                    span,
                    ENQUEUE_NAME,
                    SpanKind.PRODUCER,
                    started_ns,
                    enqueue_attributes(outcome),
                )


def _records(span: Span | None) -> bool:
    """Return whether to start child spans under the message span.

    The parent-based samplers drop the children of a dropped span, so skipping
    them saves a sampler call per child on every message the sampler drops.
    """
    return span is not None and span.is_recording()


def _now_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
