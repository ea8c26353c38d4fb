"""OTLP span export with a protobuf encoder written for speed.

The exporters of ``opentelemetry-exporter-otlp`` build one protobuf object per
span, attribute and value before serializing them. On the gateway's 2-vCPU
host that cost about 100 µs of CPU per span, more than a quarter of the cost
of handling a message, so every-message tracing could not stay cheap. This
module writes the same ``ExportTraceServiceRequest`` bytes directly. Fields
are appended to one list and joined once. Encoded attributes are kept in a
small cache, because most of them (the room template, the messaging system)
repeat in every span. The tests compare the output with the official
encoder's, field for field.

The two exporters keep the rest of the official ones: the
``OTEL_EXPORTER_OTLP_*`` endpoint, headers, timeout, compression, TLS, retry
handling and the request size limit. Requests sent by ``SpanQueue`` are not
counted in the SDK's own exporter metrics (off unless
``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`` is set).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as _HttpExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from service import message_span
from service.deferred import Deferred
from service.message_span import (
    EMIT_NAME,
    ENQUEUE_NAME,
    FIELD_KEYS,
    WRITE_FIELD_KEYS,
    MessageSpan,
    Socket,
    WriteSpan,
    emit_room_attributes,
    enqueue_attributes,
    socket_attributes,
)
from service.spans import UNSET_STATUS, LeanSpan

__all__ = ["HttpSpanExporter", "SpanQueue", "encode_spans", "grpc_span_exporter"]

logger = logging.getLogger("chat.otlp")

# Either of these names a plugin that builds the exporter's requests session.
_CREDENTIAL_PROVIDERS = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack
_UINT64 = 0xFFFFFFFFFFFFFFFF

# Span.flags and Link.flags: bit 8 marks bit 9 (the parent is remote) as set knowingly.
_FLAGS_LOCAL = _pack_fixed32(0x100)
_FLAGS_REMOTE = _pack_fixed32(0x300)
# An unset status (an empty Status message), then the flags.
_TAIL_LOCAL = b"\x7a\x00\x85\x01" + _FLAGS_LOCAL
_TAIL_REMOTE = b"\x7a\x00\x85\x01" + _FLAGS_REMOTE

_CACHE_MAX = 4096
# The fixed-size fields of a span, packed in one call each.
_IDS = struct.Struct(">2sQQ2sQ")  # trace id (two halves) and span id, big-endian
_PARENT = struct.Struct(">2sQ")
# A link without attributes: its tag and length (33 bytes), trace id and span
# id, then its flags (_LINK_LOCAL or _LINK_REMOTE).
_LINK = struct.Struct(">4sQQ2sQ")
_LINK_LOCAL = b"\x35" + _FLAGS_LOCAL
_LINK_REMOTE = b"\x35" + _FLAGS_REMOTE
_TIMES = struct.Struct("<cQcQ")  # start and end, fixed64
_MISSES_BEFORE_BYPASS = 256
_DROP_WARNING_SECONDS = 10.0
# How long spans that end on the event loop wait to be encoded together.
ENCODE_DELAY_SECONDS = 0.05
# A message's span with its two recorded children: emit and enqueue index.
_SPANS_PER_MESSAGE = 3
# Span.kind: the API's kinds count from 0, the protocol's from 1 (unspecified is 0).
_KINDS = {id(kind): b"\x30" + bytes([kind.value + 1]) for kind in SpanKind}


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Lengths and small numbers below 2**14 come from this table.
_SMALL = tuple(_varint_bytes(n) for n in range(1 << 14))


def _varint(value: int) -> bytes:
    return _SMALL[value] if value < 16384 else _varint_bytes(value)


def _field(tag: bytes, payload: bytes) -> bytes:
    """Return a length-delimited field: its tag byte(s), length and payload."""
    size = len(payload)
    return tag + (_SMALL[size] if size < 16384 else _varint_bytes(size)) + payload


def _int64(value: int) -> int:
    """Return ``value`` as protobuf writes an int64, or raise if it does not fit."""
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{value} does not fit in an int64 attribute")
    return value & _UINT64


def _any_value(value: Any) -> bytes:
    """Encode an ``AnyValue`` body, testing types in the official encoder's order."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(_int64(int(value)))
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)

    if isinstance(value, Sequence):
        items = b"".join(_field(b"\x0a", _any_value(item)) for item in value)
        return _field(b"\x2a", items)
    if isinstance(value, Mapping):
        pairs = b"".join(
            _field(
                b"\x0a",
                _field(b"\x0a", str(key).encode()) + _field(b"\x12", _any_value(item)),
            )
            for key, item in value.items()
        )
        return _field(b"\x32", pairs)
    raise TypeError(
        f"attribute value of type {type(value).__name__} cannot be encoded: "
        "use a string, number, bool, bytes, sequence or mapping"
    )


def _value_head(size: int) -> bytes:
    """Return the tag and length of a ``KeyValue``'s value of ``size`` bytes."""
    return b"\x12" + _varint(size)


