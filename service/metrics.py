"""Prometheus metrics of the gateway.

Names follow Prometheus practice: base units (seconds, bytes), ``_total`` on
counters, and labels drawn from small fixed sets; a task, user, sid or message
id is never a label. docs/metrics.md lists every metric and maps the capacity
KPIs (messages_per_sec, mongo_write_ms, event_loop_lag_ms, rss_mb,
heap_used_mb) onto them.

With several workers (``serve --workers N``) prometheus-client's multiprocess
mode is used: each worker writes its samples to files under
``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any worker adds them up. That mode
stores no exemplars.
"""

from __future__ import annotations

import math
import os
import resource
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.trace import SpanContext, TraceFlags
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.errors import ERROR_CODES
from service.spans import FLAGS

__all__ = [
    "Metrics",
    "TracedHistogram",
    "heap_bytes",
    "memory_limit_bytes",
    "multiprocess_dir",
]

# Dense from 1 ms to 50 ms so that the 30 ms p95 limit is read to within 2.5 ms.
MONGO_WRITE_BUCKETS = (
    *(n / 1000 for n in range(1, 11)),
    *(n / 10000 for n in range(125, 300, 25)),
    0.03, 0.035, 0.04, 0.045, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
ACK_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
    0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# A 200 ms stall lands in the (0.15, 0.2] or (0.2, 0.25] bucket, not in +Inf.
LOOP_LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0,
    2.5,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
INDEX_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Label values of chat_trace_spans_dropped: why a span was never exported.
SPAN_DROP_REASONS = ("queue_full", "shutdown", "export_failed")
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TracedHistogram:
    """A histogram whose observations leave their trace id as an exemplar.

    prometheus-client keeps one exemplar per bucket, the last one given, and a
    scrape reads that one. Giving one with every observation would mostly
    replace exemplars that no scrape reads, at a few µs each on the message
    path. So each bucket's exemplar is renewed at most once per ``interval``
    seconds: a bucket that is seldom hit, such as that of a slow write, gets
    the trace id of each observation, and a busy one that of an observation
    less than ``interval`` seconds old.
    """

    def __init__(
        self,
        histogram: Histogram,
        buckets: Sequence[float],
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.histogram = histogram
        self._bounds = (*buckets, math.inf)  # a value goes to the first bound >= it
        self._renew_at = [-math.inf] * len(self._bounds)
        self._interval = interval
        self._clock = clock

    def observe(self, amount: float, context: SpanContext | None = None) -> None:
        """Observe ``amount``, with a sampled span context as a possible exemplar."""
        if context is not None and context[FLAGS] & TraceFlags.SAMPLED:  # type: ignore[operator]
            bucket = bisect_left(self._bounds, amount)
            now = self._clock()
            if bucket < len(self._bounds) and now >= self._renew_at[bucket]:
                self._renew_at[bucket] = now + self._interval
                trace_id = format(context.trace_id, "032x")
                self.histogram.observe(amount, exemplar={"trace_id": trace_id})
                return
        self.histogram.observe(amount)


def multiprocess_dir() -> str | None:
    """Return the multiprocess directory if this process runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of one gateway process, on a registry of its own.

    A registry per instance keeps tests independent: each app gets fresh
    counters instead of sharing the process-global default registry.
    """

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        registry = CollectorRegistry(auto_describe=True)
        self.registry = registry

        self.messages = Counter(
            "chat_messages",
            "Messages received, by outcome and rejection code.",
            ["outcome", "code"],
            registry=registry,
        )
        self.connections = Counter(
            "chat_socket_connections",
            "Socket.IO connection attempts, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.mongo_write_errors = Counter(
            "chat_mongo_write_errors",
            "Failed MongoDB batch writes, by kind of error.",
            ["error"],
            registry=registry,
        )
        self.events_ignored = Counter(
            "chat_events_ignored",
            "Socket.IO events dropped without a handler, by reason.",
            ["reason"],
            registry=registry,
        )
        self.trace_spans_dropped = Counter(
            "chat_trace_spans_dropped",
            "Finished spans that were never exported, by reason: queue_full, "
            "shutdown or export_failed (route spans included).",
            ["reason"],
            registry=registry,
        )
        self.indexed = Counter(
            "chat_indexed_messages",
            "Messages embedded, upserted into Qdrant and marked indexed.",
            registry=registry,
        )
        self.index_errors = Counter(
            "chat_index_errors",
            "Failed indexing attempts, by stage.",
            ["stage"],
            registry=registry,
        )

        self.active_sockets = Gauge(
            "chat_active_sockets",
            "Connected Socket.IO sockets.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.writer_queue_depth = Gauge(
            "chat_writer_queue_depth",
            "Messages waiting for the MongoDB writer.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.index_queue_depth = Gauge(
            "chat_index_queue_depth",
            "Messages waiting in the in-process indexing queue.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.index_backlog = Gauge(
            "chat_index_backlog_messages",
            "Messages stored in MongoDB but not yet indexed, as last counted.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.heap = Gauge(
            "chat_heap_bytes",
            "Private anonymous memory of the process (Python heap, C allocations, "
            "thread stacks), from /proc/self/smaps_rollup.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.memory_limit = Gauge(
            "chat_memory_limit_bytes",
            "Memory the process may use: CHAT_MEMORY_LIMIT_BYTES, else the cgroup "
            "limit, else physical memory.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        if self.multiprocess:
            # The process collector reads only its own pid, which a multiprocess
            # scrape cannot add up, so each worker reports its RSS with a pid label.
            self.resident_memory: Gauge | None = Gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes, per worker process.",
                registry=registry,
                multiprocess_mode="liveall",
            )
        else:
            self.resident_memory = None

        self.mongo_write_duration = Histogram(
            "chat_mongo_write_duration_seconds",
            "Duration of one MongoDB insert_many batch.",
            registry=registry,
            buckets=MONGO_WRITE_BUCKETS,
        )
        self.mongo_write_batch_size = Histogram(
            "chat_mongo_write_batch_size",
            "Messages per MongoDB insert_many batch.",
            registry=registry,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.ack_duration = Histogram(
            "chat_message_ack_duration_seconds",
            "Time from receiving send_message to sending its ack.",
            registry=registry,
            buckets=ACK_BUCKETS,
        )
        self.fanout_duration = Histogram(
            "chat_fanout_duration_seconds",
            "Time to emit one accepted message to its room.",
            registry=registry,
            buckets=FANOUT_BUCKETS,
        )
        self.mongo_write_traced = TracedHistogram(
            self.mongo_write_duration, MONGO_WRITE_BUCKETS
        )
        self.ack_traced = TracedHistogram(self.ack_duration, ACK_BUCKETS)
        self.fanout_traced = TracedHistogram(self.fanout_duration, FANOUT_BUCKETS)
        self.loop_lag = Histogram(
            "chat_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 20 ms.",
            registry=registry,
            buckets=LOOP_LAG_BUCKETS,
        )
        self.index_lag = Histogram(
            "chat_index_lag_seconds",
            "Time from a message's creation to its being indexed.",
            registry=registry,
            buckets=INDEX_LAG_BUCKETS,
        )
        self.embedder_duration = Histogram(
            "chat_embedder_request_duration_seconds",
            "Duration of one embedder call for a batch of texts.",
            ["embedder"],
            registry=registry,
            buckets=CALL_BUCKETS,
        )
        self.qdrant_duration = Histogram(
            "chat_qdrant_request_duration_seconds",
            "Duration of one Qdrant call.",
            ["operation"],
            registry=registry,
            buckets=CALL_BUCKETS,
        )

        self._create_label_sets()
        if not self.multiprocess:
            ProcessCollector(registry=registry)
        self.memory_limit.set(memory_limit_bytes(None))

    def _create_label_sets(self) -> None:
        """Create every labelled series at zero.

        A series that first appears with value 1 has no earlier sample, so
        ``rate()`` and ``increase()`` miss the first error. Creating the known
        label sets up front makes the first increment visible.
        """
        self.messages.labels(outcome="accepted", code="")
        self.messages.labels(outcome="duplicate", code="")
        for code in ERROR_CODES:
            self.messages.labels(outcome="rejected", code=code)
        for outcome in ("accepted", "rejected"):
            self.connections.labels(outcome=outcome)
        for error in ("timeout", "unavailable", "write_error"):
            self.mongo_write_errors.labels(error=error)
        self.events_ignored.labels(reason="unknown_event")
        for stage in ("embed", "upsert", "mark"):
            self.index_errors.labels(stage=stage)
        for reason in SPAN_DROP_REASONS:
            self.trace_spans_dropped.labels(reason=reason)

    def count_dropped_spans(self, count: int, reason: str) -> None:
        """Add ``count`` spans that were never exported, for ``reason``."""
        self.trace_spans_dropped.labels(reason=reason).inc(count)

    def exposition_registry(self) -> CollectorRegistry:
        """Return the registry a scrape should read."""
        directory = multiprocess_dir()
        if directory is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return registry

    def sample_memory(self, limit: int | None) -> None:
        """Refresh the memory gauges (called every few seconds)."""
        self.heap.set(heap_bytes())
        self.memory_limit.set(memory_limit_bytes(limit))
        if self.resident_memory is not None:
            self.resident_memory.set(resident_memory_bytes())

    @staticmethod
    def mark_dead(pid: int) -> None:
        """Drop a stopped worker's live gauges from multiprocess scrapes."""
        directory = multiprocess_dir()
        if directory is not None:
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _read_kib_field(path: str, field: str) -> int | None:
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def heap_bytes() -> int:
    """Return the process's private anonymous memory in bytes.

    This is the closest cheap analogue of Node's ``heapUsed``: it counts the
    pages the Python allocator, C extensions and thread stacks have touched,
    and leaves out mapped code and files. It falls back to the RSS where
    ``/proc/self/smaps_rollup`` is missing (kernels before 4.14, non-Linux).
    """
    value = _read_kib_field("/proc/self/smaps_rollup", "Anonymous:")
    return value if value is not None else resident_memory_bytes()


def resident_memory_bytes() -> int:
    """Return the resident set size of this process in bytes."""
    value = _read_kib_field("/proc/self/status", "VmRSS:")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_limit_bytes(configured: int | None) -> int:
    """Return the memory limit: the setting, else the cgroup's, else all RAM."""
    if configured:
        return configured
    for path in (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # cgroup v1 reports "no limit" as a huge page-aligned number.
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
