"""A local stand-in for the Gemini API method ``batchEmbedContents``, for tests.

The server listens on 127.0.0.1 on a free port, in a background thread, so it
serves sync tests, async tests and child processes alike::

    with FakeGoogle(api_key="test-key") as fake:
        embedder = GoogleEmbedder(api_key="test-key", base_url=fake.url)
        ...
        assert len(fake.requests) == 1

It checks what the real API checks and responds in the same shapes:

* ``POST /v1beta/models/{model}:batchEmbedContents`` with ``{"requests": [...]}``
  returns ``{"embeddings": [{"values": [...]}, ...]}``, one per request.
* Errors use Google's body ``{"error": {"code", "message", "status"}}``.
  A request without an API key gets 403 PERMISSION_DENIED. A wrong key gets
  400 INVALID_ARGUMENT with reason API_KEY_INVALID, as from the real API.
  An unknown model gets 404 NOT_FOUND, and a malformed body or more than 100
  requests get 400 INVALID_ARGUMENT.

Vectors are deterministic: each text seeds a random generator, and the length
of each vector varies with the text, so it is not 1 and clients must normalise.
:meth:`FakeGoogle.fail_next` and :meth:`FakeGoogle.respond_next` script the
next responses, for outage and malformed-response tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["FakeGoogle", "RecordedRequest"]

#: The google.rpc status name of each HTTP status the Gemini API returns.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_FAILURE_MESSAGES = {
    403: "The caller does not have permission",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "Internal error encountered.",
    503: "The model is overloaded. Please try again later.",
    504: "Deadline expired before operation could complete.",
}
_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:]+):batchEmbedContents$")
_TASK_TYPES = frozenset(
    {
        "TASK_TYPE_UNSPECIFIED",
        "RETRIEVAL_QUERY",
        "RETRIEVAL_DOCUMENT",
        "SEMANTIC_SIMILARITY",
        "CLASSIFICATION",
        "CLUSTERING",
        "QUESTION_ANSWERING",
        "FACT_VERIFICATION",
        "CODE_RETRIEVAL_QUERY",
    }
)
# The API parses proto JSON, which accepts both spellings of each field.
_REQUEST_FIELDS = frozenset(
    {
        "model",
        "content",
        "taskType",
        "task_type",
        "title",
        "outputDimensionality",
        "output_dimensionality",
    }
)
MAX_BATCH = 100


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received, and the status of its response."""

    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    #: The parsed JSON body, or None when the body was not JSON.
    body: Any
    status: int

    @property
    def texts(self) -> list[str]:
        """Return the texts of a well-formed batch request, in order."""
        return [item["content"]["parts"][0]["text"] for item in self.body["requests"]]


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def google_error(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Return Google's JSON error body for ``status``."""
    error = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "")}
    return {"error": {**error, **extra}}


def fake_vector(text: str, dimension: int) -> list[float]:
    """Return the raw vector the fake sends for ``text``: seeded, not unit length."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    generator = random.Random(seed)
    values = [generator.gauss(0.0, 1.0) for _ in range(dimension)]
    norm = math.sqrt(sum(value * value for value in values))
    length = 0.5 + seed % 7  # Between 0.5 and 6.5, so never 1.
    return [value / norm * length for value in values]


class FakeGoogle:
    """A batchEmbedContents server on 127.0.0.1, started by ``with`` or :meth:`start`.

    ``default_dimension`` is the vector size when a request carries no
    ``outputDimensionality`` (3072, like gemini-embedding-001). ``delay_seconds``
    delays every response, for timeout tests, and may be changed at any time.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        models: tuple[str, ...] = ("gemini-embedding-001",),
        default_dimension: int = 3072,
        delay_seconds: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.default_dimension = default_dimension
        self.delay_seconds = delay_seconds
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._scripted: deque[_Reply] = deque()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL for ``google_base_url``, such as ``http://127.0.0.1:41234``."""
        if self._server is None:
            raise RuntimeError("FakeGoogle is not started; use it in a with block")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Return a copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def embedded_texts(self) -> list[str]:
        """Return the texts of every request that got a 200 response, in order."""
        return [
            text for item in self.requests if item.status == 200 for text in item.texts
        ]

    def vector_for(self, text: str, dimension: int | None = None) -> list[float]:
        """Return the raw vector the fake sends for ``text``."""
        return fake_vector(text, dimension or self.default_dimension)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Respond to the next ``count`` requests with Google's error for ``status``.

        A 429 carries a google.rpc.RetryInfo detail asking for a 1 s delay.
        """
        if status < 400:
            raise ValueError(
                f"status must be an HTTP error (400 or more), not {status}"
            )
        extra: dict[str, Any] = {}
        if status == 429:
            retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo"}
            extra["details"] = [{**retry_info, "retryDelay": "1s"}]
        message = _FAILURE_MESSAGES.get(status, f"Fake failure with HTTP {status}.")
        body = google_error(status, message, **extra)
        self.respond_next(body, status=status, count=count)

    def respond_next(self, body: object, *, status: int = 200, count: int = 1) -> None:
        """Respond to the next ``count`` requests with ``body``, whatever they contain.

        ``bytes`` are sent as they are, anything else as JSON.
        """
        if count < 0:
            raise ValueError(f"count must be 0 or more, not {count}")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = _Reply(status, raw, {"Content-Type": "application/json; charset=UTF-8"})
        with self._lock:
            self._scripted.extend([reply] * count)

    def start(self) -> FakeGoogle:
        """Start serving in a daemon thread and return self."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        # A short poll interval keeps close(), which waits for one poll, fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-google",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; delayed responses are abandoned."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeGoogle:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _reply(self, path: str, headers: dict[str, str], body: Any) -> _Reply:
        with self._lock:
            scripted = self._scripted.popleft() if self._scripted else None
        if scripted is not None:
            return scripted
        try:
            payload = self._embed(path, headers, body)
        except _BadRequest as exc:
            error = google_error(exc.status, exc.message, **exc.extra)
            return _json_reply(exc.status, error)
        return _json_reply(200, payload)

    def _embed(self, path: str, headers: dict[str, str], body: Any) -> dict[str, Any]:
        self._check_key(headers)
        match = _PATH.match(path.split("?", 1)[0])
        if match is None or match["model"] not in self.models:
            raise _BadRequest(
                404,
                f"{path} is not found for API version v1beta, or is not supported "
                "for batchEmbedContents.",
            )
        requests = _check_body(body, f"models/{match['model']}")
        return {"embeddings": [self._embedding(item) for item in requests]}

    def _check_key(self, headers: dict[str, str]) -> None:
        key = headers.get("x-goog-api-key")
        if key is None:
            raise _BadRequest(
                403,
                "Method doesn't allow unregistered callers (callers without "
                "established identity). Please use API Key or other form of API "
                "consumer identity to call this API.",
            )
        if key != self.api_key:
            info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo"}
            raise _BadRequest(
                400,
                "API key not valid. Please pass a valid API key.",
                details=[{**info, "reason": "API_KEY_INVALID"}],
            )

    def _embedding(self, item: dict[str, Any]) -> dict[str, list[float]]:
        dimension = item.get("outputDimensionality", item.get("output_dimensionality"))
        text: str = item["content"]["parts"][0]["text"]
        return {"values": fake_vector(text, dimension or self.default_dimension)}

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _json_reply(status: int, payload: object) -> _Reply:
    headers = {"Content-Type": "application/json; charset=UTF-8"}
    return _Reply(status, json.dumps(payload).encode(), headers)


