"""Traces, metrics and logs of a live gateway, read the way an operator reads them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from service.logs import JsonFormatter, _timestamp
from service.metrics import TracedHistogram
from service.tracing import GatewayTracerProvider, create_tracer_provider
from tests.conftest import RunningGateway, eventually, http

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_message_span_tree(
    gateway_factory: Any,
    connect: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """One message yields the documented spans, parents and links."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider)
    client = await connect(gateway, gateway.token("t1", "olga"))

    ack = await client.send("trace me", "tr-1")
    await eventually(lambda: _by_name(exporter.get_finished_spans(), "index messages"))
    finished = exporter.get_finished_spans()

    (message,) = _by_name(finished, "send_message task:{task_id}")
    (emit,) = _by_name(finished, "emit task:{task_id}")
    (enqueue,) = _by_name(finished, "enqueue index")
    (insert,) = _by_name(finished, "insert messages")
    index = _by_name(finished, "index messages")[0]
    context = message.get_span_context()

    attributes = dict(message.attributes or {})
    assert attributes["messaging.system"] == "socketio"
    assert attributes["messaging.destination.name"] == "task:t1"
    assert attributes["messaging.message.id"] == ack["id"]
    assert attributes["messaging.message.body.size"] == len(b"trace me")
    assert attributes["chat.batch.wait_seconds"] >= 0
    assert "chat.message.text" not in attributes
    assert emit.parent is not None
    assert emit.parent.span_id == context.span_id
    assert dict(emit.attributes or {})["chat.fanout.sockets"] == 1
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == context.span_id
    assert dict(enqueue.attributes or {})["chat.index.outcome"] == "queued"

    insert_attributes = dict(insert.attributes or {})
    assert insert_attributes["db.system.name"] == "mongodb"
    assert insert_attributes["db.collection.name"] == "messages"
    assert insert_attributes["db.operation.batch.size"] == 1
    assert insert_attributes["chat.batch.id"] == attributes["chat.batch.id"]
    assert [link.context.span_id for link in insert.links] == [context.span_id]
    assert context.span_id in [link.context.span_id for link in index.links]
    children = {
        span.name
        for span in finished
        if span.parent and span.parent.span_id == index.context.span_id
    }
    assert {"upsert chat_messages", "update messages"} <= children
    assert any(name.startswith("embeddings ") for name in children)


