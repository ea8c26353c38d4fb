"""The OTLP encoder writes what the official encoder writes, and the exporters deliver it."""

from __future__ import annotations

import gzip
import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as official_encode,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from service import __version__
from service.embedded import free_port
from service.message_span import (
    EMIT_NAME,
    FIELD_KEYS,
    MESSAGE_NAME,
    MessageSpan,
    WriteSpan,
    socket_attributes,
    start_message_span,
    start_write_span,
    takes_message_spans,
    takes_write_spans,
)
from service.otlp import (
    HttpSpanExporter,
    SpanQueue,
    _Encoder,
    encode_spans,
    grpc_span_exporter,
)
from service.spans import LeanTracer, SharedAttributes
from service.tracing import Tracing, create_tracer_provider, extract_context
from tests.test_spans import _story, add_child

REMOTE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

VALUES: dict[str, Any] = {
    "text": "héllo, 世界",
    "empty": "",
    "long": "x" * 20_000,  # a length that needs a three-byte varint
    "yes": True,
    "no": False,
    "zero": 0,
    "negative": -42,
    "large": 2**62,
    "float": -1.5,
    "float.zero": 0.0,
    "strings": ("a", "b"),
    "bools": (True, False),
    "ints": (1, -2, 3),
    "floats": (0.5, 2.0),
    "none.inside": ("a", None),
    "empty.list": (),
}


def _finished(lean: bool, provider: TracerProvider) -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = (
        Tracing(provider).tracer
        if lean
        else provider.get_tracer("chat-gateway", "1.2.3", schema_url="https://x/1")
    )
    with tracer.start_as_current_span(
        "send_message task:{task_id}",
        context=extract_context(REMOTE),
        kind=SpanKind.CONSUMER,
        attributes=VALUES,
    ) as span:
        span.add_event("queued", {"depth": 3, "where": "writer"})
        span.add_event("bare")
        span.record_exception(RuntimeError("boom"))
        child = tracer.start_span("emit task:{task_id}", kind=SpanKind.PRODUCER)
        child.set_status(Status(StatusCode.ERROR, "emit failed: 0 sockets"))
        child.end()
        add_child(tracer, span, "enqueue index", {"n": 1, "outcome": "queued"})
        add_child(tracer, span, "emit again", {}, error=TimeoutError("slow"))
    for kind in SpanKind:
        linked = tracer.start_span(
            f"kind {kind.name}",
            kind=kind,
            links=[
                Link(span.get_span_context(), {"chat.batch.position": 1}),
                Link(child.get_span_context()),
            ],
        )
        linked.set_status(StatusCode.OK)
        linked.end()
    return exporter.get_finished_spans()


@pytest.fixture(params=["lean spans", "SDK spans"])
def spans(request: pytest.FixtureRequest) -> Iterator[list[ReadableSpan]]:
    """Spans of two resources (and so two scopes), made by either tracer."""
    lean = request.param == "lean spans"
    first = TracerProvider(
        resource=Resource({"service.name": "chat-gateway", "n": 1}, "https://r/1")
    )
    second = TracerProvider(
        resource=Resource({"service.name": "other"}),
        span_limits=SpanLimits(max_span_attributes=3, max_events=1, max_links=1),
    )
    yield [*_finished(lean, first), *_finished(lean, second)]
    first.shutdown()
    second.shutdown()


def test_encoding_matches_the_official_encoder(spans: list[ReadableSpan]) -> None:
    """Every field, value type, kind, event, link, status, limit and resource."""
    ours = ExportTraceServiceRequest.FromString(encode_spans(spans))
    official = official_encode(spans)

    assert ours == official
    assert len(ours.resource_spans) == 2
    assert sum(len(s.spans) for r in ours.resource_spans for s in r.scope_spans) == 18
    (limited,) = [
        span
        for span in ours.resource_spans[1].scope_spans[0].spans
        if span.name.startswith("send_message")
    ]
    assert limited.dropped_attributes_count == len(VALUES) - 3
    assert (limited.dropped_events_count, len(limited.events)) == (2, 1)