def _str_head(size: int) -> bytes:
    """Return the bytes before a string value of ``size`` bytes in a ``KeyValue``."""
    string_head = b"\x0a" + _varint(size)
    return _value_head(len(string_head) + size) + string_head


def _keyed(tag: bytes, key_field: bytes, head: bytes, data: bytes) -> bytes:
    """Return a ``KeyValue`` field: ``tag``, its length, the key, then the value."""
    size = len(key_field) + len(head) + len(data)
    length = _SMALL[size] if size < 16384 else _varint_bytes(size)
    return b"".join((tag, length, key_field, head, data))


# Value fields made once: the heads of strings by length, and small ints.
_HEADS = 2048
_STR_HEAD = tuple(_str_head(size) for size in range(_HEADS))
_INT64_LIMIT = 1 << 63
_BOOL_BODY = (b"\x12\x02\x10\x00", b"\x12\x02\x10\x01")  # false, true
_INT_BODY = tuple(
    _value_head(1 + len(_varint(n))) + b"\x18" + _varint(n) for n in range(_HEADS)
)


def _head(key_field: bytes, value_head: bytes, size: int) -> bytes:
    """Return a span attribute's field up to its last ``size`` bytes of value."""
    total = len(key_field) + len(value_head) + size
    return (
        b"\x4a"
        + (_SMALL[total] if total < 16384 else _varint_bytes(total))
        + key_field
        + value_head
    )


class _FixedKey:
    """The fields of one span attribute key, made once (tag 0x4a)."""

    __slots__ = ("booleans", "float_head", "ints", "key_field", "str_heads")

    def __init__(self, key: str) -> None:
        self.key_field = key_field = _field(b"\x0a", key.encode())
        self.str_heads = tuple(
            _head(key_field, _STR_HEAD[size], size) for size in range(256)
        )
        self.ints = tuple(_head(key_field, _INT_BODY[n], 0) for n in range(256))
        self.float_head = _head(key_field, b"\x12\x09\x21", 8)  # then 8 bytes
        self.booleans = (
            _head(key_field, _BOOL_BODY[0], 0),
            _head(key_field, _BOOL_BODY[1], 0),
        )

    def string(self, data: bytes) -> bytes:
        """Return the field of a string value, given as UTF-8."""
        size = len(data)
        if size < 256:
            return self.str_heads[size] + data
        head = _STR_HEAD[size] if size < _HEADS else _str_head(size)
        return _keyed(b"\x4a", self.key_field, head, data)

    def integer(self, value: int) -> bytes:
        """Return the field of an int value."""
        if 0 <= value < 256:
            return self.ints[value]
        body = b"\x18" + (
            _SMALL[value] if 0 <= value < 16384 else _varint(_int64(value))
        )
        return _head(self.key_field, b"\x12" + _SMALL[len(body)], len(body)) + body


_CONVERSATION_ID = _FixedKey(message_span.CONVERSATION_ID)
_BODY_SIZE = _FixedKey(message_span.BODY_SIZE)
_MESSAGE_ID = _FixedKey(message_span.MESSAGE_ID)
_BATCH_ID = _FixedKey(message_span.BATCH_ID)
_BATCH_WAIT = _FixedKey(message_span.BATCH_WAIT)
_DUPLICATE = _FixedKey(message_span.DUPLICATE)
_FANOUT_SOCKETS = _FixedKey(message_span.FANOUT_SOCKETS)
_BATCH_SIZE = _FixedKey(message_span.BATCH_SIZE)
_BATCH_DUPLICATES = _FixedKey(message_span.BATCH_DUPLICATES)
_EMIT_NAME_KIND = _field(b"\x2a", EMIT_NAME.encode()) + _KINDS[id(SpanKind.PRODUCER)]
_ENQUEUE_NAME_KIND = (
    _field(b"\x2a", ENQUEUE_NAME.encode()) + _KINDS[id(SpanKind.PRODUCER)]
)
_NO_DROPS = (0, 0, 0)
# The maximum number of attributes a message span's fields make: all set.
_MESSAGE_FIELDS = len(FIELD_KEYS)


