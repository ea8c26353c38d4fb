"""Spans for the message path, cheaper than the SDK's own.

Starting and ending one span of the OpenTelemetry SDK cost about 40 µs of CPU
on the gateway's 2-vCPU host, with a lock, a bounded attribute map and a
bounded list for events and links created for every span. A message opens
three spans and shares a fourth, so tracing every message cost more than the
10% of throughput allowed for telemetry.

``LeanTracer`` starts spans that keep their attributes in a plain dict and
create nothing they do not use. It takes the sampler, id generator, resource,
span limits and span processors of an SDK tracer. So ``OTEL_TRACES_SAMPLER``
and ``OTEL_SPAN_*_LIMIT`` apply as they do to SDK spans, and a finished span
reaches the processors as an SDK ``ReadableSpan``, or a ``SpanQueue`` as
encoded bytes. Two things of the SDK are left out: its own self-metrics, and
the experimental "on ending" processor hook.

``LeanSpan.add_child`` records a short child step, such as the fan-out of a
message, on its parent, and the child is exported when the parent ends.
Even a lean span cost several times more to start and end inside the
gateway than in a ``timeit`` loop, and recording the fan-out this way took
about 7% off the CPU time per traced message.

``SharedAttributes`` are attributes that many spans start with unchanged,
such as a database server's address. With a span queue, a span keeps them
apart from its own, and the queue's encoder encodes them once for all those
spans. The message path's own spans go further (``service.message_span``).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    DEFAULT_TRACE_STATE,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes, AttributeValue

if TYPE_CHECKING:
    from service.otlp import SpanQueue

__all__ = [
    "FLAGS",
    "UNSET_STATUS",
    "LeanSpan",
    "LeanTracer",
    "SharedAttributes",
    "start_child",
]

logger = logging.getLogger("chat.spans")

UNSET_STATUS = Status(StatusCode.UNSET)  # a new span's status, compared by identity
# A SpanContext is a tuple (trace id, span id, is remote, flags, state, is
# valid). On the message path, ``context[FLAGS] & TraceFlags.SAMPLED`` reads
# the sampled bit where ``context.trace_flags.sampled`` costs two calls.
FLAGS = 3
_STATE = 4
_IS_VALID = 5
_new_context: Callable[[tuple[Any, ...]], SpanContext] = partial(
    tuple.__new__, SpanContext
)
_MAX_TRACE_ID = (1 << 128) - 1
_MAX_SPAN_ID = (1 << 64) - 1
_NO_LIMIT = 1 << 62
# The minimum attribute count limit with which spans keep SharedAttributes
# apart (the SDK's default limit).
_SHARED_LIMIT = 128
_SCALARS = (str, bool, int, float)
_SCALAR_TYPES = frozenset(_SCALARS)
_STR = frozenset({str})
# Trace flags by (sampled, random trace id), made once.
_FLAGS = {
    (sampled, random_id): TraceFlags(
        (TraceFlags.SAMPLED if sampled else 0)
        | (TraceFlags.RANDOM_TRACE_ID if random_id else 0)
    )
    for sampled in (False, True)
    for random_id in (False, True)
}


def _clean(value: Any, max_length: int | None) -> Any:
    """Return ``value`` cleaned as the SDK cleans an attribute value.

    Plain scalars pass as they are, with strings cut to ``max_length``.
    Anything else goes through the SDK's own cleaning. It keeps bytes, None,
    mappings and sequences, and turns other objects into their ``str()``.
    """
    kind = type(value)
    if kind is str:
        return value if max_length is None else value[:max_length]
    if kind in _SCALAR_TYPES:
        return value
    cleaned = BoundedAttributes(None, {"value": value}, max_value_len=max_length)
    return cleaned.get("value")


def _plain(attributes: Mapping[Any, Any]) -> bool:
    """Return whether every key is a non-empty str and every value a plain scalar.

    The checks run in built-in functions, without a Python call per item.
    """
    return (
        "" not in attributes
        and _STR.issuperset(map(type, attributes))
        and _SCALAR_TYPES.issuperset(map(type, attributes.values()))
    )


def _valid_key(key: object) -> bool:
    return isinstance(key, str) and bool(key)


def _valid_link(context: SpanContext, attributes: Attributes) -> bool:
    # As the SDK: an invalid context still links when it carries something.
    return bool(context and (context.is_valid or attributes or context.trace_state))


def _append_bounded(items: list[Any], item: Any, limit: int) -> int:
    """Append, dropping the oldest item when full as the SDK does; return the drops."""
    if len(items) < limit:
        items.append(item)
        return 0
    if limit > 0:
        del items[0]
        items.append(item)
    return 1


class SharedAttributes(dict[str, Any]):
    """Span attributes that many spans carry unchanged, such as a server's address.

    Given as ``attributes`` to a ``LeanTracer`` that sends its spans through a
    span queue, they are encoded once, when the first span that carries them
    ends, and the encoded field is reused by every later one. So a value must
    not change once a span has them: make a new object instead. Keys must be
    non-empty strings and values plain scalars.
    """

    __slots__ = ("encoded",)

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        super().__init__(attributes)
        if not _plain(self):
            raise ValueError(
                "shared span attributes need non-empty string keys and str, bool, "
                f"int or float values, not {dict(self)!r}"
            )
        self.encoded: bytes | None = None


class _DropCounts:
    """Counts of what a span's limits dropped, as ``ReadableSpan`` reports them."""

    __slots__ = ()
    drops: tuple[int, int, int]  # attributes, events, links

    @property
    def dropped_attributes(self) -> int:
        return self.drops[0]

    @property
    def dropped_events(self) -> int:
        return self.drops[1]

    @property
    def dropped_links(self) -> int:
        return self.drops[2]


