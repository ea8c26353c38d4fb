"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables.

Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not true.
Otherwise the hot path creates no spans at all, so the cost stays near zero.

The SDK reads the rest itself: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` for the resource, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` for sampling (default: parent-based, always on),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``)
and the exporter's headers, timeout and compression.

NOTE: tracing every message (``OTEL_TRACES_SAMPLER=always_on``) raised the
gateway's CPU per message by about half in ``python -m benchmarks.telemetry``;
10% head sampling by about a fifth. Span creation on the loop and protobuf
encoding in the exporter thread dominate.

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

import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__

__all__ = [
    "ROOM_TEMPLATE",
    "Tracing",
    "create_tracer_provider",
    "extract_context",
    "trace_id_of",
]

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


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL must be 'grpc' or 'http/protobuf', not {protocol!r}"
    )


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
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(environ)))
    return provider


class Tracing:
    """The tracer the gateway uses, or none at all when tracing is off."""

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        source = provider if provider is not None else trace.NoOpTracerProvider()
        self.tracer = source.get_tracer("chat-gateway", __version__)

    def shutdown(self) -> None:
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()


def extract_context(traceparent: object) -> Context | None:
    """Return the context a W3C ``traceparent`` value names, if it is valid."""
    if not isinstance(traceparent, str) or len(traceparent) > _MAX_TRACEPARENT_CHARS:
        return None
    context = _propagator.extract({"traceparent": traceparent})
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
