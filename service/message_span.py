"""The span of one message, with its attributes kept in fields.

Every traced message has a span with 14 attributes and two children, the
fan-out (``emit``) and the hand-off to the indexer (``enqueue index``), with
the same keys on every message. Eight of the span's attributes and four of
the fan-out's only change with the socket. Kept in dicts and encoded key by
key, they took most of what tracing every message cost the gateway.

``MessageSpan`` is a ``LeanSpan`` whose message attributes are fields set by
the pipeline, and whose two children are tuples. The gateway's span queue
encodes it from tables made once per key and per socket
(``service.otlp``). Any other span processor receives the same spans as from
a ``LeanSpan`` with those attributes and children: ``materialize`` turns the
fields into them first. Attributes set through the span API go to the span's
own dict as usual, and are exported after the fields.

The functions below give the attributes of both forms, so that the
pipeline's spans carry the same keys whichever form a tracer gets.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind

from service.spans import (
    UNSET_STATUS,
    LeanSpan,
    LeanTracer,
    SharedAttributes,
    _Child,
)
from service.tracing import ROOM_TEMPLATE

__all__ = [
    "BATCH_DUPLICATES",
    "BATCH_ID",
    "BATCH_SIZE",
    "BATCH_WAIT",
    "BODY_SIZE",
    "CONVERSATION_ID",
    "DUPLICATE",
    "EMIT_NAME",
    "ENQUEUE_NAME",
    "FANOUT_SOCKETS",
    "FIELD_KEYS",
    "MESSAGE_ID",
    "MESSAGE_NAME",
    "WRITE_FIELD_KEYS",
    "WRITE_NAME",
    "MessageSpan",
    "Socket",
    "WriteSpan",
    "emit_attributes",
    "emit_room_attributes",
    "enqueue_attributes",
    "socket_attributes",
    "start_message_span",
    "start_write_span",
    "start_write_span_with_links",
    "takes_message_spans",
    "takes_write_spans",
]

MESSAGE_NAME = "send_message " + ROOM_TEMPLATE
EMIT_NAME = "emit " + ROOM_TEMPLATE
ENQUEUE_NAME = "enqueue index"
WRITE_NAME = "insert messages"

# A batch write starts a trace of its own, whatever context the writer runs
# in. Passing an empty context also skips the lookup of the current one.
_ROOT = Context()

# (room, user id, role, Socket.IO session id or "")
Socket = tuple[str, str, str, str]

CONVERSATION_ID = "messaging.message.conversation_id"
BODY_SIZE = "messaging.message.body.size"
MESSAGE_ID = "messaging.message.id"
BATCH_ID = "chat.batch.id"
BATCH_WAIT = "chat.batch.wait_seconds"
DUPLICATE = "chat.duplicate"
FANOUT_SOCKETS = "chat.fanout.sockets"
BATCH_SIZE = "db.operation.batch.size"
BATCH_DUPLICATES = "chat.batch.duplicates"


def socket_attributes(socket: Socket) -> dict[str, Any]:
    """Return the attributes a message span starts with."""
    room, user, role, client_id = socket
    return {
        "messaging.system": "socketio",
        "messaging.operation.type": "process",
        "messaging.operation.name": "send_message",
        "messaging.destination.name": room,
        "messaging.destination.template": ROOM_TEMPLATE,
        "messaging.client.id": client_id,
        "enduser.id": user,
        "chat.role": role,
    }


def emit_room_attributes(room: str) -> dict[str, Any]:
    """Return the attributes of a fan-out span that only change with the room."""
    return {
        "messaging.system": "socketio",
        "messaging.operation.type": "send",
        "messaging.operation.name": "emit",
        "messaging.destination.name": room,
    }


def emit_attributes(room: str, message_id: str, sockets: int) -> dict[str, Any]:
    """Return the attributes of a fan-out span."""
    return {
        **emit_room_attributes(room),
        MESSAGE_ID: message_id,
        FANOUT_SOCKETS: sockets,
    }


def enqueue_attributes(outcome: str) -> dict[str, Any]:
    """Return the attributes of a hand-off span: ``queued`` or ``deferred``."""
    return {
        "messaging.system": "chat.indexer",
        "messaging.operation.type": "send",
        "chat.index.outcome": outcome,
    }


# Keys a message span stores in fields. Set through the API, they are merged.
FIELD_KEYS = frozenset(
    [
        *socket_attributes(("", "", "", "")),
        CONVERSATION_ID,
        BODY_SIZE,
        MESSAGE_ID,
        BATCH_ID,
        BATCH_WAIT,
        DUPLICATE,
    ]
)
# Keys a write span stores in fields.
WRITE_FIELD_KEYS = frozenset([BATCH_SIZE, BATCH_ID, BATCH_DUPLICATES])


class MessageSpan(LeanSpan):
    """A message's span; see the module docstring.

    The pipeline sets ``conversation_id`` and ``body_size`` once the payload
    is valid, ``message_id``, ``batch_id``, ``batch_wait`` and ``duplicate``
    once it is stored. ``emit`` and ``hand_off`` are the children, each
    ``(span id, start, end, x)`` with x the number of sockets reached or the
    hand-off's outcome. ``socket`` is None once ``materialize`` has run.
    """

    __slots__ = (
        "batch_id",
        "batch_wait",
        "body_size",
        "conversation_id",
        "duplicate",
        "emit",
        "hand_off",
        "message_id",
        "socket",
    )

    def __init__(
        self,
        tracer: LeanTracer,
        context: SpanContext,
        parent: SpanContext | None,
        socket: Socket,
    ) -> None:
        super().__init__(
            tracer,
            MESSAGE_NAME,
            context,
            parent,
            SpanKind.CONSUMER,
            {},
            [],
            None,
            on_exception=(True, True),
            sampled=True,
        )
        self.socket: Socket | None = socket
        self.conversation_id: str | None = None
        self.body_size = 0
        self.message_id: str | None = None
        self.batch_id = 0
        self.batch_wait = 0.0
        self.duplicate = False
        self.emit: tuple[int, int, int, int] | None = None
        self.hand_off: tuple[int, int, int, str] | None = None

    def child_id(self) -> int:
        """Return a new span id for a child."""
        tracer = self.tracer
        return tracer.new_span_id() or tracer.ids.generate_span_id()

    def materialize(self) -> None:
        """Turn the fields into attributes and recorded children, once.

        The attributes come in the order the pipeline sets them, then those
        set through the span API, which replace a field of the same key.
        """
        socket = self.socket
        if socket is None:
            return
        self.socket = None
        attributes = socket_attributes(socket)
        if self.conversation_id is not None:
            attributes[CONVERSATION_ID] = self.conversation_id
            attributes[BODY_SIZE] = self.body_size
        if self.message_id is not None:
            attributes[MESSAGE_ID] = self.message_id
            attributes[BATCH_ID] = self.batch_id
            attributes[BATCH_WAIT] = self.batch_wait
            attributes[DUPLICATE] = self.duplicate
        for key, value in self.attributes.items():
            attributes.pop(key, None)  # set again: moved to the end
            attributes[key] = value
        self.attributes = attributes

        children = list(self.children)
        if self.emit is not None:
            span_id, start, end, sockets = self.emit
            message_id = self.message_id or ""
            attributes = emit_attributes(socket[0], message_id, sockets)
            children.append(
                _Child(
                    EMIT_NAME,
                    SpanKind.PRODUCER,
                    span_id,
                    start,
                    end,
                    attributes,
                    UNSET_STATUS,
                    (),
                )
            )
        if self.hand_off is not None:
            span_id, start, end, outcome = self.hand_off
            children.append(
                _Child(
                    ENQUEUE_NAME,
                    SpanKind.PRODUCER,
                    span_id,
                    start,
                    end,
                    enqueue_attributes(outcome),
                    UNSET_STATUS,
                    (),
                )
            )
        self.emit = self.hand_off = None
        self.children = children
        self.trim()  # the fields count against the attribute limit too


def start_message_span(
    tracer: LeanTracer, context: context_api.Context | None, socket: Socket
) -> Span:
    """Start the span of a message received on ``socket``.

    ``context`` contains the parent (the client's traceparent); None takes the
    current context, as ``Tracer.start_span`` does. A message the sampler
    drops gets a non-recording span, as from ``start_span``.
    """
    span_context, parent, decision, _ = tracer.begin(
        MESSAGE_NAME, context, SpanKind.CONSUMER, None, ()
    )
    if decision is Decision.RECORD_AND_SAMPLE:
        return MessageSpan(tracer, span_context, parent, socket)
    if decision is Decision.DROP:
        return NonRecordingSpan(span_context)
    return LeanSpan(  # recorded but not sampled: never exported
        tracer,
        MESSAGE_NAME,
        span_context,
        parent,
        SpanKind.CONSUMER,
        socket_attributes(socket),
        [],
        None,
        on_exception=(True, True),
        sampled=False,
    )


def takes_message_spans(tracer: object) -> TypeGuard[LeanTracer]:
    """Return whether message spans of ``tracer`` may be ``MessageSpan`` objects.

    They need a ``LeanTracer`` whose sampler decides for the message span
    without reading its attributes and samples every child of a sampled
    span (the built-in samplers), no attribute length limit, and room for
    the fields under the attribute count limit.
    """
    return (
        isinstance(tracer, LeanTracer)
        and tracer.children_follow_parent
        and tracer.limits.attributes >= 32
        and tracer.limits.events >= 1
    )


class WriteSpan(LeanSpan):
    """The span of one MongoDB batch write, linked to the spans of its messages.

    ``linked`` is the list of the sampled message spans' contexts, where a
    ``LeanSpan`` would make a ``Link`` of each. The attributes are the
    shared ones (the server's), then ``batch_size``, ``batch_id`` and, once
    the write is done, ``duplicates``. ``linked`` is None once
    ``materialize`` has run.
    """

    __slots__ = ("batch_id", "batch_size", "duplicates", "linked")

    def __init__(
        self,
        tracer: LeanTracer,
        context: SpanContext,
        shared: SharedAttributes,
        linked: list[SpanContext],
        batch_size: int,
        batch_id: int,
    ) -> None:
        super().__init__(
            tracer,
            WRITE_NAME,
            context,
            None,
            SpanKind.CLIENT,
            {},
            [],
            None,
            on_exception=(True, True),
            sampled=True,
        )
        self.shared = shared
        self.linked: list[SpanContext] | None = linked
        self.batch_size = batch_size
        self.batch_id = batch_id
        self.duplicates: int | None = None

    def unshare(self) -> None:
        self.materialize()  # the fields stay after the shared attributes

    def materialize(self) -> None:
        """Turn the fields into attributes and links, once.

        The attributes come in the order the writer sets them, then those set
        through the span API, which replace a field of the same key.
        """
        linked = self.linked
        if linked is None:
            return
        self.linked = None
        attributes = dict(self.shared or {})
        self.shared = None
        attributes[BATCH_SIZE] = self.batch_size
        attributes[BATCH_ID] = self.batch_id
        if self.duplicates is not None:
            attributes[BATCH_DUPLICATES] = self.duplicates
        for key, value in self.attributes.items():
            attributes.pop(key, None)  # set again: moved to the end
            attributes[key] = value
        self.attributes = attributes
        self.links = [*(Link(context) for context in linked), *self.links]
        self.trim()  # the fields count against the limits too

    def set_duplicates(self, count: int) -> None:
        """Set the number of the batch's messages stored earlier."""
        if self.linked is None:  # materialized: the field is read no more
            self.set_attribute(BATCH_DUPLICATES, count)
        else:
            self.duplicates = count


def takes_write_spans(tracer: object) -> TypeGuard[LeanTracer]:
    """Return whether batch write spans of ``tracer`` may be ``WriteSpan`` objects.

    They need a ``LeanTracer`` with no attribute length limit and room for
    the fields under the attribute count limit. A batch with more message
    spans than the link limit gets a span of the usual kind.
    """
    return (
        isinstance(tracer, LeanTracer)
        and tracer.limits.length is None
        and tracer.limits.attributes >= 32
    )


def start_write_span(
    tracer: LeanTracer,
    shared: SharedAttributes,
    linked: list[SpanContext],
    batch_size: int,
    batch_id: int,
) -> Span:
    """Start the span of a batch write: a new trace, linked to ``linked``.

    The sampler decides as for a span without attributes or links, which
    the built-in samplers do not read. A dropped span is a non-recording
    one, as from ``start_span``.
    """
    if len(linked) > tracer.limits.links:
        return start_write_span_with_links(tracer, shared, linked, batch_size, batch_id)
    span_context, _, decision, _ = tracer.begin(
        WRITE_NAME, _ROOT, SpanKind.CLIENT, None, ()
    )
    if decision is Decision.RECORD_AND_SAMPLE:
        return WriteSpan(tracer, span_context, shared, linked, batch_size, batch_id)
    if decision is Decision.DROP:
        return NonRecordingSpan(span_context)
    return start_write_span_with_links(tracer, shared, linked, batch_size, batch_id)


def start_write_span_with_links(
    tracer: trace.Tracer,
    shared: SharedAttributes,
    linked: list[SpanContext],
    batch_size: int,
    batch_id: int,
) -> Span:
    """Start the span of a batch write through ``tracer.start_span``, with links."""
    span: Span = tracer.start_span(
        WRITE_NAME,
        context=_ROOT,
        kind=SpanKind.CLIENT,
        links=[Link(context) for context in linked],
        attributes=shared,
    )
    span.set_attributes({BATCH_SIZE: batch_size, BATCH_ID: batch_id})
    return span