class _FinishedSpan(_DropCounts, ReadableSpan):
    """A ``ReadableSpan`` that reports what the span's limits dropped."""

    def __init__(self, span: LeanSpan, end_time: int) -> None:
        tracer = span.tracer
        super().__init__(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=tracer.resource,
            attributes=span.attributes,
            events=span.events,
            links=span.links,
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=end_time,
            instrumentation_scope=tracer.scope,
        )
        self.drops = span.drops


class _Child:
    """A child span recorded on its parent by ``LeanSpan.add_child``.

    It shares the parent's trace, trace state and sampling decision, and is
    exported when the parent ends, as a span of its own.
    """

    __slots__ = (
        "attributes",
        "end_time",
        "events",
        "kind",
        "name",
        "span_id",
        "start_time",
        "status",
    )

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        span_id: int,
        start_time: int,
        end_time: int,
        attributes: dict[str, Any],
        status: Status,
        events: list[Event] | tuple[()],
    ) -> None:
        self.name = name
        self.kind = kind
        self.span_id = span_id
        self.start_time = start_time
        self.end_time = end_time
        self.attributes = attributes
        self.status = status
        self.events = events


class _FinishedChild(_DropCounts, ReadableSpan):
    """A recorded child as the SDK's span processors read a finished span."""

    def __init__(self, parent: LeanSpan, child: _Child) -> None:
        tracer = parent.tracer
        context = parent.context
        super().__init__(
            name=child.name,
            context=SpanContext(
                context.trace_id,
                child.span_id,
                is_remote=False,
                trace_flags=context.trace_flags,
                trace_state=context.trace_state,
            ),
            parent=context,
            resource=tracer.resource,
            attributes=child.attributes,
            events=child.events,
            kind=child.kind,
            status=child.status,
            start_time=child.start_time,
            end_time=child.end_time,
            instrumentation_scope=tracer.scope,
        )
        self.drops = (0, 0, 0)


