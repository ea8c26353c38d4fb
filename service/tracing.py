"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables.

Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not true.
Otherwise the hot path creates no spans at all, so the cost stays near zero.

The SDK reads the rest itself: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` for the resource, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` for sampling (default: parent-based, always on),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``)
and the exporter's headers, timeout and compression.

The gateway's own spans are ``LeanSpan`` objects (``service.spans``): the
provider's sampler and limits apply, but a span costs about a third of an SDK
span. With the provider built here, each is encoded to OTLP soon after it
ends (``service.otlp``) and sent in batches by a ``SpanQueue``; spans of the HTTP
routes take the SDK's batch span processor to the same exporter. Any other
SDK provider (the tests' in-memory one) receives the gateway's spans through
its own processors.

NOTE: tracing every message still adds 11-14% to the gateway's CPU per
message at 250 msg/s on the 2-vCPU reference host, and about 10% at 450
msg/s (``python -m benchmarks.telemetry``), against a 10% target. 10% head
sampling adds 5-7%. Nearly all of it is the spans' work on the event loop
(docs/performance.md).

Spans of one message (names use the room template, not the task id, so that
they stay few)::

    send_message task:{task_id}     CONSUMER, one per message; client traceparent is its parent
    ├── emit task:{task_id}         PRODUCER, the fan-out to the room
    └── enqueue index               PRODUCER, the hand-off to the indexer
    insert messages                 CLIENT, one per MongoDB batch, linked to each message span
    index messages                  CONSUMER, one per indexing batch, linked to each message span
    ├── embeddings {model}          CLIENT, the embedder call
    ├── upsert {collection}         CLIENT, the Qdrant call
    └── update messages             CLIENT, marking the batch indexed in MongoDB
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from service import __version__
from service.spans import LeanSpan, LeanTracer, start_child

__all__ = [
    "ROOM_TEMPLATE",
    "GatewayTracerProvider",
    "Tracing",
    "check_environment",
    "create_tracer_provider",
    "extract_context",
    "trace_id_of",
]

logger = logging.getLogger("chat.tracing")

ROOM_TEMPLATE = "task:{task_id}"
_propagator = TraceContextTextMapPropagator()
_MAX_TRACEPARENT_CHARS = 128


def _endpoint_configured(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _otlp_protocol(environ: Mapping[str, str]) -> str:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        name = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        raise ValueError(f"{name} must be 'grpc' or 'http/protobuf', not {protocol!r}")
    return protocol


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    protocol = _otlp_protocol(environ)
    # Imported here: an exporter loads an HTTP or gRPC client stack.
    from service.otlp import HttpSpanExporter, grpc_span_exporter

    return grpc_span_exporter() if protocol == "grpc" else HttpSpanExporter()


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise ``ValueError`` for an ``OTEL_*`` setting that tracing cannot use.

    The protocol is checked when tracing is on. The SDK reads the span limits
    when its module is imported, so an invalid limit fails the import of
    this module, with the same error, even when tracing is off.
    """
    environ = os.environ if environ is None else environ
    if _endpoint_configured(environ):
        _otlp_protocol(environ)
        SpanLimits()


def create_tracer_provider(
    environ: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """Return an exporting tracer provider, or None when no endpoint is set."""
    environ = os.environ if environ is None else environ
    if not _endpoint_configured(environ):
        return None

    attributes: dict[str, str] = {"service.version": __version__}
    has_name = "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not environ.get("OTEL_SERVICE_NAME") and not has_name:
        attributes["service.name"] = "chat-gateway"
    return GatewayTracerProvider(
        Resource.create(attributes), _otlp_exporter(environ), environ
    )


def _bsp_setting(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if value <= 0:
        logger.warning("%s=%r is not a positive integer: using %d", name, raw, default)
        return default
    return value


class GatewayTracerProvider(TracerProvider):
    """The SDK provider, plus a ``SpanQueue`` for the gateway's own spans.

    Spans of other instrumentations (the HTTP routes) take the SDK's batch
    span processor; both reach the same OTLP exporter.
    """

    def __init__(
        self,
        resource: Resource,
        exporter: Any,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        from service.otlp import SpanQueue  # with the exporter's HTTP stack

        environ = os.environ if environ is None else environ
        queue_size = _bsp_setting(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch_size = _bsp_setting(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        delay_ms = _bsp_setting(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000)
        if batch_size > queue_size:
            # The SDK's processor raises on this, because a batch cannot exceed the queue.
            logger.warning(
                "the export batch of %d spans (OTEL_BSP_MAX_EXPORT_BATCH_SIZE, "
                "512 by default) is larger than the queue of %d spans "
                "(OTEL_BSP_MAX_QUEUE_SIZE): sending batches of %d spans",
                batch_size,
                queue_size,
                queue_size,
            )
            batch_size = queue_size
        self.span_queue = SpanQueue(
            exporter.send_encoded,
            resource,
            InstrumentationScope("chat-gateway", __version__),
            max_queue_size=queue_size,
            batch_size=batch_size,
            delay_seconds=delay_ms / 1000,
        )
        super().__init__(resource=resource)
        self.add_span_processor(
            BatchSpanProcessor(
                _FailureReporter(exporter, self.span_queue.report_drop),
                max_queue_size=queue_size,
                schedule_delay_millis=delay_ms,
                max_export_batch_size=batch_size,
            )
        )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flushed = self.span_queue.force_flush(timeout_millis / 1000)
        return super().force_flush(timeout_millis) and flushed

    def shutdown(self) -> None:
        self.span_queue.shutdown()
        super().shutdown()


class _FailureReporter(SpanExporter):
    """An exporter that reports the count of spans in each failed export.

    The SDK's batch span processor, which sends the spans of the HTTP routes,
    only logs a failed export. Reported through the span queue's
    ``report_drop``, its spans are counted with the queue's own failed exports.
    """

    def __init__(
        self, exporter: SpanExporter, report: Callable[[int, str], object]
    ) -> None:
        self._exporter = exporter
        self._report = report

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self._report(len(spans), "export_failed")
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._exporter.force_flush(timeout_millis))


class Tracing:
    """The tracer the gateway uses, or none at all when tracing is off.

    With an SDK provider, the gateway's own spans are ``LeanSpan`` objects
    sampled by that provider's sampler. They end in its span processors, or,
    with a ``GatewayTracerProvider``, in its span queue. Any other provider is
    used as it is.
    """

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        source = provider if provider is not None else trace.NoOpTracerProvider()
        tracer = source.get_tracer("chat-gateway", __version__)
        queue = getattr(provider, "span_queue", None)
        self.tracer: trace.Tracer = (
            LeanTracer(tracer, "chat-gateway", __version__, queue=queue)
            if isinstance(tracer, SdkTracer)
            else tracer
        )

    def add_child(
        self,
        parent: Span,
        name: str,
        kind: SpanKind,
        start_time: int,
        attributes: dict[str, AttributeValue],
        *,
        error: BaseException | None = None,
        escaped: bool = False,
    ) -> None:
        """Record a child of ``parent`` that started at ``start_time`` and ends now.

        A ``LeanSpan`` records it cheaply (``LeanSpan.add_child``). With any
        other span, the child is started and ended through the tracer.
        """
        if isinstance(parent, LeanSpan):
            parent.add_child(
                name, kind, start_time, attributes, error=error, escaped=escaped
            )
            return
        start_child(
            self.tracer,
            parent,
            name,
            kind,
            start_time,
            time.time_ns(),
            attributes,
            error,
            escaped,
        )

    def shutdown(self) -> None:
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def extract_context(traceparent: object, tracestate: object = None) -> Context | None:
    """Return the context a W3C ``traceparent`` value names, if it is valid.

    A ``tracestate`` is continued with it, as the HTTP instrumentation
    continues it for the route's span.
    """
    if not isinstance(traceparent, str) or len(traceparent) > _MAX_TRACEPARENT_CHARS:
        return None
    carrier = {"traceparent": traceparent}
    if isinstance(tracestate, str):
        carrier["tracestate"] = tracestate
    context = _propagator.extract(carrier)
    span_context = trace.get_current_span(context).get_span_context()
    return context if span_context.is_valid else None


def trace_id_of(span_context: SpanContext | None) -> str | None:
    """Return the hex trace id of a sampled span context, for exemplars."""
    if (
        span_context is None
        or not span_context.is_valid
        or not span_context.trace_flags.sampled
    ):
        return None
    return format(span_context.trace_id, "032x")
