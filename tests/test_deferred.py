"""Telemetry items that wait on the event loop and are handled together."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from service import __version__, logs
from service.deferred import Deferred
from service.otlp import SpanQueue
from service.spans import LeanTracer
from tests.test_otlp import _Sent


def test_items_off_loop_handled_at_once() -> None:
    handled: list[int] = []
    deferred = Deferred(handled.append, 0.05)
    deferred.add(1)
    assert handled == [1]
    assert len(deferred) == 0


async def test_loop_items_wait_then_run_in_order() -> None:
    handled: list[tuple[int, float]] = []
    deferred = Deferred(lambda item: handled.append((item, time.monotonic())), 0.05)
    added = time.monotonic()
    for item in range(5):
        deferred.add(item)
    assert handled == []
    assert len(deferred) == 5

    await asyncio.sleep(0.2)
    assert [item for item, _ in handled] == [0, 1, 2, 3, 4]
    assert all(at - added >= 0.045 for _, at in handled)
    # One timer for all five: they were handled in a single run.
    assert handled[-1][1] - handled[0][1] < 0.01

    deferred.add(5)  # a new timer for the next item
    await asyncio.sleep(0.2)
    assert [item for item, _ in handled] == [0, 1, 2, 3, 4, 5]


async def test_zero_delay_handles_at_once() -> None:
    handled: list[int] = []
    Deferred(handled.append, 0).add(1)
    assert handled == [1]
    with pytest.raises(ValueError, match="delay_seconds must be 0 or more, not -1"):
        Deferred(handled.append, -1)
    with pytest.raises(ValueError, match="max_items must be 1 or more, not 0"):
        Deferred(handled.append, 1, max_items=0)


async def test_full_group_handled_at_once() -> None:
    handled: list[int] = []
    deferred = Deferred(handled.append, 60, max_items=3)
    for item in range(7):
        deferred.add(item)
    assert handled == [0, 1, 2, 3, 4, 5]
    assert len(deferred) == 1
    deferred.flush()
    assert handled == list(range(7))


async def test_full_group_cancels_its_timer() -> None:
    """The next group waits the whole delay, not what was left of the last one."""
    handled: list[tuple[str, float]] = []
    deferred = Deferred(
        lambda item: handled.append((item, time.monotonic())), 0.3, max_items=2
    )
    deferred.add("a")
    await asyncio.sleep(0.15)
    deferred.add("b")  # a full group: handled now
    added = time.monotonic()
    deferred.add("late")
    await asyncio.sleep(0.2)  # past the first group's timer
    assert [item for item, _ in handled] == ["a", "b"]

    await asyncio.sleep(0.3)
    assert [item for item, _ in handled] == ["a", "b", "late"]
    assert handled[-1][1] - added >= 0.295


def test_flush_after_loop_closed() -> None:
    """Items of a loop closed before its timer fired wait for the next flush or loop."""
    handled: list[int] = []
    deferred = Deferred(handled.append, 60)

    async def add(*items: int) -> None:
        for item in items:
            deferred.add(item)

    asyncio.run(add(1, 2))  # the loop closes with its timer pending
    assert handled == []
    flusher = threading.Thread(target=deferred.flush)
    flusher.start()
    flusher.join()
    assert handled == [1, 2]

    asyncio.run(add(3))
    short = Deferred(handled.append, 0.01)

    async def add_and_wait() -> None:
        short.add(4)
        await asyncio.sleep(0.1)

    asyncio.run(add_and_wait())  # a new loop gets a timer of its own
    assert handled == [1, 2, 4]
    deferred.flush()
    assert handled == [1, 2, 4, 3]


async def test_failing_item_logged_rest_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[int] = []

    def handle(item: int) -> None:
        if item == 2:
            raise RuntimeError("bad item")
        handled.append(item)

    deferred = Deferred(handle, 0.01)
    for item in (1, 2, 3):
        deferred.add(item)
    with caplog.at_level(logging.ERROR, logger="chat.telemetry"):
        await asyncio.sleep(0.1)
    assert handled == [1, 3]
    (record,) = caplog.records
    assert record.getMessage() == "deferred telemetry item 2 failed"
    assert record.exc_info is not None


@contextmanager
def _queued_tracer(**options: Any) -> Iterator[tuple[SpanQueue, LeanTracer, _Sent]]:
    """Yield a span queue made with ``options``, a lean tracer that ends spans in
    it, and the queue's sender; shut both down afterwards."""
    resource = Resource({"service.name": "chat-gateway"})
    provider = TracerProvider(resource=resource)
    sent = _Sent()
    queue = SpanQueue(
        sent, resource, InstrumentationScope("chat-gateway", __version__), **options
    )
    tracer = LeanTracer(
        provider.get_tracer("chat-gateway", __version__),
        "chat-gateway",
        __version__,
        queue=queue,
    )
    try:
        yield queue, tracer, sent
    finally:
        queue.shutdown(5)
        provider.shutdown()