class LeanSpan(_DropCounts, trace.Span):
    """A recording span; see the module docstring."""

    __slots__ = (
        "_ended",
        "attributes",
        "children",
        "context",
        "drops",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "on_exception",
        "parent",
        "sampled",
        "shared",
        "start_time",
        "status",
        "tracer",
    )

    def __init__(
        self,
        tracer: LeanTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: list[Link],
        start_time: int | None,
        on_exception: tuple[bool, bool],
        sampled: bool,
    ) -> None:
        self.tracer = tracer
        self.name = name
        self.context = context
        # Read on every end and child, where the flag's property would cost a call.
        self.sampled = sampled
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        # Lists only when needed: every container adds to the collector's work.
        self.links: list[Link] | tuple[()] = links or ()
        self.events: list[Event] | tuple[()] = ()
        self.children: list[_Child] | tuple[()] = ()
        # Attributes given at start and encoded once for many spans, kept
        # apart from ``attributes`` until a key of theirs is set again.
        self.shared: SharedAttributes | None = None
        self.status = UNSET_STATUS
        self.drops: tuple[int, int, int] = (0, 0, 0)  # attributes, events, links
        self.start_time = time.time_ns() if start_time is None else start_time
        self.end_time: int | None = None
        # (record_exception, set_status_on_exception), applied by __exit__
        self.on_exception = on_exception
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self.context

    def trim(self) -> None:
        """Drop the oldest attributes and links given at start beyond the limits."""
        extra = len(self.attributes) - self.tracer.limits.attributes
        if extra > 0:
            for key in list(self.attributes)[:extra]:
                del self.attributes[key]
            self.count_drops(attributes=extra)
        extra = len(self.links) - self.tracer.limits.links
        if extra > 0:
            self.links = list(self.links[extra:])
            self.count_drops(links=extra)

    def count_drops(self, attributes: int = 0, events: int = 0, links: int = 0) -> None:
        dropped = self.drops
        self.drops = (dropped[0] + attributes, dropped[1] + events, dropped[2] + links)

    def is_recording(self) -> bool:
        return not self._ended

    def unshare(self) -> None:
        """Merge the shared attributes into the span's own, before its later ones."""
        if self.shared is not None:
            self.attributes = {**self.shared, **self.attributes}
            self.shared = None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._ended:
            return
        limits = self.tracer.limits
        shared = self.shared
        if shared is not None and (
            key in shared or len(shared) + len(self.attributes) >= limits.attributes
        ):
            self.unshare()
        if not _valid_key(key):
            logger.warning("span attribute with key %r dropped: not a string", key)
            self.count_drops(attributes=1)
            return
        if limits.length is None and type(value) in _SCALAR_TYPES:
            cleaned: Any = value
        else:
            cleaned = _clean(value, limits.length)

        # As in the SDK: a key set again moves to the end, and a full span
        # drops its oldest attribute for the new one.
        attributes = self.attributes
        if key in attributes:
            del attributes[key]
        elif len(attributes) >= limits.attributes:
            self.count_drops(attributes=1)
            if not attributes:
                return
            del attributes[next(iter(attributes))]
        attributes[key] = cleaned

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        limits = self.tracer.limits
        shared = self.shared
        if shared is not None and (
            not shared.keys().isdisjoint(attributes)
            or len(shared) + len(self.attributes) + len(attributes) > limits.attributes
        ):
            self.unshare()
        current = self.attributes
        if (
            self._ended
            or limits.length is not None
            or len(current) + len(attributes) > limits.attributes
            or not _plain(attributes)
        ):
            for key, value in attributes.items():
                self.set_attribute(key, value)
            return
        # Within the limits and all scalars: one update, keys set again moved
        # to the end as set_attribute moves them.
        for key in attributes:
            if key in current:
                del current[key]
        current.update(attributes)

    def add_event(
        self,
        name: str,
        attributes: Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._ended:
            return
        event = self.tracer.event(
            name, attributes, time.time_ns() if timestamp is None else timestamp
        )
        if not isinstance(self.events, list):
            self.events = []
        self.count_drops(
            events=_append_bounded(self.events, event, self.tracer.limits.events)
        )

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._ended or not _valid_link(context, attributes):
            return
        link = self.tracer.bounded_link(Link(context, attributes))
        if not isinstance(self.links, list):
            self.links = []
        self.count_drops(
            links=_append_bounded(self.links, link, self.tracer.limits.links)
        )

    def update_name(self, name: str) -> None:
        if not self._ended:
            self.name = name

    def set_status(
        self, status: Status | StatusCode, description: str | None = None
    ) -> None:
        # As in the SDK: OK is final, and UNSET never replaces a status.
        if self._ended or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.add_event(
            "exception",
            _exception_attributes(exception, escaped, attributes),
            timestamp,
        )

    def add_child(
        self,
        name: str,
        kind: SpanKind,
        start_time: int,
        attributes: dict[str, AttributeValue],
        *,
        error: BaseException | None = None,
        escaped: bool = False,
    ) -> None:
        """Record a child span that started at ``start_time`` and ends now.

        For a short step of this span's work, such as the fan-out of a
        message, this costs a fraction of starting and ending a span: no
        sampler call, no span context and no processor call until the parent
        ends. The child takes the parent's sampling decision. So this path
        needs a sampler that samples every child of a sampled span (all the
        built-in ones do), no attribute length limit, and no more attributes
        than the count limit. Otherwise the child is started and ended as
        any other span.

        ``error``, if given, is recorded as an exception event, and sets the
        status to ERROR with the exception's type name.
        """
        end_time = time.time_ns()
        tracer = self.tracer
        if (
            self._ended
            or not tracer.children_follow_parent
            or not self.sampled
            or len(attributes) > tracer.limits.attributes
            or (error is not None and tracer.limits.events < 1)
        ):
            start_child(
                tracer,
                self,
                name,
                kind,
                start_time,
                end_time,
                attributes,
                error,
                escaped,
            )
            return
        status = UNSET_STATUS
        events: list[Event] | tuple[()] = ()
        if error is not None:
            status = Status(StatusCode.ERROR, type(error).__name__)
            events = [
                tracer.event(
                    "exception", _exception_attributes(error, escaped), end_time
                )
            ]
        child = _Child(
            name,
            kind,
            tracer.new_span_id() or tracer.ids.generate_span_id(),
            start_time,
            end_time,
            tracer.clean_attributes(attributes),
            status,
            events,
        )
        if isinstance(self.children, list):
            self.children.append(child)
        else:
            self.children = [child]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # As the SDK's span: an exception leaving the block is recorded.
        if exc_val is not None and self.is_recording():
            record, set_status = self.on_exception
            if record:
                self.record_exception(exc_val, escaped=True)
            if set_status:
                self.set_status(
                    Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}")
                )
        self.end()

    def materialize(self) -> None:
        """Turn any attributes, children or links kept in fields into their usual form.

        The span processors read ``attributes``, ``children`` and ``links``. A
        plain lean span only merges its shared attributes. The spans of
        ``service.message_span`` override this for their fields.
        """
        self.unshare()

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self.end_time = time.time_ns() if end_time is None else end_time
        queue = self.tracer.queue
        if queue is None:
            self.materialize()
            processor = self.tracer.processor
            for child in self.children:  # before the parent, as SDK spans end
                processor.on_end(_FinishedChild(self, child))
            processor.on_end(_FinishedSpan(self, self.end_time))
        elif self.sampled:
            queue.add(self)  # read as a finished span, as ReadableSpan is read