def test_edge_cases_match_the_official_encoder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drops with nothing left, ints beyond int64, equal resources made twice."""
    finished = []
    for number in range(2):
        provider = TracerProvider(
            resource=Resource({"service.name": "chat-gateway"}),  # equal, not same
            span_limits=SpanLimits(max_events=0, max_links=0),
        )
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        span = Tracing(provider).tracer.start_span(
            f"span {number}", attributes={"big": 2**64, "low": -(2**63), "ok": 1}
        )
        span.add_event("dropped")
        span.add_link(_remote_context())
        span.end()
        finished += exporter.get_finished_spans()

    with caplog.at_level(logging.ERROR, logger="chat.otlp"):
        ours = ExportTraceServiceRequest.FromString(encode_spans(finished))
    assert ours == official_encode(finished)
    assert len(ours.resource_spans) == 1
    (first, _) = ours.resource_spans[0].scope_spans[0].spans
    assert (first.dropped_events_count, first.dropped_links_count) == (1, 1)
    assert [kv.key for kv in first.attributes] == ["low", "ok"]
    assert "does not fit in an int64" in caplog.text


def _remote_context() -> Any:
    from opentelemetry import trace

    return trace.get_current_span(extract_context(REMOTE)).get_span_context()


def test_span_context_tuple_layout() -> None:
    """The encoder unpacks span contexts as tuples: an API change must fail here."""
    state = TraceState([("vendor", "value")])
    context = SpanContext(1, 2, True, TraceFlags(1), state)
    assert context[:5] == (1, 2, True, TraceFlags(1), state)
    assert context[5] is True  # is_valid, which lean spans also build in place
    assert SpanContext(0, 2, False)[5] is False


def test_lean_span_context_as_the_api_builds() -> None:
    """A lean span's context equals the one SpanContext() builds from its fields."""
    tracer = Tracing(TracerProvider()).tracer
    for parent in (None, extract_context(REMOTE, "vendor=a")):
        context = tracer.start_span("work", context=parent).get_span_context()
        rebuilt = SpanContext(
            context.trace_id,
            context.span_id,
            context.is_remote,
            context.trace_flags,
            context.trace_state,
        )
        assert tuple(context) == tuple(rebuilt)
        assert type(context) is SpanContext


def test_attribute_cache_stays_bounded() -> None:
    """Ids stop being cached, and many keys or values start the cache again."""
    encoder = _Encoder()
    for number in range(6000):
        attributes = {
            "id": f"message {number}",
            f"key {number % 5000}": "value",
            "room": f"task:{number % 4500}",
        }
        encoded = encoder.attributes(b"\x4a", attributes)
        assert encoded == _Encoder().attributes(b"\x4a", attributes)

    keys = encoder._tags[b"\x4a"]
    assert len(keys) <= 4096
    assert sum(len(entry.values or ()) for entry in keys.values()) <= 4096
    assert keys["id"].values is None


def test_repeated_encoding_is_identical(spans: list[ReadableSpan]) -> None:
    """The cache of encoded attributes changes nothing in the output."""
    assert encode_spans(spans) == encode_spans(spans)
    assert encode_spans(spans[:3]) + b"" == encode_spans(spans[:3])


def test_unencodable_value_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A lone surrogate cannot be UTF-8: that attribute goes, the span stays."""
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = Tracing(provider).tracer.start_span(
        "x", attributes={"bad": "\ud800", "ok": 1}
    )
    span.end()

    with caplog.at_level(logging.ERROR, logger="chat.otlp"):
        request = ExportTraceServiceRequest.FromString(
            encode_spans(exporter.get_finished_spans())
        )
    (encoded,) = request.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in encoded.attributes] == ["ok"]
    assert "bad" in caplog.text


def test_non_string_key_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A key that is not a string is skipped, as the official encoder skips it."""
    context = SpanContext(1, 2, False, TraceFlags(1))
    span = ReadableSpan(
        name="x",
        context=context,
        attributes={1: "number", "ok": 1},  # type: ignore[dict-item]
        start_time=1,
        end_time=2,
    )

    with caplog.at_level(logging.ERROR, logger="chat.otlp"):
        ours = ExportTraceServiceRequest.FromString(encode_spans([span]))
    assert ours == official_encode([span])
    (encoded,) = ours.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in encoded.attributes] == ["ok"]
    assert "keys must be strings" in caplog.text


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each request body and replies with an empty response."""

    bodies: list[bytes] = []
    paths: list[str] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        _Collector.bodies.append(body)
        _Collector.paths.append(self.path)
        reply = ExportTraceServiceResponse().SerializeToString()
        # Through a proxy, the request names the whole URL.
        self.send_response(200 if self.path.endswith("/v1/traces") else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector_port() -> Iterator[int]:
    """Serve ``_Collector`` on a free 127.0.0.1 port, with its records emptied."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Collector.bodies, _Collector.paths = [], []
    yield server.server_port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_http_exporter_delivers(
    spans: list[ReadableSpan], compression: Compression, collector_port: int
) -> None:
    """The OTLP/HTTP exporter posts the request to /v1/traces, gzipped if asked."""
    exporter = HttpSpanExporter(
        endpoint=f"http://127.0.0.1:{collector_port}/v1/traces",
        compression=compression,
    )
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()

    (body,) = _Collector.bodies
    assert ExportTraceServiceRequest.FromString(body) == official_encode(spans)