class _Grouping:
    """Groups by equal keys (resources, scopes), in first-seen order.

    A provider's spans share one resource and one scope object, so the key's
    identity is tried first. Equality, the official encoder's rule, decides
    only on a miss. A Resource is never hashed, because that serializes it
    to JSON.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, Any] = {}
        self._keys: list[Any] = []
        self._groups: list[Any] = []

    def group(self, key: Any, new: Callable[[], Any]) -> Any:
        group = self._by_id.get(id(key))
        if group is not None:
            return group
        for index, known in enumerate(self._keys):
            if known == key:
                group = self._groups[index]
                break
        else:
            group = new()
            self._keys.append(key)
            self._groups.append(group)
        self._by_id[id(key)] = group
        return group

    def items(self) -> list[tuple[Any, Any]]:
        return list(zip(self._keys, self._groups, strict=True))


class _Key:
    """The encoder's record of one attribute key under one field tag.

    ``values`` maps the key's string values to their whole encoded fields
    while they repeat. It becomes None once the key has missed too often (an
    id), so that such a key costs no cache work at all.
    """

    __slots__ = ("key_field", "misses", "values")

    def __init__(self, key: str) -> None:
        self.key_field = _field(b"\x0a", key.encode())
        self.values: dict[str, bytes] | None = {}
        self.misses = 0


class _Encoder:
    """Span encoder, with a cache of encoded attributes and span names."""

    def __init__(self) -> None:
        self._tags: dict[bytes, dict[str, _Key]] = {}  # field tag -> key -> _Key
        self._cached = 0  # string fields cached in all the _Key objects
        self._names: dict[tuple[str, int], bytes] = {}  # span name and kind fields
        # A message span's fields that only change with the socket: the
        # span's and its fan-out's.
        self._sockets: dict[Socket, tuple[bytes, bytes]] = {}
        self._outcomes: dict[str, bytes] = {}  # a hand-off span's attributes
        self._batch = (-1, b"")  # the last batch id of a message span, and its field

    def attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        """Return ``attributes`` as repeated ``KeyValue`` fields of ``tag``.

        Plain strings, small ints and floats are written inline, because a
        call per attribute would cost more than the encoding itself.
        """
        if not attributes:
            return b""
        keys = self._tags.get(tag)
        if keys is None:
            keys = self._tags[tag] = {}
        parts = []
        for key, value in attributes.items():
            entry = keys.get(key)
            if entry is None:
                if not isinstance(
                    key, str
                ):  # skipped, as the official encoder skips it
                    logger.error(
                        "span attribute key %r not exported: keys must be strings", key
                    )
                    continue
                entry = self._new_key(keys, key)
            kind = type(value)
            if kind is str:
                values = entry.values
                if values is not None:
                    field = values.get(value)
                    if field is not None:
                        parts.append(field)
                        continue
                try:
                    data = value.encode()
                except UnicodeEncodeError:  # a lone surrogate cannot be UTF-8
                    logger.exception("span attribute %s not exported", key)
                    continue
                size = len(data)
                head = _STR_HEAD[size] if size < _HEADS else _str_head(size)
                field = _keyed(tag, entry.key_field, head, data)
                if values is not None:
                    self._keep(entry, value, field)
            elif kind is int and 0 <= value < _HEADS:
                field = _keyed(tag, entry.key_field, _INT_BODY[value], b"")
            elif kind is int and 0 <= value < _INT64_LIMIT:
                body = b"\x18" + (
                    _SMALL[value] if value < 16384 else _varint_bytes(value)
                )
                field = _keyed(tag, entry.key_field, b"\x12" + _SMALL[len(body)], body)
            elif kind is float:
                field = _keyed(
                    tag, entry.key_field, b"\x12\x09\x21", _pack_double(value)
                )
            elif kind is bool:
                field = _keyed(tag, entry.key_field, _BOOL_BODY[value], b"")
            else:  # negative ints, sequences, mappings, bytes
                try:
                    body = _any_value(value)
                except (TypeError, ValueError):
                    logger.exception("span attribute %s not exported", key)
                    continue
                field = _keyed(tag, entry.key_field, _value_head(len(body)), body)
            parts.append(field)
        return b"".join(parts)

    def _new_key(self, keys: dict[str, _Key], key: str) -> _Key:
        if len(keys) >= _CACHE_MAX:  # full of keys that never repeat, so start again
            # Copied first, because the HTTP routes' export thread may add a key.
            entries = list(keys.values())
            self._cached -= sum(len(k.values) for k in entries if k.values)
            keys.clear()
        entry = keys[key] = _Key(key)
        return entry

    def _keep(self, entry: _Key, value: str, field: bytes) -> None:
        """Cache a string field, unless its key keeps missing (an id).

        Such a key's entries would only push out the ones that repeat.
        """
        entry.misses += 1
        if entry.misses > _MISSES_BEFORE_BYPASS:
            self._cached -= len(entry.values or ())
            entry.values = None
            return
        if self._cached >= _CACHE_MAX:
            for keys in list(self._tags.values()):
                for known in list(keys.values()):
                    if known.values:
                        known.values = {}
            self._cached = 0
        values = entry.values
        if values is not None:  # None if another thread has just bypassed the key
            values[value] = field
            self._cached += 1

    def span(self, span: ReadableSpan) -> bytes:
        context = span.context
        assert context is not None  # a finished SDK span always has one
        parent = span.parent
        parent_id = None if parent is None else parent.span_id
        parts = self._head(context, context.span_id, parent_id)
        parts += (
            self._name_and_kind(span.name, span.kind),
            _TIMES.pack(b"\x39", span.start_time or 0, b"\x41", span.end_time or 0),
            self.attributes(b"\x4a", span.attributes),
        )

        drops = (span.dropped_attributes, span.dropped_events, span.dropped_links)
        parts += self._extras(drops, span.events, span.links)
        parts += _tail(span.status, parent is not None and parent.is_remote)
        return b"".join(parts)

    def lean(self, span: LeanSpan) -> list[bytes]:
        """Return the ``Span`` fields of a finished lean span and its recorded children.

        The children come first, in the order in which they ended, then the
        span. A child shares its parent's trace id and trace state, has the
        parent for its parent, no links, and at most its one exception event.
        All are encoded in one pass, with the ids and the trace state read
        once: on the gateway's path, every call and property read here is
        paid for on every message.
        """
        context = span.context
        # A span context is a tuple: (trace id, span id, is remote, flags,
        # state, is valid). Unpacked, it costs one operation, where each
        # property would cost a call.
        trace_id, span_id, _, _, trace_state = context[:5]
        high, low = trace_id >> 64, trace_id & _UINT64
        state = _field(b"\x1a", _trace_state(context)) if trace_state else b""
        out = self._children(span, high, low, state) if span.children else []
        parent = span.parent
        remote = False
        parent_field = b""
        if parent is not None:
            _, parent_id, remote = parent[:3]
            parent_field = _PARENT.pack(b"\x22\x08", parent_id)
        parts = [
            _IDS.pack(b"\x0a\x10", high, low, b"\x12\x08", span_id),
            state,
            parent_field,
            self._name_and_kind(span.name, span.kind),
            _TIMES.pack(b"\x39", span.start_time, b"\x41", span.end_time or 0),
        ]
        shared = span.shared
        if shared is not None:
            encoded = shared.encoded
            if encoded is None:
                encoded = shared.encoded = self.attributes(b"\x4a", shared)
            parts.append(encoded)
        parts.append(self.attributes(b"\x4a", span.attributes))
        parts += self._extras(span.drops, span.events, span.links)
        parts += _tail(span.status, remote)
        body = b"".join(parts)
        out.append(b"\x12" + _varint(len(body)) + body)
        return out

    def _children(
        self, span: LeanSpan, high: int, low: int, state: bytes
    ) -> list[bytes]:
        """Return the ``Span`` fields of the children recorded on ``span``."""
        span_id = span.context[1]
        out = []
        for child in span.children:
            body = b"".join(
                (
                    _IDS.pack(b"\x0a\x10", high, low, b"\x12\x08", child.span_id),
                    state,
                    _PARENT.pack(b"\x22\x08", span_id),
                    self._name_and_kind(child.name, child.kind),
                    _TIMES.pack(b"\x39", child.start_time, b"\x41", child.end_time),
                    self.attributes(b"\x4a", child.attributes),
                    *(self._events(child.events) if child.events else ()),
                    *_tail(child.status, False),
                )
            )
            out.append(b"\x12" + _varint(len(body)) + body)
        return out

    def message(self, span: MessageSpan) -> list[bytes]:
        """Return the ``Span`` fields of a finished message span and its children.

        The same fields as ``lean`` gives for the span once materialized,
        but written from its fields: the attributes that only change with
        the socket come from one cached field per socket, and the others
        from heads made once per key.
        """
        socket = span.socket
        extras = span.attributes
        if socket is None or (
            extras
            and (
                not FIELD_KEYS.isdisjoint(extras)
                or len(extras) + _MESSAGE_FIELDS > span.tracer.limits.attributes
            )
        ):  # a field's key set through the API as well, or near the count limit
            span.materialize()
            return self.lean(span)
        try:
            return self._message(span, socket, extras)
        except UnicodeEncodeError:  # the generic path logs and skips the value
            span.materialize()
            return self.lean(span)

    def _message(
        self, span: MessageSpan, socket: Socket, extras: dict[str, Any]
    ) -> list[bytes]:
        blocks = self._sockets.get(socket)
        if blocks is None:
            if len(self._sockets) >= _CACHE_MAX:
                self._sockets.clear()
            blocks = self._sockets[socket] = (
                self.attributes(b"\x4a", socket_attributes(socket)),
                self.attributes(b"\x4a", emit_room_attributes(socket[0])),
            )
        context = span.context
        trace_id, span_id, _, _, trace_state = context[:5]
        high, low = trace_id >> 64, trace_id & _UINT64
        state = _field(b"\x1a", _trace_state(context)) if trace_state else b""
        out = self._children(span, high, low, state) if span.children else []
        ids = _IDS.pack(b"\x0a\x10", high, low, b"\x12\x08", span_id)
        parent_of_child = _PARENT.pack(b"\x22\x08", span_id)

        message_id = span.message_id
        # The fan-out follows the write, which sets the message id. Without one,
        # both this and materialize() write an empty id.
        id_field = _MESSAGE_ID.string((message_id or "").encode())
        emit = span.emit
        if emit is not None:
            child_id, start, end, sockets = emit
            out.append(
                _recorded_child(
                    _IDS.pack(b"\x0a\x10", high, low, b"\x12\x08", child_id),
                    state,
                    parent_of_child,
                    _EMIT_NAME_KIND,
                    _TIMES.pack(b"\x39", start, b"\x41", end),
                    blocks[1],
                    id_field,
                    _FANOUT_SOCKETS.ints[sockets]
                    if 0 <= sockets < 256
                    else _FANOUT_SOCKETS.integer(sockets),
                )
            )
        hand_off = span.hand_off
        if hand_off is not None:
            child_id, start, end, outcome = hand_off
            out.append(
                _recorded_child(
                    _IDS.pack(b"\x0a\x10", high, low, b"\x12\x08", child_id),
                    state,
                    parent_of_child,
                    _ENQUEUE_NAME_KIND,
                    _TIMES.pack(b"\x39", start, b"\x41", end),
                    self._outcome(outcome),
                )
            )

        parent = span.parent
        remote = False
        parent_field = b""
        if parent is not None:
            _, parent_id, remote = parent[:3]
            parent_field = _PARENT.pack(b"\x22\x08", parent_id)
        parts = [
            ids,
            state,
            parent_field,
            self._name_and_kind(span.name, span.kind),
            _TIMES.pack(b"\x39", span.start_time, b"\x41", span.end_time or 0),
            blocks[0],
        ]
        conversation_id = span.conversation_id
        if conversation_id is not None:
            size = span.body_size
            parts += (
                _CONVERSATION_ID.string(conversation_id.encode()),
                _BODY_SIZE.ints[size] if 0 <= size < 256 else _BODY_SIZE.integer(size),
            )
        if message_id is not None:
            batch_id, batch_field = self._batch
            if span.batch_id != batch_id:  # messages of one batch end one after another
                batch_field = _BATCH_ID.integer(span.batch_id)
                self._batch = (span.batch_id, batch_field)
            parts += (
                id_field,
                batch_field,
                _BATCH_WAIT.float_head + _pack_double(span.batch_wait),
                _DUPLICATE.booleans[span.duplicate],
            )
        if extras:
            parts.append(self.attributes(b"\x4a", extras))
        if span.events or span.links or span.drops != _NO_DROPS:
            parts += self._extras(span.drops, span.events, span.links)
        parts += _tail(span.status, remote)
        body = b"".join(parts)
        out.append(b"\x12" + _varint(len(body)) + body)
        return out

    def write(self, span: WriteSpan) -> list[bytes]:
        """Return the ``Span`` field of a finished batch write span, in a list.

        The same field as ``lean`` gives for the span once materialized, but
        with its shared attributes encoded once and its links written from
        the message spans' contexts.
        """
        shared = span.shared
        linked = span.linked
        extras = span.attributes
        if (
            shared is None
            or linked is None
            or span.links
            or span.children
            or (
                extras
                and (
                    not WRITE_FIELD_KEYS.isdisjoint(extras)
                    or len(extras) + len(shared) + len(WRITE_FIELD_KEYS)
                    > span.tracer.limits.attributes
                )
            )
        ):
            span.materialize()
            return self.lean(span)  # with any children recorded on it
        encoded = shared.encoded
        if encoded is None:
            encoded = shared.encoded = self.attributes(b"\x4a", shared)
        context = span.context
        trace_id, span_id, _, _, trace_state = context[:5]
        state = _field(b"\x1a", _trace_state(context)) if trace_state else b""
        parts = [
            _IDS.pack(
                b"\x0a\x10", trace_id >> 64, trace_id & _UINT64, b"\x12\x08", span_id
            ),
            state,
            self._name_and_kind(span.name, span.kind),
            _TIMES.pack(b"\x39", span.start_time, b"\x41", span.end_time or 0),
            encoded,
            _BATCH_SIZE.integer(span.batch_size),
            _BATCH_ID.integer(span.batch_id),
        ]
        if span.duplicates is not None:
            parts.append(_BATCH_DUPLICATES.integer(span.duplicates))
        if extras:
            parts.append(self.attributes(b"\x4a", extras))
        if span.events or span.drops != _NO_DROPS:
            parts += self._extras(span.drops, span.events, ())
        for linked_id, linked_span, remote in (context[:3] for context in linked):
            parts.append(
                _LINK.pack(
                    b"\x6a\x21\x0a\x10",
                    linked_id >> 64,
                    linked_id & _UINT64,
                    b"\x12\x08",
                    linked_span,
                )
                + (_LINK_REMOTE if remote else _LINK_LOCAL)
            )
        parts += _tail(span.status, False)
        body = b"".join(parts)
        return [b"\x12" + _varint(len(body)) + body]

    def _outcome(self, outcome: str) -> bytes:
        field = self._outcomes.get(outcome)
        if field is None:
            if len(self._outcomes) >= _CACHE_MAX:
                self._outcomes.clear()
            field = self.attributes(b"\x4a", enqueue_attributes(outcome))
            self._outcomes[outcome] = field
        return field

    @staticmethod
    def _head(context: SpanContext, span_id: int, parent_id: int | None) -> list[bytes]:
        """Return the fields of a span's ids: trace, span, trace state and parent."""
        trace_id = context.trace_id
        parts = [
            _IDS.pack(
                b"\x0a\x10", trace_id >> 64, trace_id & _UINT64, b"\x12\x08", span_id
            )
        ]
        if context.trace_state:
            parts.append(_field(b"\x1a", _trace_state(context)))
        if parent_id is not None:
            parts.append(_PARENT.pack(b"\x22\x08", parent_id))
        return parts

    def _name_and_kind(self, name: str, kind: SpanKind) -> bytes:
        """Return the name and kind fields of a span, from the cache when there."""
        encoded = self._names.get((name, id(kind)))
        if encoded is None:
            if len(self._names) >= _CACHE_MAX:
                self._names.clear()
            encoded = _field(b"\x2a", name.encode()) + _KINDS[id(kind)]
            self._names[(name, id(kind))] = encoded
        return encoded

    def _extras(
        self,
        drops: tuple[int, int, int],
        events: Sequence[Event],
        links: Sequence[Link],
    ) -> list[bytes]:
        """Return the fields between a span's attributes and its status, in order.

        ``drops`` are the counts of attributes, events and links dropped.
        """
        dropped_attributes, dropped_events, dropped_links = drops
        parts = []
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        if events:
            parts += self._events(events)
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        if links:
            parts += self._links(links)
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))
        return parts

    def _events(self, events: Sequence[Event]) -> list[bytes]:
        parts = []
        for event in events:
            body = b"\x09" + _pack_fixed64(event.timestamp)
            body += _field(b"\x12", event.name.encode())
            body += self.attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(b"\x5a", body))
        return parts

    def _links(self, links: Sequence[Link]) -> list[bytes]:
        parts = []
        for link in links:
            linked = link.context
            attributes = link.attributes
            if attributes is None or (not attributes and not link.dropped_attributes):
                # The common case, a link to a message span: a fixed size.
                trace_id, span_id, remote = linked[:3]  # as unpacked in lean()
                parts.append(
                    _LINK.pack(
                        b"\x6a\x21\x0a\x10",
                        trace_id >> 64,
                        trace_id & _UINT64,
                        b"\x12\x08",
                        span_id,
                    )
                    + (_LINK_REMOTE if remote else _LINK_LOCAL)
                )
                continue
            body = b"\x0a\x10" + linked.trace_id.to_bytes(16, "big")
            body += b"\x12\x08" + linked.span_id.to_bytes(8, "big")
            body += self.attributes(b"\x22", attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + (_FLAGS_REMOTE if linked.is_remote else _FLAGS_LOCAL)
            parts.append(_field(b"\x6a", body))
        return parts

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        resources = _Grouping()
        for span in spans:
            scopes = resources.group(span.resource, _Grouping)
            encoded = scopes.group(span.instrumentation_scope or None, list)
            encoded.append(_field(b"\x12", self.span(span)))

        out = []
        for resource, scopes in resources.items():
            body = [_field(b"\x0a", self.attributes(b"\x0a", resource.attributes))]
            for scope, encoded in scopes.items():
                scope_spans = [_field(b"\x0a", self.scope(scope)), *encoded]
                if scope is not None and scope.schema_url:
                    scope_spans.append(_field(b"\x1a", scope.schema_url.encode()))
                body.append(_field(b"\x12", b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_field(b"\x1a", resource.schema_url.encode()))
            out.append(_field(b"\x0a", b"".join(body)))
        return b"".join(out)

    def scope(self, scope: Any) -> bytes:
        if scope is None:
            return b""
        body = _field(b"\x0a", scope.name.encode()) if scope.name else b""
        if scope.version:
            body += _field(b"\x12", scope.version.encode())
        return body + self.attributes(b"\x1a", scope.attributes)


def _recorded_child(*fields: bytes) -> bytes:
    """Return a ``Span`` field of a message span's child: ``fields``, an unset status."""
    body = b"".join(fields) + _TAIL_LOCAL
    return b"\x12" + _varint(len(body)) + body


def _trace_state(context: SpanContext) -> bytes:
    return ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()


def _tail(status: Status, remote_parent: bool) -> tuple[bytes, ...]:
    """Return the status and flags fields that end a span."""
    if status is UNSET_STATUS or (
        status.status_code is StatusCode.UNSET and not status.description
    ):  # the identity test spares two property calls for most spans
        return (_TAIL_REMOTE if remote_parent else _TAIL_LOCAL,)
    flags = _FLAGS_REMOTE if remote_parent else _FLAGS_LOCAL
    return (_field(b"\x7a", _status(status)), b"\x85\x01", flags)


def _status(status: Status) -> bytes:
    body = _field(b"\x12", status.description.encode()) if status.description else b""
    if status.status_code.value:
        body += b"\x18" + _SMALL[status.status_code.value]
    return body


_encoder = _Encoder()


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """Return the serialized ``ExportTraceServiceRequest`` carrying ``spans``."""
    return _encoder.request(spans)


class HttpSpanExporter(_HttpExporter):
    """The OTLP/HTTP protobuf exporter, with the encoder of this module.

    Unless given a session (or a credential provider that makes one), it
    reads the environment once, when it is made. A requests session that
    trusts the environment reads every variable of it twice a request to
    find proxies: about 0.14 ms of CPU per export on the reference host. Read
    once, ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` apply as before,
    and so does the CA bundle that ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` names (its file is loaded for each new connection),
    unless ``OTEL_EXPORTER_OTLP_CERTIFICATE`` (or its traces variant) names
    the certificate, which then wins. ``~/.netrc`` is not read: credentials
    go in ``OTEL_EXPORTER_OTLP_HEADERS``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        session = None
        if kwargs.get("session") is None and not any(
            os.environ.get(name) for name in _CREDENTIAL_PROVIDERS
        ):
            session = kwargs["session"] = requests.Session()
        super().__init__(*args, **kwargs)
        if session is not None:
            endpoint = getattr(self, "_endpoint", "")
            session.proxies.update(requests.utils.get_environ_proxies(endpoint))
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get(
                "CURL_CA_BUNDLE"
            )
            if bundle and session.verify is True:  # no OTLP certificate set
                session.verify = bundle
            session.trust_env = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if client is None:  # a release of the exporter built differently
            return super().export(spans)
        if self._shutdown:
            logger.warning(
                "span exporter already shut down: %d spans dropped", len(spans)
            )
            return SpanExportResult.FAILURE
        try:
            body = encode_spans(spans)
        except Exception:  # a bad span must not stop the export thread
            logger.exception("encoding %d spans failed: dropped", len(spans))
            return SpanExportResult.FAILURE
        result = client.export(body)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    def send_encoded(self, body: bytes) -> bool:
        """Send an encoded ``ExportTraceServiceRequest``; return whether it landed."""
        if self._shutdown:
            return False
        limit = getattr(self, "_max_request_size", 0)
        if 0 < limit < len(body):
            logger.warning(
                "span request of %d bytes is over the %d-byte limit: dropped",
                len(body),
                limit,
            )
            return False
        return bool(self._client.export(body).success)


def grpc_span_exporter() -> SpanExporter:
    """Return the OTLP/gRPC exporter with the encoder of this module.

    grpcio is imported here, on first use, so that OTLP/HTTP users never load
    it. gRPC wants a message object: parsing the encoded bytes back is done in
    C by upb, at a small fraction of the cost of building the message in Python.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter,
    )

    class GrpcSpanExporter(OTLPSpanExporter):
        def _translate_data(
            self, data: Sequence[ReadableSpan] | bytes
        ) -> ExportTraceServiceRequest:
            body = data if isinstance(data, bytes) else encode_spans(data)
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
                body
            )
            return request

        def send_encoded(self, body: bytes) -> bool:
            """Send an encoded ``ExportTraceServiceRequest``; return whether it landed."""
            return self._export(body) is SpanExportResult.SUCCESS  # type: ignore[arg-type]

    return GrpcSpanExporter()