def _check_body(body: Any, model: str) -> list[dict[str, Any]]:
    """Return the embed requests of a valid batch body, or raise _BadRequest."""
    if not isinstance(body, dict):
        raise _BadRequest(400, "Invalid JSON payload received. Expected an object.")
    unknown = set(body) - {"requests"}
    if unknown:
        raise _BadRequest(400, f"Invalid JSON payload received. Unknown name {unknown}")
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise _BadRequest(400, "* BatchEmbedContentsRequest.requests: is required")
    if len(requests) > MAX_BATCH:
        raise _BadRequest(
            400,
            "* BatchEmbedContentsRequest.requests: at most 100 requests can be in "
            "one batch",
        )
    for index, item in enumerate(requests):
        _check_request(item, index, model)
    return requests


def _check_request(item: Any, index: int, model: str) -> None:
    where = f"BatchEmbedContentsRequest.requests[{index}]"
    if not isinstance(item, dict):
        raise _BadRequest(400, f"* {where}: must be an object")

    unknown = set(item) - _REQUEST_FIELDS
    if unknown:
        raise _BadRequest(
            400, f"Invalid JSON payload received. Unknown name {unknown} at '{where}'"
        )

    if item.get("model") != model:
        raise _BadRequest(
            400,
            f"* {where}.model: must match the batch model {model}, not "
            f"{item.get('model')!r}",
        )

    if not _has_one_text_part(item.get("content")):
        raise _BadRequest(400, f"* {where}.content.parts: one text part is required")

    task_type = item.get("taskType", item.get("task_type"))
    if task_type is not None and task_type not in _TASK_TYPES:
        raise _BadRequest(400, f"* {where}.task_type: unknown value {task_type!r}")

    dimension = item.get("outputDimensionality", item.get("output_dimensionality"))
    if dimension is not None and (not isinstance(dimension, int) or dimension < 1):
        raise _BadRequest(
            400, f"* {where}.output_dimensionality: must be a positive integer"
        )


def _has_one_text_part(content: Any) -> bool:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or len(parts) != 1:
        return False
    return isinstance(parts[0], dict) and isinstance(parts[0].get("text"), str)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out closes the socket before a delayed reply;
        # that is expected in timeout tests and not worth a traceback.
        pass


class _Handler(BaseHTTPRequestHandler):
    fake: FakeGoogle
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}

        if body is None and raw:
            reply = _json_reply(
                400, google_error(400, "Invalid JSON payload received.")
            )
        else:
            reply = self.fake._reply(self.path, headers, body)
        self.fake._record(
            RecordedRequest("POST", self.path, headers, body, reply.status)
        )
        if self.fake.delay_seconds and self.fake._stopping.wait(
            self.fake.delay_seconds
        ):
            return
        self._send(reply)

    def do_GET(self) -> None:
        reply = _json_reply(404, google_error(404, f"{self.path} is not found."))
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read requests from FakeGoogle.requests, not from stderr.
        pass