def test_provider_caps_batch_at_queue_size(
    collector_port: int,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue smaller than the default batch: a warning, and spans still go out."""
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector_port}"
    )
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "3")
    with caplog.at_level(logging.WARNING, logger="chat.tracing"):
        provider = create_tracer_provider()
    assert provider is not None
    assert "the export batch of 512 spans" in caplog.text
    assert "sending batches of 3 spans" in caplog.text
    tracing = Tracing(provider)
    for number in range(2):
        tracing.tracer.start_span(f"span {number}").end()
    assert provider.force_flush()
    tracing.shutdown()

    names = [
        span.name
        for body in _Collector.bodies
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert names == ["span 0", "span 1"]


@pytest.mark.parametrize("bypassed", [False, True])
def test_http_exporter_uses_environment_proxies(
    spans: list[ReadableSpan],
    monkeypatch: pytest.MonkeyPatch,
    bypassed: bool,
    collector_port: int,
) -> None:
    """HTTP_PROXY and NO_PROXY apply, though the session reads them only once."""
    if bypassed:
        # Nothing listens on the proxy's port, so only a direct post lands.
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        endpoint = f"http://127.0.0.1:{collector_port}/v1/traces"
    else:
        # The collector's host name does not resolve, so only the proxy can post.
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{collector_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        endpoint = "http://otlp-collector.invalid:4318/v1/traces"
    for name in ("http_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    exporter = HttpSpanExporter(endpoint=endpoint, timeout=5)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()

    assert _Collector.paths == ["/v1/traces" if bypassed else endpoint]
    assert ExportTraceServiceRequest.FromString(
        _Collector.bodies[0]
    ) == official_encode(spans)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """Make a certificate for 127.0.0.1 and its key with openssl, and return both paths."""
    certificate, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
         "-keyout", str(key), "-out", str(certificate), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return certificate, key


@pytest.fixture
def tls_collector(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    """``_Collector`` over HTTPS with a new self-signed certificate.

    Yield its port and two CA files: ``collector``, the only one that
    verifies it, and ``other``, an unrelated certificate.
    """
    certificate, key = _self_signed(tmp_path, "collector")
    other, _ = _self_signed(tmp_path, "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Collector.bodies, _Collector.paths = [], []
    yield server.server_port, {"collector": certificate, "other": other}
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("settings", "delivered"),
    [
        ({"REQUESTS_CA_BUNDLE": "collector"}, True),
        ({"CURL_CA_BUNDLE": "collector"}, True),
        # The OTLP certificate wins over a bundle that lacks the collector's CA.
        (
            {
                "REQUESTS_CA_BUNDLE": "other",
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "collector",
            },
            True,
        ),
        ({"REQUESTS_CA_BUNDLE": "other"}, False),
        ({}, False),
    ],
)
def test_exporter_reads_ca_bundle_once(
    spans: list[ReadableSpan],
    monkeypatch: pytest.MonkeyPatch,
    tls_collector: tuple[int, dict[str, Path]],
    settings: dict[str, str],
    delivered: bool,
) -> None:
    """A CA bundle from the environment verifies the collector, read at start-up only."""
    port, files = tls_collector
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, file in settings.items():
        monkeypatch.setenv(name, str(files[file]))
    exporter = HttpSpanExporter(
        endpoint=f"https://127.0.0.1:{port}/v1/traces", timeout=1
    )
    session = exporter._client._transport._session  # type: ignore[attr-defined]
    assert session.trust_env is False  # no environment scan on each export
    try:
        result = exporter.export(spans)
    finally:
        exporter.shutdown()

    assert (result is SpanExportResult.SUCCESS) is delivered
    assert len(_Collector.bodies) == int(delivered)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []

    def Export(
        self, request: ExportTraceServiceRequest, context: Any
    ) -> ExportTraceServiceResponse:
        self.requests.append(request)
        return ExportTraceServiceResponse()


@pytest.fixture
def grpc_collector() -> Iterator[tuple[_TraceService, int]]:
    """An OTLP/gRPC trace service on a free 127.0.0.1 port."""
    service = _TraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield service, port
    server.stop(grace=None)


def test_grpc_exporter_delivers(
    spans: list[ReadableSpan],
    grpc_collector: tuple[_TraceService, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OTLP/gRPC exporter, configured by OTEL_* variables, reaches a gRPC server."""
    service, port = grpc_collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "true")
    exporter = grpc_span_exporter()
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()

    assert service.requests == [official_encode(spans)]


