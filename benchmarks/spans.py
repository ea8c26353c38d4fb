"""The cost of one span: SDK spans against lean spans, and both OTLP encoders.

Builds the spans of one message the way the gateway does (the message span
with its attributes, the emit child, the batch's insert span with a link),
with the SDK's tracer and with ``LeanTracer`` on the same provider, and times:

* starting and ending them, with a batch span processor whose exporter drops
  everything (so only the cost on the event loop's side is counted);
* encoding them to an OTLP request with ``opentelemetry-exporter-otlp``'s
  encoder and with ``service.otlp``'s.

Figures are CPU time per span (``time.process_time``), the best of
``--repeats`` runs of ``--messages`` messages, side by side in one run.

Run: ``python -m benchmarks.spans`` (about 10 seconds).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as official_encode,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Tracer, set_span_in_context

from benchmarks import harness
from service import __version__
from service.otlp import encode_spans
from service.spans import LeanTracer

SPANS_PER_MESSAGE = 3  # the message span, its emit child, one insert span


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _message(tracer: Tracer, number: int) -> None:
    """Start and end the spans of one message, with the gateway's attributes."""
    message = tracer.start_span(
        "send_message task:{task_id}",
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "socketio",
            "messaging.operation.type": "process",
            "messaging.operation.name": "send_message",
            "messaging.destination.name": f"task:t-{number % 125}",
            "messaging.destination.template": "task:{task_id}",
            "messaging.client.id": f"sid-{number % 250}",
            "enduser.id": f"user-{number % 250}",
            "chat.role": "operator",
        },
    )

    message_id = f"{number:024x}"
    message.set_attribute("messaging.message.conversation_id", f"client-{number}")
    message.set_attribute("messaging.message.body.size", 200)
    message.set_attribute("messaging.message.id", message_id)
    message.set_attribute("chat.batch.id", number)
    message.set_attribute("chat.batch.wait_seconds", 0.0012)
    message.set_attribute("chat.duplicate", False)

    emit = tracer.start_span(
        "emit task:{task_id}",
        context=set_span_in_context(message),
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "socketio",
            "messaging.operation.type": "send",
            "messaging.operation.name": "emit",
            "messaging.destination.name": f"task:t-{number % 125}",
            "messaging.message.id": message_id,
        },
    )
    emit.set_attribute("chat.fanout.sockets", 2)
    emit.end()
    message.end()

    insert = tracer.start_span(
        "insert messages",
        kind=SpanKind.CLIENT,
        links=[Link(message.get_span_context())],
        attributes={
            "db.system.name": "mongodb",
            "db.namespace": "chat",
            "db.collection.name": "messages",
            "db.operation.name": "insert",
            "db.operation.batch.size": 1,
            "chat.batch.id": number,
            "server.address": "127.0.0.1",
            "server.port": 27017,
        },
    )
    insert.set_attribute("chat.batch.duplicates", 0)
    insert.end()


def _best(run: Callable[[], None], repeats: int, spans: int) -> float:
    """Return the best CPU time of ``repeats`` runs, in µs per span."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return round(best / spans * 1e6, 2)


def _start_and_end(lean: bool, messages: int, repeats: int) -> float:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    processor = BatchSpanProcessor(_Discard(), max_queue_size=4 * messages)
    provider.add_span_processor(processor)
    tracer: Tracer = provider.get_tracer("chat-gateway", __version__)
    if lean:
        tracer = LeanTracer(tracer, "chat-gateway", __version__)  # type: ignore[arg-type]

    def run() -> None:
        for number in range(messages):
            _message(tracer, number)
        processor.force_flush()

    try:
        return _best(run, repeats, messages * SPANS_PER_MESSAGE)
    finally:
        provider.shutdown()


def _finished_spans(messages: int) -> tuple[ReadableSpan, ...]:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = LeanTracer(
        provider.get_tracer("chat-gateway", __version__), "chat-gateway", __version__
    )
    for number in range(messages):
        _message(tracer, number)
    return exporter.get_finished_spans()


def _encoding(official: bool, spans: Sequence[ReadableSpan], repeats: int) -> float:
    batches = [spans[start : start + 512] for start in range(0, len(spans), 512)]

    def run() -> None:
        for batch in batches:
            if official:
                official_encode(batch).SerializeToString()
            else:
                encode_spans(batch)

    return _best(run, repeats, len(spans))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best counts")
    args = parser.parse_args(argv)

    print(
        f"{args.messages} messages x {SPANS_PER_MESSAGE} spans, best of {args.repeats}"
    )
    sdk = _start_and_end(False, args.messages, args.repeats)
    lean = _start_and_end(True, args.messages, args.repeats)
    print(
        f"  start and end: SDK span {sdk} µs, lean span {lean} µs (x{lean / sdk:.2f})"
    )
    spans = _finished_spans(args.messages)
    official = _encoding(True, spans, args.repeats)
    ours = _encoding(False, spans, args.repeats)
    print(
        f"  encode to OTLP: official encoder {official} µs, "
        f"service.otlp {ours} µs (x{ours / official:.2f})"
    )
    results = {
        "benchmark": "spans",
        "machine": harness.machine(),
        "messages": args.messages,
        "repeats": args.repeats,
        "microseconds_per_span": {
            "start_end_sdk": sdk,
            "start_end_lean": lean,
            "encode_official": official,
            "encode_service_otlp": ours,
        },
    }
    path = harness.save("spans", results)
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
