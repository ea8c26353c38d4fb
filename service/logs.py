"""Structured JSON logs on stdout, one object per line.

Two kinds of line share the stream:

* KPI lines keep the exact shapes that existing log pipelines parse::

    {"t": "...", "metric": "runtime", "messages_per_sec": 12.4, "active_sockets": 8,
     "rss_mb": 141.2, "heap_used_mb": 96.5}
    {"t": "...", "metric": "mongo_write_ms", "value": 3.41}
    {"t": "...", "metric": "event_loop_lag_ms", "value": 0.42}

* Event lines: ``{"t", "level", "logger", "message", ...fields}``, plus
  ``trace_id`` and ``span_id`` when written inside a span, recorded or
  dropped by the sampler (its ids still name the client's trace).

Components log through ``logging.getLogger("chat.<component>")`` with lazy
``%s`` arguments and ids passed in ``extra``.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from service.deferred import Deferred

__all__ = [
    "JsonFormatter",
    "configure_logging",
    "flush_kpis",
    "log_kpi",
    "log_kpi_soon",
]

kpi_logger = logging.getLogger("chat.kpi")

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName", "color_message", "websocket"}
# When the logging module was loaded, which relativeCreated counts from.
_LOGGING_START: float = getattr(logging, "_startTime", time.time())
_SECRET_HINTS = ("token", "secret", "password", "api_key", "authorization")


_last_second: list[Any] = [None, ""]  # [whole second, its ISO 8601 text]


def _timestamp(created: float) -> str:
    # Several lines a second share the date and time; only milliseconds change.
    second = int(created)
    micros = round((created - second) * 1e6)  # rounded as datetime rounds it
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if second != _last_second[0]:
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second[:] = [second, text]
    return f"{_last_second[1]}.{micros // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        kpi = getattr(record, "kpi", None)
        if isinstance(kpi, dict):
            return json.dumps({"t": _timestamp(record.created), **kpi})

        line: dict[str, Any] = {
            "t": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            if any(hint in key.lower() for hint in _SECRET_HINTS):
                value = "[redacted]"
            line[key] = value

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format(context.trace_id, "032x")
            line["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stdout as JSON at ``level`` and above."""
    # The lines never show the caller, thread or process, so the records skip
    # those lookups, as the logging HOWTO's "Optimization" section describes.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    kpi_logger.setLevel(logging.INFO)

    # uvicorn and the Socket.IO libraries log through their own loggers; route
    # them through the JSON handler and keep per-request lines out of INFO.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # uvicorn logs every websocket open and close at INFO: per-socket detail.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name in ("socketio", "engineio", "pymongo", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _KpiRecord(logging.LogRecord):
    """The record of a KPI line, with every attribute of a ``LogRecord``.

    ``LogRecord.__init__`` splits the caller's path into file and module
    names on every record, which a KPI line never shows, and the per-write
    line is written on the message path. This record sets the values that
    ``configure_logging`` leaves the others with, so any handler, filter or
    formatter can still read it.
    """

    def __init__(
        self, metric: str, kpi: dict[str, Any], created: float | None = None
    ) -> None:
        # LogRecord.__init__ is not called: it is the cost this class avoids.
        if created is None:
            created = time.time()
        self.name = kpi_logger.name
        self.msg = metric
        self.args = None
        self.levelno = logging.INFO
        self.levelname = "INFO"
        self.pathname = self.filename = "(unknown file)"
        self.module = "(unknown module)"
        self.lineno = 0
        self.funcName = "(unknown function)"
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _LOGGING_START) * 1000
        self.thread = self.threadName = None
        self.process = self.processName = None
        self.exc_info = self.exc_text = self.stack_info = None
        self.kpi = kpi


def log_kpi(metric: str, **fields: float | int) -> None:
    """Write one KPI line in the documented shape."""
    if kpi_logger.isEnabledFor(logging.INFO):
        kpi_logger.handle(_KpiRecord(metric, {"metric": metric, **fields}))


def _write_kpi(line: tuple[float, str, dict[str, Any]]) -> None:
    created, metric, kpi = line
    kpi_logger.handle(_KpiRecord(metric, kpi, created))


# How long KPI lines logged on the event loop wait to be written together.
KPI_DELAY_SECONDS = 0.05
_waiting_kpis: Deferred[tuple[float, str, dict[str, Any]]] = Deferred(
    _write_kpi, KPI_DELAY_SECONDS
)
atexit.register(_waiting_kpis.flush)


def log_kpi_soon(metric: str, **fields: float | int) -> None:
    """Log a KPI line that is written with the others of the next 50 ms.

    It is meant for lines on the message path (see ``service.deferred``).
    The line's ``t`` is the time of this call, so lines written together
    keep their own times, but may follow other lines logged after them.
    ``flush_kpis`` writes those that wait, and the writer calls it when it
    stops.
    """
    if kpi_logger.isEnabledFor(logging.INFO):
        _waiting_kpis.add((time.time(), metric, {"metric": metric, **fields}))


def flush_kpis() -> None:
    """Write every KPI line that waits now."""
    _waiting_kpis.flush()