class LeanTracer(trace.Tracer):
    """Starts ``LeanSpan`` objects with the pipeline of an SDK tracer."""

    def __init__(
        self,
        sdk_tracer: SdkTracer,
        name: str,
        version: str,
        queue: SpanQueue | None = None,
    ) -> None:
        self.queue = queue
        self.sampler = sdk_tracer.sampler
        self.ids = sdk_tracer.id_generator
        # The SDK's random ids, drawn without its generator's Python frames.
        # Zero is no valid id: ``new_span_id() or ids.generate_span_id()``.
        self.new_span_id: Callable[[], int] = self.ids.generate_span_id
        self.new_trace_id: Callable[[], int] = self.ids.generate_trace_id
        if type(self.ids) is RandomIdGenerator:
            self.new_span_id = partial(random.getrandbits, 64)
            self.new_trace_id = partial(random.getrandbits, 128)
        self.random_trace_ids = self.ids.is_trace_id_random()
        self.resource = sdk_tracer.resource
        self.processor = sdk_tracer.span_processor
        self.scope = InstrumentationScope(name, version)
        # The provider's limits: given to it, or read from OTEL_SPAN_*_LIMIT.
        self.limits = _Limits.of(
            getattr(sdk_tracer, "_span_limits", None) or SpanLimits()
        )
        # Whether add_child may record children without a sampler call.
        self.children_follow_parent = (
            _samples_children(self.sampler) and self.limits.length is None
        )
        # Whether spans may keep SharedAttributes apart, to be encoded once:
        # only the span queue encodes them so, and no limit may cut them.
        self.shares_attributes = (
            queue is not None
            and self.limits.length is None
            and self.limits.attributes >= _SHARED_LIMIT
        )

    def event(self, name: str, attributes: Attributes, timestamp: int) -> Event:
        """Return an event with its attributes under the event limits."""
        limits = self.limits
        return Event(
            name,
            BoundedAttributes(
                limits.event_attributes, attributes, max_value_len=limits.other_length
            ),
            timestamp,
        )

    def clean_attributes(self, attributes: Attributes) -> dict[str, Any]:
        """Return the attributes with invalid keys left out and values cleaned."""
        if not attributes:
            return {}
        length = self.limits.length
        if length is None and _plain(attributes):
            return dict(attributes)  # the common case, copied in one step
        cleaned: dict[str, Any] = {}
        for key, value in attributes.items():
            if not key or not isinstance(key, str):
                continue  # dropped, as the SDK drops it; the caller counts it
            if length is None and type(value) in _SCALAR_TYPES:
                cleaned[key] = value  # the common case, without a call
            else:
                cleaned[key] = _clean(value, length)
        return cleaned

    def bounded_link(self, link: Link) -> Link:
        """Return ``link`` with its attributes under the link limits, as the SDK does."""
        if not link.attributes:
            return link  # nothing to bound: exported the same
        limits = self.limits
        bounded = BoundedAttributes(
            limits.link_attributes, link.attributes, max_value_len=limits.other_length
        )
        return Link(link.context, bounded)

    def _sample(
        self,
        context: context_api.Context | None,
        parent: SpanContext | None,
        trace_id: int,
        name: str,
        kind: SpanKind,
        attributes: Attributes,
        links: Sequence[Link],
    ) -> tuple[Decision, Attributes, TraceState | None]:
        # A parent-based default sampler drops the children of a dropped parent.
        if self.sampler is DEFAULT_ON:
            return Decision.DROP, None, parent.trace_state if parent else None
        result = self.sampler.should_sample(
            context, trace_id, name, kind, attributes, links
        )
        return result.decision, result.attributes, result.trace_state

    def begin(
        self,
        name: str,
        context: context_api.Context | None,
        kind: SpanKind,
        attributes: Attributes,
        links: Sequence[Link],
    ) -> tuple[SpanContext, SpanContext | None, Decision, Attributes]:
        """Return a new span's context, its valid parent, the sampler's decision
        and the attributes the sampler returned.

        The parent is the span of ``context``, or of the current context.
        """
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        # Read as a tuple (see FLAGS): each property would cost a call.
        if parent is not None and parent[_IS_VALID]:
            trace_id = parent[0]
            random_id = parent[FLAGS] & TraceFlags.RANDOM_TRACE_ID  # type: ignore[operator]
        else:
            parent = None
            trace_id = self.new_trace_id() or self.ids.generate_trace_id()
            random_id = self.random_trace_ids
        sampler = self.sampler
        if sampler is ALWAYS_ON or (
            sampler is DEFAULT_ON
            and (parent is None or parent[FLAGS] & TraceFlags.SAMPLED)  # type: ignore[operator]
        ):  # decided here: the SDK's sampler objects cost a few µs for the same result
            decision = Decision.RECORD_AND_SAMPLE
            sampled_attributes = attributes
            state: TraceState | None = (
                DEFAULT_TRACE_STATE if parent is None else parent[_STATE]  # type: ignore[assignment]
            )
        else:
            decision, sampled_attributes, state = self._sample(
                context, parent, trace_id, name, kind, attributes, links
            )
        span_id = self.new_span_id() or self.ids.generate_span_id()
        # The tuple SpanContext.__new__ builds, without its Python frame.
        span_context = _new_context(
            (
                trace_id,
                span_id,
                False,
                _FLAGS[decision is Decision.RECORD_AND_SAMPLE, bool(random_id)],
                DEFAULT_TRACE_STATE if state is None else state,
                0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID,
            )
        )
        return span_context, parent, decision, sampled_attributes

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        links = list(links) if links else []
        span_context, parent, decision, sampled_attributes = self.begin(
            name, context, kind, attributes, links
        )
        if decision is Decision.DROP:
            return NonRecordingSpan(span_context)

        # As in the SDK, the sampler's attributes (the given ones, for the
        # built-in samplers) are the span's.
        shared = None
        if type(sampled_attributes) is SharedAttributes and self.shares_attributes:
            shared = sampled_attributes
            merged = {}
        else:
            merged = self.clean_attributes(sampled_attributes)
        if links:
            valid_links = []
            for link in links:
                if (
                    type(link) is Link
                    and link.attributes is None
                    and link.context.is_valid
                ):  # the common case, in fewer calls
                    valid_links.append(link)
                    continue
                if link and _valid_link(link.context, link.attributes):
                    valid_links.append(self.bounded_link(link))
            links = valid_links
        span = LeanSpan(
            self,
            name,
            span_context,
            parent,
            kind,
            merged,
            links,
            start_time,
            on_exception=(record_exception, set_status_on_exception),
            sampled=decision is Decision.RECORD_AND_SAMPLE,
        )
        if shared is not None:
            span.shared = shared
        elif sampled_attributes and len(merged) < len(sampled_attributes):
            span.count_drops(attributes=len(sampled_attributes) - len(merged))
        if len(merged) > self.limits.attributes or len(links) > self.limits.links:
            span.trim()
        if self.queue is None:  # the queue replaces the provider's processors
            self.processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    @contextmanager  # the API's decorator for this is private
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