def test_gateway_provider_sends_its_spans_over_grpc(
    grpc_collector: tuple[_TraceService, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider the gateway builds from OTEL_* variables, queue included."""
    service, port = grpc_collector
    for name, value in {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }.items():
        monkeypatch.setenv(name, value)
    provider = create_tracer_provider()
    assert provider is not None
    tracing = Tracing(provider)
    _story(tracing.tracer)
    assert provider.force_flush()
    tracing.shutdown()

    names = [
        span.name
        for request in service.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert sorted(names) == [
        "emit task:{task_id}",
        "emit task:{task_id}",
        "enqueue index",
        "insert messages",
        "send_message renamed",
    ]


class _Sent:
    """A SpanQueue sender that records request bodies.

    Its first sends can fail. With ``hold``, each send sets ``entered`` and
    waits for ``release``, so that a test can act while a send is under way.
    """

    def __init__(self, fail_first: int = 0, hold: bool = False) -> None:
        self.bodies: list[bytes] = []
        self.fail_first = fail_first
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, body: bytes) -> bool:
        self.entered.set()
        self.release.wait(10)
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError("collector down")
        self.bodies.append(body)
        return True

    def spans(self) -> list[Any]:
        return [
            span
            for body in self.bodies
            for resource in ExportTraceServiceRequest.FromString(body).resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]


def _without_ids(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    for resource in request.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                span.trace_id = span.span_id = span.parent_span_id = b""
                span.start_time_unix_nano = span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0
                    for kv in event.attributes:
                        if kv.key == "exception.stacktrace":
                            kv.value.string_value = ""
                for link in span.links:
                    link.trace_id = link.span_id = b""
    return request


def test_queued_spans_encode_as_processed_spans() -> None:
    """A span sent through the queue is the span the SDK processors would export."""
    bodies, expected, _ = _processed_and_queued(_story)

    (body,) = bodies
    ours = _without_ids(ExportTraceServiceRequest.FromString(body))
    assert ours == _without_ids(official_encode(expected))


def _processed_and_queued(
    story: Callable[[LeanTracer], Any],
) -> tuple[list[bytes], tuple[ReadableSpan, ...], list[Any]]:
    """Run ``story`` on a lean tracer without a queue, then on one with a queue.

    Return the queue's request bodies, the spans the SDK processors received
    from the first run, and what ``story`` returned in each run.
    """
    resource = Resource({"service.name": "chat-gateway"})
    processed = TracerProvider(resource=resource)
    queued = TracerProvider(resource=resource)
    sent = _Sent()
    queue = SpanQueue(sent, resource, InstrumentationScope("chat-gateway", __version__))
    exporter = InMemorySpanExporter()
    processed.add_span_processor(SimpleSpanProcessor(exporter))
    results = []
    try:
        for provider, span_queue in ((processed, None), (queued, queue)):
            tracer = LeanTracer(
                provider.get_tracer("chat-gateway", __version__),
                "chat-gateway",
                __version__,
                queue=span_queue,
            )
            results.append(story(tracer))
        assert queue.force_flush(10)
    finally:
        queue.shutdown()
        processed.shutdown()
        queued.shutdown()
    return sent.bodies, exporter.get_finished_spans(), results


def _shared_story(tracer: Any) -> list[Any]:
    """Batch spans that start with shared attributes, then add and replace some."""
    shared = SharedAttributes(
        {"db.system.name": "mongodb", "server.address": "db", "server.port": 27017}
    )
    spans = []
    for replaced in (None, "server.port", "db.system.name"):
        span = tracer.start_span(
            "insert messages", kind=SpanKind.CLIENT, attributes=shared
        )
        spans.append(span)
        span.set_attributes({"db.operation.batch.size": 2, "chat.batch.id": 70_000})
        if replaced is not None:
            span.set_attribute(replaced, 1)
        span.set_attribute("chat.batch.duplicates", 0)
        span.end()
    span = tracer.start_span("insert messages", attributes=shared)
    spans.append(span)
    span.set_attributes({"server.address": "other", "chat.batch.id": 1})
    span.end()
    return spans


def test_shared_attributes_encode_as_processed_spans() -> None:
    """Shared attributes, encoded once, reach the collector as processors see them."""
    bodies, expected, (_, (first, *_)) = _processed_and_queued(_shared_story)

    assert first.shared is not None  # kept apart, as no key of it was set again
    assert first.shared.encoded is not None
    (body,) = bodies
    ours = _without_ids(ExportTraceServiceRequest.FromString(body))
    assert ours == _without_ids(official_encode(expected))


def test_field_spans_obey_attribute_limit() -> None:
    """Fields count against the attribute limit, as the SDK counts attributes."""
    limits = SpanLimits(max_span_attributes=32)
    socket = ("task:t1", "olga", "operator", "sid-1")
    fields = {
        "messaging.message.conversation_id": "c",
        "messaging.message.body.size": 1,
        "messaging.message.id": "m",
        "chat.batch.id": 1,
        "chat.batch.wait_seconds": 0.5,
        "chat.duplicate": False,
    }
    sdk = TracerProvider(span_limits=limits).get_tracer("sdk")
    expected = sdk.start_span(MESSAGE_NAME, attributes=socket_attributes(socket))
    expected.set_attributes(fields)
    for number in range(30):
        expected.set_attribute(f"extra.{number}", number)
    expected.end()

    queued = TracerProvider(span_limits=limits)
    sent = _Sent()
    resource = Resource({"service.name": "chat-gateway"})
    queue = SpanQueue(sent, resource, InstrumentationScope("chat-gateway", __version__))
    try:
        tracer = LeanTracer(
            queued.get_tracer("chat-gateway", __version__),
            "chat-gateway",
            __version__,
            queue=queue,
        )
        span = start_message_span(tracer, None, socket)
        assert isinstance(span, MessageSpan)
        span.conversation_id, span.body_size = "c", 1
        span.message_id, span.batch_id, span.batch_wait = "m", 1, 0.5
        for number in range(30):
            span.set_attribute(f"extra.{number}", number)
        span.end()
        assert queue.force_flush(10)
    finally:
        queue.shutdown()

    (ours,) = sent.spans()
    official = official_encode([expected]).resource_spans[0].scope_spans[0].spans[0]
    assert list(ours.attributes) == list(official.attributes)
    assert ours.dropped_attributes_count == official.dropped_attributes_count == 12


def test_shared_attributes_reject_other_values() -> None:
    """Shared attributes take plain scalars only, with the value in the error."""
    with pytest.raises(ValueError, match="tags"):
        SharedAttributes({"tags": ["a", "b"]})


def _write_stories(tracer: LeanTracer) -> None:
    """Batch write spans as the writer makes them, and as it never does."""
    assert takes_write_spans(tracer)
    shared = SharedAttributes({"db.system.name": "mongodb", "server.port": 27017})
    sampled = TraceFlags(TraceFlags.SAMPLED)
    linked = [
        SpanContext(7, 8, is_remote=False, trace_flags=sampled),
        SpanContext(2**100, 2**60, is_remote=True, trace_flags=sampled),
        SpanContext(9, 10, is_remote=False, trace_flags=sampled),
    ]
    span = start_write_span(tracer, shared, linked, 3, 70_000)  # stored
    assert isinstance(span, WriteSpan)
    span.duplicates = 1
    span.end()

    span = start_write_span(tracer, shared, linked[:1], 1, 2)  # failed
    assert isinstance(span, WriteSpan)
    span.record_exception(TimeoutError("no reply"))
    span.set_status(Status(StatusCode.ERROR, "NetworkTimeout"))
    span.set_attribute("error.type", "timeout")
    span.end()

    for key in ("server.port", "chat.batch.id"):  # a field's key set again
        span = start_write_span(tracer, shared, linked, 3, 4)
        assert isinstance(span, WriteSpan)
        span.set_attribute(key, 1)
        span.end()

    span = start_write_span(tracer, shared, linked, 3, 5)
    assert isinstance(span, WriteSpan)  # a link added through the API
    span.add_link(linked[0], {"chat.batch.position": 0})
    span.end()

    span = start_write_span(tracer, shared, linked, 3, 6)
    assert isinstance(span, WriteSpan)  # a child recorded on it
    add_child(tracer, span, "retry", {"attempt": 1})
    span.end()

    span = start_write_span(tracer, shared, linked * 50, 150, 7)
    assert not isinstance(span, WriteSpan)  # more links than the limit
    span.end()


def test_write_spans_encode_as_processed_spans() -> None:
    """A WriteSpan's fields and links reach the collector as processors see them."""
    bodies, expected, _ = _processed_and_queued(_write_stories)
    assert len(expected) == 8
    (body,) = bodies
    ours = ExportTraceServiceRequest.FromString(body)
    official = official_encode(expected)
    assert _link_ids(ours) == _link_ids(official)
    assert _without_ids(ours) == _without_ids(official)


def _link_ids(request: ExportTraceServiceRequest) -> list[tuple[bytes, bytes, int]]:
    return [
        (link.trace_id, link.span_id, link.flags)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        for link in span.links
    ]


def _message_stories(tracer: LeanTracer) -> None:
    """Message spans in the shapes the pipeline gives them, and some it never does."""
    assert takes_message_spans(tracer)
    parent = extract_context(REMOTE, "vendor=a,other=b")
    socket = ("task:t1", "olga", "operator", "sid-1")

    span = start_message_span(tracer, parent, socket)  # accepted, stored, fanned out
    assert isinstance(span, MessageSpan)
    span.conversation_id, span.body_size = "cmid-é-世", 300
    span.message_id, span.batch_id, span.batch_wait = "a" * 24, 70_000, 0.25
    span.duplicate = False
    span.emit = (span.child_id(), 1_000, 2_000, 2)
    span.hand_off = (span.child_id(), 2_000, 3_000, "deferred")
    span.end()

    span = start_message_span(tracer, None, ("task:t2", "bob", "manager", ""))
    assert isinstance(span, MessageSpan)  # rejected: a status and an extra attribute
    span.conversation_id, span.body_size = "x" * 300, 0
    span.set_status(Status(StatusCode.ERROR, "rate_limited"))
    span.set_attribute("error.type", "rate_limited")
    span.end()

    span = start_message_span(tracer, None, socket)
    assert isinstance(span, MessageSpan)  # a duplicate, with the text attribute
    span.conversation_id, span.body_size = "cmid-2", 5
    span.set_attribute("chat.message.text", "hello")
    span.message_id, span.batch_id, span.duplicate = "b" * 24, 3, True
    span.end()

    span = start_message_span(tracer, None, socket)
    assert isinstance(span, MessageSpan)  # a failed fan-out, then an exception
    span.conversation_id, span.body_size = "cmid-3", 5
    span.message_id = "c" * 24
    add_child(tracer, span, EMIT_NAME, {"chat.fanout.sockets": 0}, OSError("gone"))
    span.hand_off = (span.child_id(), 2_000, 3_000, "queued")
    span.record_exception(ValueError("late"))
    span.end()

    span = start_message_span(tracer, None, socket)
    assert isinstance(span, MessageSpan)  # a field's key set through the API
    span.message_id = "d" * 24
    span.set_attribute("messaging.message.id", "replaced")
    span.emit = (span.child_id(), 1_000, 2_000, 1)
    span.end()


def test_message_spans_encode_as_processed_spans() -> None:
    """A MessageSpan's fields reach the collector as the SDK processors see them."""
    bodies, expected, _ = _processed_and_queued(_message_stories)
    assert len(expected) == 10
    ours = ExportTraceServiceRequest()
    for body in bodies:
        ours.MergeFromString(body)
    ours = _without_ids(ours)
    (resource_spans,) = ours.resource_spans
    scope_spans = resource_spans.scope_spans
    merged = scope_spans[0]
    for extra in scope_spans[1:]:  # one request per batch: the same scope
        merged.spans.extend(extra.spans)
    del scope_spans[1:]
    assert ours == _without_ids(official_encode(expected))
    fields = {kv.key for span in merged.spans for kv in span.attributes}
    assert fields >= FIELD_KEYS


def test_queue_drops_beyond_its_size_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While a send is under way, the queue keeps its size and drops the rest."""
    sent = _Sent(hold=True)
    queue = SpanQueue(
        sent,
        Resource({}),
        InstrumentationScope("chat-gateway"),
        max_queue_size=3,
        delay_seconds=60,
    )
    provider = TracerProvider()
    tracer = LeanTracer(provider.get_tracer("t"), "chat-gateway", "1", queue=queue)
    with caplog.at_level(logging.WARNING, logger="chat.otlp"):
        for number in range(3):  # a full batch wakes the sending thread
            tracer.start_span(f"span {number}").end()
        assert sent.entered.wait(10)
        for number in range(3, 8):
            tracer.start_span(f"span {number}").end()
        sent.release.set()
        queue.shutdown()

    assert queue.dropped == 2
    assert [span.name for span in sent.spans()] == [f"span {n}" for n in range(6)]
    assert "span queue full (3 spans)" in caplog.text


def test_full_batches_sent_without_delay() -> None:
    """Spans that fill batches while a send is under way leave right after it."""
    sent = _Sent(hold=True)
    queue = SpanQueue(
        sent,
        Resource({}),
        InstrumentationScope("chat-gateway"),
        batch_size=2,
        delay_seconds=60,
    )
    provider = TracerProvider()
    tracer = LeanTracer(provider.get_tracer("t"), "chat-gateway", "1", queue=queue)
    for number in range(2):
        tracer.start_span(f"span {number}").end()
    assert sent.entered.wait(10)
    for number in range(2, 7):  # two more batches and one span
        tracer.start_span(f"span {number}").end()
    sent.release.set()
    deadline = time.monotonic() + 10
    while len(sent.bodies) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    names = [span.name for span in sent.spans()]
    queue.shutdown()

    # Long before the 60 s delay, and the odd span goes with the full batches.
    assert names == [f"span {n}" for n in range(7)]


def test_queue_keeps_children_with_parent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Recorded children are queued with their parent, as spans of its trace."""
    sent = _Sent()
    queue = SpanQueue(
        sent, Resource({}), InstrumentationScope("chat-gateway"), max_queue_size=4
    )
    provider = TracerProvider()
    tracer = LeanTracer(provider.get_tracer("t"), "chat-gateway", "1", queue=queue)
    for number in range(2):
        span = tracer.start_span(f"parent {number}")
        for name in ("a", "b"):
            span.add_child(f"{name} {number}", SpanKind.PRODUCER, 1, {"x": name})
        span.end()
    with caplog.at_level(logging.WARNING, logger="chat.otlp"):
        assert queue.force_flush(10)
    queue.shutdown()

    assert queue.dropped == 3  # the second parent and its two children
    first, second, parent = sent.spans()
    assert [first.name, second.name, parent.name] == ["a 0", "b 0", "parent 0"]
    for child in (first, second):
        assert child.trace_id == parent.trace_id
        assert child.parent_span_id == parent.span_id
        assert child.span_id not in (parent.span_id, b"")
        assert child.start_time_unix_nano == 1
    assert "span queue full (4 spans)" in caplog.text


def test_queue_survives_a_failed_export(caplog: pytest.LogCaptureFixture) -> None:
    """An export that raises is logged; the next batch still goes out."""
    sent = _Sent(fail_first=1)
    queue = SpanQueue(
        sent, Resource({}), InstrumentationScope("chat-gateway"), batch_size=1
    )
    provider = TracerProvider()
    tracer = LeanTracer(provider.get_tracer("t"), "chat-gateway", "1", queue=queue)
    with caplog.at_level(logging.ERROR, logger="chat.otlp"):
        tracer.start_span("lost").end()
        assert queue.force_flush(10)
        tracer.start_span("kept").end()
        assert queue.force_flush(10)
    queue.shutdown()

    assert [span.name for span in sent.spans()] == ["kept"]
    assert "export of 1 spans failed" in caplog.text


def test_unsampled_spans_are_not_queued() -> None:
    sent = _Sent()
    queue = SpanQueue(sent, Resource({}), InstrumentationScope("chat-gateway"))
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    tracer = LeanTracer(provider.get_tracer("t"), "chat-gateway", "1", queue=queue)
    tracer.start_span("root, not sampled").end()
    tracer.start_span("sampled parent", context=extract_context(REMOTE)).end()
    queue.shutdown()

    assert [span.name for span in sent.spans()] == ["sampled parent"]