class SpanQueue:
    """Spans encoded soon after they end, sent in batches by one thread.

    The gateway's own spans skip the SDK's span processor. Spans that end on
    the event loop are encoded there, together with the others that end
    within ``encode_delay_seconds`` (50 ms). A group is encoded sooner once
    a third of ``batch_size`` spans have ended in it, so that with up to two
    children each it still fits in a batch. Spans that end on another thread
    are encoded at once by that thread. They then wait as bytes, and the
    sending thread only joins bytes and posts them. Encoding in the export
    thread instead took twice as long per span under load, because that
    thread kept losing the GIL (and its caches) to the event loop, and the
    spans it kept alive added to the collector's work.

    The batching settings are the batch span processor's: ``OTEL_BSP_MAX_QUEUE_SIZE``
    spans at most wait (more are dropped and counted in ``dropped``), and a
    batch of up to ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` goes out every
    ``OTEL_BSP_SCHEDULE_DELAY`` ms, or as soon as that many wait. A span and
    the children recorded on it are queued or dropped together, so that no
    child arrives without its parent. A warning with the count so far is
    logged at the first drop and then at most every 10 s. ``on_drop`` is
    called with the count and reason of every drop, failed exports included.
    """

    def __init__(
        self,
        send: Callable[[bytes], bool],
        resource: Resource,
        scope: InstrumentationScope,
        *,
        max_queue_size: int = 2048,
        batch_size: int = 512,
        delay_seconds: float = 5.0,
        encode_delay_seconds: float = ENCODE_DELAY_SECONDS,
    ) -> None:
        self._send = send
        self._max_queue_size = max_queue_size
        self._batch_size = min(batch_size, max_queue_size)
        self._delay = delay_seconds
        resource_field = _field(
            b"\x0a", _encoder.attributes(b"\x0a", resource.attributes)
        )
        self._resource_schema = (
            _field(b"\x1a", resource.schema_url.encode())
            if resource.schema_url
            else b""
        )
        self._head = resource_field
        self._scope = _field(b"\x0a", _encoder.scope(scope))
        # A group is encoded without a pause, so a group of more than a batch
        # could fill a small queue before the sending thread runs. A message
        # span brings up to two children, hence a third of a batch.
        self._ended: Deferred[Any] = Deferred(
            self._encode,
            encode_delay_seconds,
            max_items=max(1, self._batch_size // _SPANS_PER_MESSAGE),
        )
        self._spans: deque[bytes] = deque()  # append and popleft are thread-safe
        self._wake = threading.Event()
        self._sending = threading.Lock()
        self._stopping = False
        self.dropped = 0
        # Called with each count of spans dropped and the reason (queue_full,
        # shutdown or export_failed), through report_drop. The gateway counts
        # them in a metric.
        self.on_drop: Callable[[int, str], object] | None = None
        self._next_drop_warning = 0.0
        self._thread = threading.Thread(
            target=self._run, name="otlp-span-queue", daemon=True
        )
        self._thread.start()

    def add(self, span: Any) -> None:
        """Queue a finished, sampled span and its children.

        On the event loop they are encoded with the other spans that end
        within ``encode_delay_seconds``, as ``service.deferred`` describes.
        """
        self._ended.add(span)

    def _encode(self, span: Any) -> None:
        """Encode a span and its children and queue them, logging any error."""
        spans = self._spans
        waiting = len(spans)
        kind = type(span)
        try:  # children first, as they ended
            if kind is MessageSpan:
                encoded = _encoder.message(span)
            elif kind is WriteSpan:
                encoded = _encoder.write(span)
            else:
                encoded = _encoder.lean(span)
        except Exception:  # a span must never fail the message it describes
            logger.exception("encoding span %r or its children failed", span.name)
            return
        count = len(encoded)
        if waiting + count > self._max_queue_size or self._stopping:
            self.dropped += count
            self.report_drop(count, "shutdown" if self._stopping else "queue_full")
            now = time.monotonic()
            if now >= self._next_drop_warning:  # the first, then every 10 s at most
                self._next_drop_warning = now + _DROP_WARNING_SECONDS
                logger.warning(
                    "span queue full (%d spans) or shut down: %d spans dropped so far",
                    self._max_queue_size,
                    self.dropped,
                )
            return
        spans.extend(encoded)
        # Wake the sending thread once, as the queue reaches a batch. Setting the
        # event again on every span until that thread runs would cost a lock each.
        if waiting < self._batch_size <= waiting + count:
            self._wake.set()

    def request(self, encoded: Sequence[bytes]) -> bytes:
        """Return the ``ExportTraceServiceRequest`` carrying encoded spans."""
        scope_spans = _field(b"\x12", self._scope + b"".join(encoded))
        return _field(b"\x0a", self._head + scope_spans + self._resource_schema)

    def _run(self) -> None:
        while not self._stopping:
            if len(self._spans) < self._batch_size:  # otherwise a full batch is waiting
                self._wake.wait(self._delay)
            self._wake.clear()
            self._send_waiting()
        self._send_waiting()

    def _send_waiting(self, deadline: float | None = None) -> None:
        """Send the spans waiting now (not those that arrive meanwhile)."""
        with self._sending:  # one batch at a time, in order
            spans = self._spans
            left = len(spans)
            while left > 0 and (deadline is None or time.monotonic() < deadline):
                count = min(left, self._batch_size)
                left -= count
                batch = [spans.popleft() for _ in range(count)]
                try:
                    sent = self._send(self.request(batch))
                except Exception:  # the thread must outlive a failed export
                    logger.exception("export of %d spans failed: dropped", count)
                    sent = False
                else:
                    if not sent:
                        logger.warning("export of %d spans failed: dropped", count)
                if not sent:
                    self.report_drop(count, "export_failed")

    def report_drop(self, count: int, reason: str) -> None:
        """Pass ``count`` spans dropped for ``reason`` to ``on_drop``, if set."""
        if self.on_drop is not None:
            self.on_drop(count, reason)

    def force_flush(self, timeout_seconds: float = 30.0) -> bool:
        """Send what waits now, from the calling thread, as the SDK's processor does.

        Return False if that did not finish within the timeout; a batch whose
        send has started still runs to the exporter's own timeout.
        """
        deadline = time.monotonic() + timeout_seconds
        self._ended.flush()
        self._send_waiting(deadline)
        return not self._spans or time.monotonic() < deadline

    def shutdown(self, timeout_seconds: float = 30.0) -> None:
        """Send what waits and stop the thread."""
        self._ended.flush()
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_seconds)