def start_child(
    tracer: trace.Tracer,
    parent: trace.Span,
    name: str,
    kind: SpanKind,
    start_time: int,
    end_time: int,
    attributes: dict[str, AttributeValue],
    error: BaseException | None = None,
    escaped: bool = False,
) -> None:
    """Start and end a child span of ``parent`` through ``tracer``, with its times.

    ``error``, if given, is recorded as an exception event, and sets the
    status to ERROR with the exception's type name.
    """
    child = tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        kind=kind,
        attributes=attributes,
        start_time=start_time,
    )
    if error is not None:
        child.record_exception(error, escaped=escaped, timestamp=end_time)
        child.set_status(Status(StatusCode.ERROR, type(error).__name__))
    child.end(end_time)


def _samples_children(sampler: Sampler) -> bool:
    """Return whether ``sampler`` samples every child of a sampled local span.

    The static samplers and the trace id ratio decide the same for every
    span of a trace. The parent-based samplers sample the children of a
    sampled local parent, unless built in code with another sampler for them.
    """
    if isinstance(sampler, ParentBased):
        return getattr(sampler, "_local_parent_sampled", None) is ALWAYS_ON
    return isinstance(sampler, StaticSampler) or type(sampler) is TraceIdRatioBased


def _exception_attributes(
    exception: BaseException, escaped: bool, extra: Attributes = None
) -> dict[str, Any]:
    """Return the attributes of an exception event, as the SDK records them."""
    module = type(exception).__module__
    qualname = type(exception).__qualname__
    attributes: dict[str, Any] = {
        "exception.type": (
            f"{module}.{qualname}" if module and module != "builtins" else qualname
        ),
        "exception.message": str(exception),
        "exception.stacktrace": "".join(traceback.format_exception(exception)),
        "exception.escaped": str(escaped),
    }
    if extra:
        attributes.update(extra)
    return attributes


@dataclass(frozen=True, slots=True)
class _Limits:
    """The span limits as numbers: counts, and string lengths (None keeps all)."""

    attributes: int
    length: int | None  # of a span attribute's string value
    events: int
    links: int
    event_attributes: int | None
    link_attributes: int | None
    other_length: int | None  # of an event's or a link's string values

    @classmethod
    def of(cls, limits: SpanLimits) -> _Limits:
        def count(value: int | None) -> int:
            return _NO_LIMIT if value is None else value

        return cls(
            count(limits.max_span_attributes),
            limits.max_span_attribute_length,
            count(limits.max_events),
            count(limits.max_links),
            limits.max_event_attributes,
            limits.max_link_attributes,
            limits.max_attribute_length,
        )
