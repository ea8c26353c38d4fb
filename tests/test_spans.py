"""The gateway's lean spans behave like SDK spans for everything exported."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes, AttributeValue

from service import __version__
from service.spans import LeanSpan, LeanTracer
from service.tracing import Tracing, extract_context

REMOTE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Recorder(SpanProcessor):
    """Counts the calls a span processor receives."""

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        self.started.append(span)

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


@pytest.fixture
def pipeline() -> Iterator[Callable[..., tuple[trace.Tracer, InMemorySpanExporter]]]:
    """Build a provider with an in-memory exporter; return its tracer, lean or not."""
    providers: list[TracerProvider] = []

    def build(lean: bool, **options: Any) -> tuple[trace.Tracer, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider(**options)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        tracer = provider.get_tracer("chat-gateway", __version__)
        if lean:
            return Tracing(provider).tracer, exporter
        return tracer, exporter

    yield build
    for provider in providers:
        provider.shutdown()


def add_child(
    tracer: trace.Tracer,
    parent: trace.Span,
    name: str,
    attributes: dict[str, AttributeValue],
    error: BaseException | None = None,
) -> None:
    """Record a child as the gateway does, or start and end one as the SDK would."""
    start = time.time_ns() - 1000
    if isinstance(parent, LeanSpan):
        parent.add_child(name, SpanKind.PRODUCER, start, attributes, error=error)
        return
    child = tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
        start_time=start,
    )
    if error is not None:
        child.record_exception(error)
        child.set_status(Status(StatusCode.ERROR, type(error).__name__))
    child.end()


def _story(tracer: trace.Tracer) -> None:
    """Use every part of the span API the way the gateway and libraries do."""
    parent = extract_context(REMOTE)
    with tracer.start_as_current_span(
        "send_message task:{task_id}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "socketio", "tags": ["a", "b"]},
    ) as span:
        span.set_attribute("messaging.message.body.size", 12)
        span.set_attributes({"chat.duplicate": False, "chat.wait_seconds": 0.25})
        span.set_attributes({"messaging.system": "socketio", "chat.size": 3})
        span.add_event("queued", {"depth": 3})
        child = tracer.start_span("emit task:{task_id}", kind=SpanKind.PRODUCER)
        child.set_status(Status(StatusCode.ERROR, "emit_failed"))
        child.record_exception(ValueError("no sockets"))
        child.end()
        add_child(tracer, span, "enqueue index", {"chat.index.outcome": "queued"})
        add_child(
            tracer,
            span,
            "emit task:{task_id}",
            {"messaging.system": "socketio", "chat.fanout.sockets": 0},
            error=ConnectionResetError("socket gone"),
        )
        span.update_name("send_message renamed")
    linked = tracer.start_span(
        "insert messages",
        kind=SpanKind.CLIENT,
        links=[Link(span.get_span_context(), {"chat.batch.position": 0})],
    )
    linked.set_status(StatusCode.OK)
    linked.set_status(StatusCode.ERROR, "ignored: OK is final")
    linked.end()


def _view(span: ReadableSpan) -> dict[str, Any]:
    events = [
        (event.name, {k: v for k, v in (event.attributes or {}).items()})
        for event in span.events
    ]
    for _, attributes in events:  # the text of a traceback differs by line
        attributes.pop("exception.stacktrace", None)
    return {
        "name": span.name,
        "kind": span.kind,
        "parent": span.parent.span_id if span.parent else None,
        "remote_parent": span.parent.is_remote if span.parent else None,
        "attributes": list((span.attributes or {}).items()),  # in order
        "events": events,
        "links": [dict(link.attributes or {}) for link in span.links],
        "status": (span.status.status_code, span.status.description),
        "scope": (span.instrumentation_scope.name, span.instrumentation_scope.version)
        if span.instrumentation_scope
        else None,
        "sampled": span.context.trace_flags.sampled if span.context else None,
    }


def test_tracing_uses_lean_spans_with_an_sdk_provider() -> None:
    """An SDK provider gets the lean tracer; other providers are used as they are."""
    assert isinstance(Tracing(TracerProvider()).tracer, LeanTracer)
    assert not isinstance(Tracing(None).tracer, LeanTracer)


def test_same_story_same_spans(pipeline: Callable[..., Any]) -> None:
    """The same calls give the same exported spans as the SDK, but for ids."""
    sdk_tracer, sdk_spans = pipeline(lean=False)
    lean_tracer, lean_spans = pipeline(lean=True)
    _story(sdk_tracer)
    _story(lean_tracer)

    expected = [_view(span) for span in sdk_spans.get_finished_spans()]
    actual = [_view(span) for span in lean_spans.get_finished_spans()]
    assert len(actual) == 5
    for want, got in zip(expected, actual, strict=True):
        want["parent"] = got["parent"] = None if want["parent"] is None else "set"
        assert got == want


def test_child_of_current_span(
    pipeline: Callable[..., Any],
) -> None:
    tracer, exporter = pipeline(lean=True)
    with tracer.start_as_current_span("outer") as outer:
        tracer.start_span("inner").end()
    inner, finished_outer = exporter.get_finished_spans()

    assert inner.context.trace_id == outer.get_span_context().trace_id
    assert inner.parent.span_id == outer.get_span_context().span_id
    assert finished_outer.parent is None
    assert inner.context.trace_flags.sampled


def test_recorded_child_exported_with_parent(
    pipeline: Callable[..., Any],
) -> None:
    """A child recorded with add_child is exported as a child span, with its times."""
    tracer, exporter = pipeline(lean=True)
    parent = tracer.start_span("parent", context=extract_context(REMOTE))
    started = time.time_ns()
    parent.add_child("child", SpanKind.PRODUCER, started, {"n": 1})
    ended = time.time_ns()
    parent.add_child("failed", SpanKind.PRODUCER, started, {}, error=OSError("x"))
    assert exporter.get_finished_spans() == ()  # exported with the parent
    parent.end()

    child, failed, finished_parent = exporter.get_finished_spans()
    context = finished_parent.context
    for span in (child, failed):
        assert span.context.trace_id == context.trace_id
        assert span.context.span_id not in (0, context.span_id)
        assert span.parent == context
        assert span.context.trace_flags == context.trace_flags
        assert span.instrumentation_scope == finished_parent.instrumentation_scope
    assert child.context.span_id != failed.context.span_id
    assert child.start_time == started <= child.end_time <= ended
    assert dict(child.attributes or {}) == {"n": 1}
    assert (failed.status.status_code, failed.status.description) == (
        StatusCode.ERROR,
        "OSError",
    )
    assert [event.name for event in failed.events] == ["exception"]


class _CountingSampler(Sampler):
    """Counts its calls, drops spans named 'drop me' and samples the rest."""

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        self.calls += 1
        if name == "drop me":
            return SamplingResult(Decision.DROP)
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

    def get_description(self) -> str:
        return "counting"


class _CountingParentBased(ParentBased):
    def __init__(self) -> None:
        super().__init__(ALWAYS_ON)
        self.calls = 0

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        self.calls += 1
        return super().should_sample(*args, **kwargs)


def test_child_sampling_follows_sampler(
    pipeline: Callable[..., Any],
) -> None:
    """A sampler that decides per span is asked about each child, and obeyed."""
    parent_based = _CountingParentBased()
    tracer, exporter = pipeline(lean=True, sampler=parent_based)
    span = tracer.start_span("parent")
    span.add_child("drop me", SpanKind.PRODUCER, time.time_ns(), {})
    span.end()
    # The parent-based sampler samples every child of a sampled parent: one call.
    assert parent_based.calls == 1
    assert [s.name for s in exporter.get_finished_spans()] == ["drop me", "parent"]

    own = _CountingSampler()
    tracer, exporter = pipeline(lean=True, sampler=own)
    span = tracer.start_span("parent")
    span.add_child("drop me", SpanKind.PRODUCER, time.time_ns(), {})
    span.add_child("keep me", SpanKind.PRODUCER, time.time_ns(), {"a": 1})
    span.end()
    assert own.calls == 3
    assert [s.name for s in exporter.get_finished_spans()] == ["keep me", "parent"]


def test_child_under_limits_started(
    pipeline: Callable[..., Any],
) -> None:
    """Attribute limits apply to recorded children as to started ones."""
    results = []
    for lean in (False, True):
        tracer, exporter = pipeline(
            lean=lean,
            sampler=ALWAYS_ON,
            span_limits=SpanLimits(max_span_attributes=1, max_span_attribute_length=2),
        )
        with tracer.start_as_current_span("parent") as span:
            add_child(tracer, span, "long", {"a": "abc"})
            add_child(tracer, span, "many", {"a": 1, "b": 2})
        views = [_view(finished) for finished in exporter.get_finished_spans()]
        for view in views:
            view["parent"] = view["parent"] is not None
        results.append(views)
    assert results[1] == results[0]
    assert results[1][0]["attributes"] == [("a", "ab")]
    assert results[1][1]["attributes"] == [("b", 2)]


def test_sampler_drops_and_continues_as_configured(
    pipeline: Callable[..., Any],
) -> None:
    """OTEL_TRACES_SAMPLER semantics: off drops; parent-based follows the parent."""
    off, off_spans = pipeline(lean=True, sampler=ALWAYS_OFF)
    span = off.start_span("dropped")
    span.end()
    assert not span.is_recording()
    assert off_spans.get_finished_spans() == ()

    ratio_zero = ParentBased(TraceIdRatioBased(0.0))
    tracer, exporter = pipeline(lean=True, sampler=ratio_zero)
    tracer.start_span("root, not sampled").end()
    tracer.start_span(
        "child of a sampled parent", context=extract_context(REMOTE)
    ).end()
    (kept,) = exporter.get_finished_spans()
    assert kept.name == "child of a sampled parent"
    assert format(kept.context.trace_id, "032x") == REMOTE[3:35]


def test_limits_drop_the_oldest_and_count(pipeline: Callable[..., Any]) -> None:
    """Attribute, event and link limits hold as in the SDK: the oldest goes."""
    limits = SpanLimits(
        max_span_attributes=2,
        max_events=1,
        max_links=1,
        max_span_attribute_length=4,
    )
    results = []
    for lean in (False, True):
        tracer, exporter = pipeline(lean=lean, span_limits=limits)
        link = Link(_remote_span_context())
        span = tracer.start_span(
            "x", attributes={"a": "abcdefgh", "b": 1, "c": 2}, links=[link, link]
        )
        span.set_attribute("d", 3)
        span.set_attribute("a", "long value")
        span.add_event("first")
        span.add_event("second")
        span.add_link(link.context)
        span.end()
        (finished,) = exporter.get_finished_spans()
        results.append(
            (
                list((finished.attributes or {}).items()),
                [event.name for event in finished.events],
                len(finished.links),
                finished.dropped_attributes,
                finished.dropped_events,
                finished.dropped_links,
            )
        )

    assert results[1] == results[0]
    assert results[1] == ([("d", 3), ("a", "long")], ["second"], 1, 3, 1, 2)


def _remote_span_context() -> trace.SpanContext:
    return trace.get_current_span(extract_context(REMOTE)).get_span_context()


class _Named:
    def __str__(self) -> str:
        return "named"


def _odd_story(tracer: trace.Tracer) -> None:
    """Values beyond plain scalars, bad keys, limits on events and links."""
    invalid_link = trace.SpanContext(0, 0, False)
    span = tracer.start_span(
        "odd",
        attributes={"": 1, "start": "kept"},
        links=[Link(invalid_link), Link(_remote_span_context(), {"a": 1, "b": 2})],
    )
    span.set_attribute("mixed", [1, "two"])
    span.set_attribute("nested", {"a": [1, None]})  # type: ignore[arg-type]
    span.set_attribute("bytes", b"raw")
    span.set_attribute("none", None)  # type: ignore[arg-type]
    span.set_attribute("object", _Named())  # type: ignore[arg-type]
    span.set_attribute("gaps", ["abcdef", None])
    span.set_attribute("", "empty key")
    span.add_event("limited", {"x": "abcdef", "y": 2, "z": 3}, timestamp=0)
    span.add_link(invalid_link, {"why": "kept: it carries attributes"})
    span.add_link(invalid_link)
    span.end(end_time=0)


def test_odd_values_match_sdk(
    pipeline: Callable[..., Any],
) -> None:
    """Cleaning, key checks, event and link limits and zero times match the SDK."""
    limits = SpanLimits(
        max_event_attributes=2,
        max_link_attributes=1,
        max_attribute_length=3,
        max_span_attribute_length=4,
    )
    results = []
    for lean in (False, True):
        tracer, exporter = pipeline(lean=lean, span_limits=limits)
        _odd_story(tracer)
        (span,) = exporter.get_finished_spans()
        (event,) = span.events
        results.append(
            (
                list((span.attributes or {}).items()),
                span.dropped_attributes,
                span.end_time,
                (event.name, dict(event.attributes or {}), event.timestamp),
                event.dropped_attributes,
                [
                    (dict(link.attributes or {}), link.dropped_attributes)
                    for link in span.links
                ],
            )
        )

    assert results[1] == results[0]
    assert ("object", "named") in results[1][0]


def test_exception_leaving_a_span_is_recorded(pipeline: Callable[..., Any]) -> None:
    """``with tracer.start_span(...)`` records an escaping exception, as the SDK does."""
    results = []
    for lean in (False, True):
        tracer, exporter = pipeline(lean=lean)
        with pytest.raises(ValueError, match="boom"), tracer.start_span("x"):
            raise ValueError("boom")
        with (
            pytest.raises(ValueError, match="quiet"),
            tracer.start_span(
                "y", record_exception=False, set_status_on_exception=False
            ),
        ):
            raise ValueError("quiet")
        results.append([_view(span) for span in exporter.get_finished_spans()])

    assert results[1] == results[0]
    assert results[1][0]["status"] == (StatusCode.ERROR, "ValueError: boom")
    assert results[1][1]["events"] == []


def test_processors_see_start_and_one_end(pipeline: Callable[..., Any]) -> None:
    """on_start gets the live span; end() twice reaches on_end once."""
    provider = TracerProvider()
    recorder = _Recorder()
    provider.add_span_processor(recorder)
    tracer = Tracing(provider).tracer

    span = tracer.start_span("x")
    span.end()
    span.end()
    span.set_attribute("late", 1)

    assert recorder.started == [span]
    assert isinstance(span, LeanSpan)
    assert not isinstance(span, SdkSpan)
    assert len(recorder.ended) == 1
    assert "late" not in (recorder.ended[0].attributes or {})