@pytest.fixture
def queue_and_tracer() -> Iterator[tuple[SpanQueue, LeanTracer, _Sent]]:
    # A schedule delay of 60 s: nothing is sent unless flushed.
    with _queued_tracer(delay_seconds=60, encode_delay_seconds=0.05) as made:
        yield made


async def test_loop_spans_encoded_together(
    queue_and_tracer: tuple[SpanQueue, LeanTracer, _Sent],
) -> None:
    queue, tracer, sent = queue_and_tracer
    for number in range(3):
        tracer.start_span(f"work {number}", kind=SpanKind.INTERNAL).end()
    assert len(queue._ended) == 3
    assert len(queue._spans) == 0
    await asyncio.sleep(0.2)
    assert len(queue._ended) == 0
    assert len(queue._spans) == 3

    tracer.start_span("work 3").end()
    assert queue.force_flush(5)  # encodes the waiting span too
    assert [span.name for span in sent.spans()] == [f"work {n}" for n in range(4)]


async def test_shutdown_sends_waiting_spans(
    queue_and_tracer: tuple[SpanQueue, LeanTracer, _Sent],
) -> None:
    queue, tracer, sent = queue_and_tracer
    tracer.start_span("last").end()
    assert len(queue._ended) == 1
    queue.shutdown(5)
    assert [span.name for span in sent.spans()] == ["last"]
    assert queue.dropped == 0


async def test_small_queue_drops_no_grouped_spans() -> None:
    """A queue of 8 spans keeps up with more than 8 spans ending per 50 ms."""
    with _queued_tracer(max_queue_size=8, batch_size=4) as (queue, tracer, sent):
        for turn in range(40):  # 160 spans in about 0.8 s, 10 in 50 ms
            for number in range(4):
                tracer.start_span(f"work {turn}.{number}").end()
            await asyncio.sleep(0.02)
        assert queue.force_flush(5)
    assert queue.dropped == 0
    assert len(sent.spans()) == 160


def test_spans_off_loop_encoded_at_once(
    queue_and_tracer: tuple[SpanQueue, LeanTracer, _Sent],
) -> None:
    queue, tracer, _ = queue_and_tracer
    tracer.start_span("off the loop").end()
    assert len(queue._ended) == 0
    assert len(queue._spans) == 1


@pytest.fixture
def kpi_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logs.kpi_logger.addHandler(handler)
    propagate = logs.kpi_logger.propagate
    logs.kpi_logger.propagate = False
    logs.kpi_logger.setLevel(logging.INFO)
    yield stream
    logs.flush_kpis()
    logs.kpi_logger.removeHandler(handler)
    logs.kpi_logger.propagate = propagate


async def test_kpi_lines_keep_write_times(
    kpi_stream: io.StringIO,
) -> None:
    before = time.time()
    logs.log_kpi_soon("mongo_write_ms", value=3.41)
    await asyncio.sleep(0.02)
    logs.log_kpi_soon("mongo_write_ms", value=1.5)
    assert kpi_stream.getvalue() == ""

    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in kpi_stream.getvalue().splitlines()]
    assert [(line["metric"], line["value"]) for line in lines] == [
        ("mongo_write_ms", 3.41),
        ("mongo_write_ms", 1.5),
    ]
    assert all(set(line) == {"t", "metric", "value"} for line in lines)
    first, second = (
        logs.datetime.strptime(line["t"], "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=logs.UTC)
        .timestamp()
        for line in lines
    )
    assert before - 0.001 <= first < second <= first + 0.05


async def test_flush_kpis_writes_waiting_lines(kpi_stream: io.StringIO) -> None:
    logs.log_kpi_soon("mongo_write_ms", value=2.0)
    assert kpi_stream.getvalue() == ""
    logs.flush_kpis()
    (line,) = kpi_stream.getvalue().splitlines()
    assert json.loads(line)["value"] == 2.0