async def test_client_traceparent_continued(
    gateway_factory: Any,
    connect: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A W3C traceparent from the client becomes the message span's parent."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider, indexing_enabled=False)
    client = await connect(gateway, gateway.token("t1", "olga"))

    await client.send("continue my trace", "tp-1", traceparent=TRACEPARENT)
    (message,) = await eventually(
        lambda: _by_name(exporter.get_finished_spans(), "send_message task:{task_id}")
    )

    assert format(message.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    assert message.parent is not None
    assert format(message.parent.span_id, "016x") == TRACEPARENT.split("-")[2]


async def test_unsampled_client_trace_makes_no_spans(
    gateway_factory: Any,
    connect: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A traceparent with the sampled flag off: the message and its children go unrecorded."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider)
    client = await connect(gateway, gateway.token("t1", "olga"))
    unsampled = TRACEPARENT[:-2] + "00"

    ack = await client.send("not traced", "tp-off", traceparent=unsampled)
    assert ack["ok"] is True
    await client.send("traced", "tp-on")
    (traced,) = await eventually(
        lambda: _by_name(exporter.get_finished_spans(), "emit task:{task_id}")
    )

    trace_id = int(TRACEPARENT.split("-")[1], 16)
    finished = exporter.get_finished_spans()
    assert [s.name for s in finished if s.context.trace_id == trace_id] == []
    # Batch spans link only to message spans that were exported.
    assert _by_name(finished, "insert messages")
    linked = {link.context.trace_id for s in finished for link in s.links}
    assert trace_id not in linked
    (message,) = _by_name(finished, "send_message task:{task_id}")
    assert traced.parent is not None
    assert traced.parent.span_id == message.context.span_id


async def test_rest_send_continues_header_trace(
    gateway_factory: Any, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """The REST route continues a traceparent header; health routes make no spans."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider, indexing_enabled=False)

    async with http(gateway, gateway.token("t1", "olga")) as api:
        await api.get("/healthz")
        await api.get("/readyz")
        await api.get("/metrics")
        await api.post(
            "/api/tasks/t1/messages",
            json={"client_msg_id": "rest-tp", "text": "over HTTP"},
            headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc,other=x1"},
        )
    finished = exporter.get_finished_spans()

    (message,) = _by_name(finished, "send_message task:{task_id}")
    (emit,) = _by_name(finished, "emit task:{task_id}")
    assert format(message.context.trace_id, "032x") == TRACEPARENT.split("-")[1]
    for span in (message, emit):
        assert dict(span.context.trace_state) == {"vendor": "abc", "other": "x1"}
    http_names = {
        span.name
        for span in finished
        if span.attributes and "http.route" in span.attributes
    }
    assert any("/api/tasks/{task}/messages" in name for name in http_names)
    assert not any(
        path in name for name in http_names for path in ("healthz", "readyz", "metrics")
    )


async def test_rejection_recorded_on_span(
    gateway_factory: Any,
    connect: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A rejected message's span has error status and the code."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider, indexing_enabled=False)
    client = await connect(gateway, gateway.token("t1", "olga"))

    await client.send("x" * 4001, "too-long")
    arity = await client.sio.call("send_message", ("one", "two"), timeout=30)
    messages = _by_name(exporter.get_finished_spans(), "send_message task:{task_id}")

    assert arity["error"]["code"] == "invalid_payload"
    assert len(messages) == 2
    too_long, wrong_arguments = messages
    assert too_long.status.status_code.name == "ERROR"
    assert dict(too_long.attributes or {})["error.type"] == "text_too_long"
    conversation_id = dict(too_long.attributes or {})[
        "messaging.message.conversation_id"
    ]
    assert conversation_id == "too-long"  # so that a failed message can be found
    assert wrong_arguments.status.status_code.name == "ERROR"
    assert dict(wrong_arguments.attributes or {})["error.type"] == "invalid_payload"


async def test_metric_values_after_known_traffic(
    gateway: RunningGateway, connect: Any
) -> None:
    """Counters and histograms match a known number of messages and rejections."""
    operator = await connect(gateway, gateway.token("t1", "olga"))
    manager = await connect(gateway, gateway.token("t1", "max", "manager"))
    for number in range(7):
        await operator.send(f"m{number}", f"known-{number}")
    await operator.send("m0", "known-0")  # a retry
    await manager.send("x" * 4001, "long")
    await manager.sio.call("send_message", "junk")
    await manager.sio.emit("no_such_event", {"a": 1})
    await asyncio.sleep(0.2)

    async with http(gateway) as api:
        values = _samples((await api.get("/metrics")).text)

    def value(name: str, **labels: str) -> float:
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("chat_messages_total", outcome="accepted", code="") == 7
    assert value("chat_messages_total", outcome="duplicate", code="") == 1
    assert value("chat_messages_total", outcome="rejected", code="text_too_long") == 1
    assert value("chat_messages_total", outcome="rejected", code="invalid_payload") == 1
    assert value("chat_events_ignored_total", reason="unknown_event") == 1
    assert value("chat_active_sockets") == 2
    assert value("chat_socket_connections_total", outcome="accepted") == 2
    assert value("chat_message_ack_duration_seconds_count") == 10
    assert value("chat_fanout_duration_seconds_count") == 7
    assert value("chat_mongo_write_batch_size_sum") == 8
    assert value("chat_mongo_write_duration_seconds_count") >= 1
    assert value("process_resident_memory_bytes") > 0
    assert value("chat_heap_bytes") > 0
    assert value("chat_memory_limit_bytes") > value("chat_heap_bytes")
    for name in values:
        labels = dict(name[1])
        assert not {"task_id", "task", "user", "sid", "message_id"} & set(labels)


async def test_exemplars_in_openmetrics(
    gateway_factory: Any,
    connect: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Latency histograms carry trace-id exemplars when the scraper accepts OpenMetrics."""
    provider, exporter = spans
    gateway = gateway_factory(tracer_provider=provider, indexing_enabled=False)
    client = await connect(gateway, gateway.token("t1", "olga"))
    await client.send("exemplar", "ex-1")
    trace_ids = {
        format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()
    }

    async with http(gateway) as api:
        openmetrics = await api.get(
            "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        plain = await api.get("/metrics")

    assert openmetrics.headers["content-type"].startswith(
        "application/openmetrics-text"
    )
    exemplar_lines = [
        line for line in openmetrics.text.splitlines() if " # {trace_id=" in line
    ]
    names = {line.split("_bucket")[0] for line in exemplar_lines}
    assert {
        "chat_message_ack_duration_seconds",
        "chat_mongo_write_duration_seconds",
        "chat_fanout_duration_seconds",
    } <= names
    for line in exemplar_lines:
        trace_id = line.split('trace_id="')[1].split('"')[0]
        assert trace_id in trace_ids
    assert "# {trace_id=" not in plain.text


def _exemplars(histogram: Histogram) -> dict[str, str]:
    return {
        sample.labels["le"]: sample.exemplar.labels["trace_id"]
        for family in histogram.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.exemplar is not None
    }


def test_exemplar_renewal_per_bucket() -> None:
    """A busy bucket keeps its exemplar for a second, and a quiet one takes each."""
    now = [100.0]
    histogram = Histogram("latency_seconds", "", buckets=(0.01, 0.1), registry=None)
    traced = TracedHistogram(histogram, (0.01, 0.1), clock=lambda: now[0])

    def context(trace_id: int, sampled: bool = True) -> SpanContext:
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else 0)
        return SpanContext(trace_id, 1, is_remote=False, trace_flags=flags)

    traced.observe(0.005, context(1))
    traced.observe(0.006, context(2))  # same bucket, within the second
    traced.observe(0.05, context(3))  # another bucket
    traced.observe(5.0, context(4))  # +Inf
    traced.observe(0.007, context(5, sampled=False))
    traced.observe(0.008)
    assert _exemplars(histogram) == {
        "0.01": format(1, "032x"),
        "0.1": format(3, "032x"),
        "+Inf": format(4, "032x"),
    }
    assert histogram.collect()[0].samples[0].value == 4  # every value counted

    now[0] += 1.0
    traced.observe(0.009, context(6))
    assert _exemplars(histogram)["0.01"] == format(6, "032x")


async def test_loop_lag_catches_200ms_block(gateway: RunningGateway) -> None:
    """A callback that blocks the event loop for 200 ms shows in the lag histogram."""

    async def block() -> None:
        time.sleep(0.2)  # deliberately blocks the gateway's loop

    def slow_buckets() -> float:
        histogram = gateway.gateway.metrics.loop_lag
        samples = {
            s.labels["le"]: s.value
            for family in histogram.collect()
            for s in family.samples
            if s.name.endswith("_bucket")
        }
        return samples["+Inf"] - samples["0.15"]

    before = slow_buckets()
    gateway.call(block())
    await asyncio.sleep(0.3)

    assert slow_buckets() - before >= 1


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_log_lines_documented_shapes(spawn_gateway: Any) -> None:
    """stdout is JSON; KPI lines keep their documented fields exactly."""
    process = spawn_gateway(
        env={"CHAT_LOG_MONGO_WRITES": "all", "CHAT_INDEXING_ENABLED": "false"}
    )
    token = _token(process)
    async with httpx.AsyncClient(base_url=process.url) as api:
        for number in range(3):
            await api.post(
                "/api/tasks/t1/messages",
                json={"client_msg_id": f"log-{number}", "text": "hello"},
                headers={"Authorization": f"Bearer {token}"},
            )
    await asyncio.sleep(2.2)
    process.stop()

    raw = [line for line in process.lines() if line.strip()]
    lines = _json_lines(raw)
    assert len(lines) == len(raw), "every stdout line is JSON"
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_metric.setdefault(line.get("metric", ""), []).append(line)

    assert set(by_metric["runtime"][0]) == {
        "t", "metric", "messages_per_sec", "active_sockets", "rss_mb", "heap_used_mb",
    }  # fmt: skip
    assert len(by_metric["mongo_write_ms"]) >= 1
    assert set(by_metric["mongo_write_ms"][0]) == {"t", "metric", "value"}
    assert set(by_metric["event_loop_lag_ms"][0]) == {"t", "metric", "value"}
    events = by_metric[""]
    assert all({"t", "level", "logger", "message"} <= set(line) for line in events)
    assert any(line["message"].startswith("chat gateway started") for line in events)
    assert any(line["message"] == "chat gateway stopped" for line in events)
    assert not any("test-secret-" in line for line in raw)


def _token(process: Any) -> str:
    from service.auth import issue_token

    return issue_token(
        process.env["CHAT_JWT_SECRET"], user="olga", task="t1", role="operator", ttl=60
    )


def test_log_lines_carry_trace_ids() -> None:
    """A line written inside a recording span carries its trace and span ids."""
    import logging

    provider = TracerProvider()
    record = logging.LogRecord(
        "chat.test", logging.INFO, __file__, 1, "inside", None, None
    )
    with provider.get_tracer("test").start_as_current_span("work") as span:
        line = json.loads(JsonFormatter().format(record))
        context = span.get_span_context()
    outside = json.loads(JsonFormatter().format(record))

    assert line["trace_id"] == format(context.trace_id, "032x")
    assert line["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


def test_unsampled_span_logs_keep_trace_id() -> None:
    """A client's trace that the sampler dropped still finds the gateway's log lines."""
    import logging

    from opentelemetry import context as context_api
    from opentelemetry import trace

    from service.tracing import extract_context

    unsampled = TRACEPARENT[:-2] + "00"
    tracer = TracerProvider().get_tracer("test")
    span = tracer.start_span("send_message", context=extract_context(unsampled))
    record = logging.LogRecord(
        "chat.test", logging.WARNING, __file__, 1, "x", None, None
    )
    token = context_api.attach(trace.set_span_in_context(span))
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        context_api.detach(token)

    assert not span.is_recording()
    assert line["trace_id"] == TRACEPARENT.split("-")[1]


class _OtlpReceiver:
    """An OTLP/HTTP receiver on 127.0.0.1 that records the request bodies.

    It responds with ``status``. With ``hold``, each response waits until
    ``release`` is set.
    """

    def __init__(self, status: int = 200, *, hold: bool = False) -> None:
        self.bodies: list[bytes] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(self.rfile.read(length))
                receiver.entered.set()
                receiver.release.wait(30)
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Release any held request and stop serving."""
        self.release.set()
        self.server.shutdown()


async def test_otlp_export_reaches_receiver(spawn_gateway: Any) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, spans reach an OTLP/HTTP receiver."""
    receiver = _OtlpReceiver()
    try:
        process = spawn_gateway(
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_SERVICE_NAME": "chat-gateway-test",
                "CHAT_INDEXING_ENABLED": "false",
            }
        )
        async with httpx.AsyncClient(base_url=process.url) as api:
            response = await api.post(
                "/api/tasks/t1/messages",
                json={"client_msg_id": "otlp-1", "text": "export më"},
                headers={"Authorization": f"Bearer {_token(process)}"},
            )
        ack = response.json()
        await eventually(lambda: receiver.bodies, timeout=15)
        process.stop()
    finally:
        receiver.stop()

    exported: dict[str, Any] = {}
    services: set[str] = set()
    for body in receiver.bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                exported.update((span.name, span) for span in scope.spans)
    assert services == {"chat-gateway-test"}
    message = exported["send_message task:{task_id}"]
    insert = exported["insert messages"]
    (route,) = [
        span for span in exported.values() if span.kind == span.SPAN_KIND_SERVER
    ]
    assert exported["emit task:{task_id}"].parent_span_id == message.span_id
    assert [link.span_id for link in insert.links] == [message.span_id]

    # The queue encodes message and write spans from their fields.
    fields = {kv.key: kv.value for kv in message.attributes}
    assert fields["messaging.message.id"].string_value == ack["id"]
    assert fields["messaging.destination.name"].string_value == "task:t1"
    assert fields["messaging.message.conversation_id"].string_value == "otlp-1"
    assert fields["messaging.message.body.size"].int_value == len("export më".encode())
    assert fields["enduser.id"].string_value == "olga"
    assert fields["chat.duplicate"].bool_value is False
    write = {kv.key: kv.value for kv in insert.attributes}
    assert write["db.system.name"].string_value == "mongodb"
    assert write["db.operation.batch.size"].int_value == 1
    assert write["chat.batch.id"].int_value == fields["chat.batch.id"].int_value
    assert write["chat.batch.duplicates"].int_value == 0
    assert write["server.address"].string_value == "127.0.0.1"
    # The gateway's spans and the HTTP route's (an SDK span) share one trace.
    assert message.trace_id == route.trace_id
    assert message.parent_span_id == route.span_id


async def test_dropped_spans_counted_in_metric(
    gateway_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans dropped by a full span queue show in chat_trace_spans_dropped_total."""
    receiver = _OtlpReceiver(hold=True)
    settings = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_MAX_QUEUE_SIZE": "4",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
    }
    for name, value in settings.items():  # the exporter reads os.environ
        monkeypatch.setenv(name, value)
    provider = create_tracer_provider()
    assert isinstance(provider, GatewayTracerProvider)
    try:
        gateway = gateway_factory(tracer_provider=provider, indexing_enabled=False)
        client = await connect(gateway, gateway.token("t1", "olga"))
        # The sending thread waits in the receiver with the first batch, so the
        # spans of the messages after it fill the queue of 4.
        for number in range(12):
            await client.send(f"m{number}", f"drop-{number}")
        assert await asyncio.to_thread(receiver.entered.wait, 10)
        await asyncio.sleep(0.2)  # the last spans wait 50 ms to be encoded
        async with http(gateway) as api:
            values = _samples((await api.get("/metrics")).text)
        dropped = provider.span_queue.dropped
        receiver.release.set()
        gateway.stop()  # sends what waits while the receiver still responds
    finally:
        receiver.stop()

    # 12 messages make at least 24 spans: at most 4 wait and 2 are being sent.
    assert dropped >= 24 - 4 - 2
    assert values[_dropped_key("queue_full")] == dropped
    assert values[_dropped_key("export_failed")] == 0
    assert values[_dropped_key("shutdown")] == 0


def _dropped_key(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Return the sample key of chat_trace_spans_dropped_total for ``reason``."""
    return ("chat_trace_spans_dropped_total", (("reason", reason),))


async def test_failed_exports_counted_in_metric(
    gateway_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every span of a rejected export, route spans included, counts as dropped."""
    receiver = _OtlpReceiver(400)  # 400 Bad Request: the exporter does not retry
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    try:
        gateway = gateway_factory(
            tracer_provider=create_tracer_provider(), indexing_enabled=False
        )
        token = gateway.token("t1", "olga")
        client = await connect(gateway, token)
        for number in range(3):
            await client.send(f"m{number}", f"fail-{number}")
        async with http(gateway) as api:
            # A route span, sent by the SDK's batch span processor.
            history = await api.get(
                "/api/tasks/t1/messages", headers={"Authorization": f"Bearer {token}"}
            )
            assert history.status_code == 200

            # Each rejected export is counted once its response is read.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                values = _samples((await api.get("/metrics")).text)
                count = values[_dropped_key("export_failed")]
                scopes = _spans_by_scope(receiver.bodies)
                if count == sum(scopes.values()) and len(scopes) > 1:
                    break
                await asyncio.sleep(0.1)
        gateway.stop()
    finally:
        receiver.stop()

    # 3 message spans and their emit children, and at least one batch span.
    assert scopes["chat-gateway"] >= 7
    assert scopes["opentelemetry.instrumentation.fastapi"] >= 1
    assert count == sum(scopes.values())


def _spans_by_scope(bodies: list[bytes]) -> dict[str, int]:
    """Count the spans of export requests, by instrumentation scope."""
    counts: dict[str, int] = {}
    for body in list(bodies):
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                name = scope.scope.name
                counts[name] = counts.get(name, 0) + len(scope.spans)
    return counts


@pytest.mark.parametrize(
    "created",
    [0.5, 1733333333.0, 1733333333.123, 1733333333.9994999, 1733333333.9999996],
)
def test_log_timestamps_match_datetime(created: float) -> None:
    """The cached-second timestamp is what datetime's ISO format gives."""
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert _timestamp(created) == expected.replace("+00:00", "Z")
