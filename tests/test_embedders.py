"""Tests of service.embedders: the local MiniLM model and the Google client.

The Google tests run against tests/fake_google.py on 127.0.0.1; nothing here
reaches the network.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from service.embedders import (
    DEFAULT_GOOGLE_MODEL,
    LOCAL_DIMENSION,
    Embedder,
    EmbedderError,
    GoogleEmbedder,
    LocalEmbedder,
    create_embedder,
)
from tests.fake_google import FakeGoogle

API_KEY = "AIza-test-key-0123456789"
#: The smallest outputDimensionality gemini-embedding-001 accepts.
DIM = 128


def dot(left: list[float], right: list[float]) -> float:
    return sum(a * b for a, b in zip(left, right, strict=True))


def norm(vector: list[float]) -> float:
    return math.sqrt(dot(vector, vector))


def unit(vector: list[float]) -> list[float]:
    length = norm(vector)
    return [value / length for value in vector]


# ---------------------------------------------------------------------------
# Local embedder


@pytest.fixture(scope="module")
def local() -> Iterator[LocalEmbedder]:
    """One loaded model for the module, because loading takes about 0.5 s."""
    embedder = LocalEmbedder()
    yield embedder
    asyncio.run(embedder.aclose())


class TestLocalEmbedder:
    async def test_vectors_are_384_unit(self, local: LocalEmbedder) -> None:
        """Every vector has 384 values and length 1."""
        vectors = await local.embed(["hello world", "", "Ünïcödé ✓ 你好"])

        assert len(vectors) == 3
        for vector in vectors:
            assert len(vector) == LOCAL_DIMENSION
            assert norm(vector) == pytest.approx(1.0, abs=1e-5)

    def test_identity(self, local: LocalEmbedder) -> None:
        """The embedder reports its label, model id and size."""
        assert isinstance(local, Embedder)
        assert local.name == "local"
        assert local.model == "all-MiniLM-L6-v2-onnx-int8"
        assert local.dimension == 384
        assert local.intra_op_threads == 1

    @pytest.mark.parametrize(
        ("query", "paraphrase", "unrelated"),
        [
            (
                "the customer cannot sign in to their account",
                "User reports a login failure, password rejected",
                ["Shipment arrives on Tuesday", "The weather is lovely today"],
            ),
            (
                "How do I get my money back for a broken item?",
                "I want a refund because the product arrived damaged",
                ["The meeting moved to 3 pm", "Our cat sleeps all afternoon"],
            ),
            (
                "the server is down again",
                "the website is not responding, outage",
                ["Happy birthday to my sister", "Add two cups of flour"],
            ),
        ],
    )
    async def test_paraphrase_ranks_first(
        self, local: LocalEmbedder, query: str, paraphrase: str, unrelated: list[str]
    ) -> None:
        """A paraphrase is closer to the query than unrelated texts, by a margin."""
        query_vector, paraphrase_vector, *others = await local.embed(
            [query, paraphrase, *unrelated]
        )

        close = dot(query_vector, paraphrase_vector)
        for other in others:
            assert close > dot(query_vector, other) + 0.2

    async def test_order_preserved(self, local: LocalEmbedder) -> None:
        """Batched and sorted-by-length embedding returns vectors in input order."""
        texts = [f"message {i} " + "about shipping " * (i % 7) for i in range(40)]
        assert len(texts) > local.batch_size

        together = await local.embed(texts)
        for text, vector in zip(texts, together, strict=True):
            (alone,) = await local.embed([text])
            assert dot(vector, alone) == pytest.approx(1.0, abs=1e-4)

    async def test_empty_input(self) -> None:
        """No texts give no vectors, without loading the model."""
        embedder = LocalEmbedder()

        assert await embedder.embed([]) == []
        assert embedder._model is None
        await embedder.aclose()

    async def test_truncates_at_256_tokens(self, local: LocalEmbedder) -> None:
        """Words after the 256th token do not change the vector."""
        long_text = "alpha " * 300
        vectors = await local.embed([long_text, long_text + "zebra giraffe volcano"])

        assert dot(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-6)

    async def test_rejects_single_string(self, local: LocalEmbedder) -> None:
        """A str in place of a list is an error, not 11 one-letter texts."""
        with pytest.raises(TypeError, match="not one str"):
            await local.embed("hello world")

    async def test_rejects_non_string_item(self, local: LocalEmbedder) -> None:
        with pytest.raises(TypeError, match=r"texts\[1\] must be a str, not int"):
            await local.embed(["fine", 3])  # type: ignore[list-item]

    async def test_event_loop_keeps_running(self, local: LocalEmbedder) -> None:
        """Inference runs off the event loop, so a 10 ms ticker keeps ticking."""
        # Enough work that a blocked loop would show a gap of over 0.2 s: 24
        # texts took 0.17 s on the 2-vCPU reference host when it was idle.
        texts = [f"message {i}: " + "the parcel was late again " * 8 for i in range(96)]
        ticks = 0
        longest_gap = 0.0

        async def ticker() -> None:
            nonlocal ticks, longest_gap
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                longest_gap = max(longest_gap, now - last)
                last = now
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        await local.embed(texts)
        elapsed = time.perf_counter() - started
        task.cancel()

        assert elapsed > 0.2, "too fast to show anything; embed more texts"
        assert ticks >= 5
        assert longest_gap < elapsed / 2

    async def test_closed_embedder_raises(self) -> None:
        embedder = LocalEmbedder()
        await embedder.aclose()

        with pytest.raises(EmbedderError, match="closed"):
            await embedder.embed(["hello"])

    async def test_close_during_call(self) -> None:
        """Closing between batches fails the call with EmbedderError, not a hang."""
        embedder = LocalEmbedder(batch_size=1)
        call = asyncio.create_task(embedder.embed(["one", "two", "three", "four"]))
        await asyncio.sleep(0)
        await embedder.aclose()

        with pytest.raises(EmbedderError, match="closed during the call"):
            await call


# ---------------------------------------------------------------------------
# Google embedder against the fake server


@pytest.fixture
def fake() -> Iterator[FakeGoogle]:
    with FakeGoogle(api_key=API_KEY) as server:
        yield server


@pytest.fixture
async def google(fake: FakeGoogle) -> AsyncIterator[GoogleEmbedder]:
    embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url, dimension=DIM)
    yield embedder
    await embedder.aclose()


def assert_key_hidden(error: EmbedderError) -> None:
    assert API_KEY not in str(error)
    assert API_KEY not in repr(error)
    assert all(API_KEY not in str(arg) for arg in error.args)


class TestGoogleEmbedder:
    async def test_request_shape(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """One POST with the key header and one request object per text."""
        texts = ["first", "second", "third"]
        await google.embed(texts)

        (request,) = fake.requests
        assert request.method == "POST"
        assert request.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
        assert request.headers["x-goog-api-key"] == API_KEY
        assert request.headers["content-type"] == "application/json"
        assert API_KEY not in request.path
        assert request.body == {
            "requests": [
                {
                    "model": "models/gemini-embedding-001",
                    "content": {"parts": [{"text": text}]},
                    "taskType": "RETRIEVAL_DOCUMENT",
                    "outputDimensionality": DIM,
                }
                for text in texts
            ]
        }
        assert request.status == 200

    async def test_default_dimension(self, fake: FakeGoogle) -> None:
        """Without google_dimension, no outputDimensionality is sent and 3072 arrive."""
        embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url)
        try:
            (vector,) = await embedder.embed(["hello"])
        finally:
            await embedder.aclose()

        assert embedder.model == DEFAULT_GOOGLE_MODEL
        assert embedder.dimension == 3072
        assert len(vector) == 3072
        assert "outputDimensionality" not in fake.requests[0].body["requests"][0]

    async def test_vectors_normalised(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """Vectors have length 1 and keep the direction Google sent."""
        texts = ["alpha", "beta", "gamma"]
        vectors = await google.embed(texts)

        for text, vector in zip(texts, vectors, strict=True):
            raw = fake.vector_for(text, DIM)
            assert norm(raw) != pytest.approx(1.0, abs=1e-3)
            assert norm(vector) == pytest.approx(1.0, abs=1e-9)
            assert vector == pytest.approx(unit(raw), abs=1e-9)

    async def test_splits_batches(self, fake: FakeGoogle) -> None:
        """Ten texts at batch_size 4 are sent as 4, 4 and 2, and come back in order."""
        embedder = GoogleEmbedder(
            api_key=API_KEY, base_url=fake.url, dimension=DIM, batch_size=4
        )
        texts = [f"text {i}" for i in range(10)]
        try:
            vectors = await embedder.embed(texts)
        finally:
            await embedder.aclose()

        assert [len(request.texts) for request in fake.requests] == [4, 4, 2]
        assert fake.embedded_texts == texts
        for text, vector in zip(texts, vectors, strict=True):
            assert vector == pytest.approx(unit(fake.vector_for(text, DIM)), abs=1e-9)

    async def test_full_batch_of_100(self, fake: FakeGoogle) -> None:
        """The default batch size fills the API limit and no more."""
        embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url, dimension=DIM)
        try:
            vectors = await embedder.embed([f"t{i}" for i in range(201)])
        finally:
            await embedder.aclose()

        assert len(vectors) == 201
        assert [len(request.texts) for request in fake.requests] == [100, 100, 1]

    async def test_empty_input(self, fake: FakeGoogle, google: GoogleEmbedder) -> None:
        assert await google.embed([]) == []
        assert fake.requests == []

    @pytest.mark.parametrize(
        ("status", "google_status", "retryable"),
        [
            (400, "INVALID_ARGUMENT", False),
            (403, "PERMISSION_DENIED", False),
            (404, "NOT_FOUND", False),
            (429, "RESOURCE_EXHAUSTED", True),
            (500, "INTERNAL", True),
            (503, "UNAVAILABLE", True),
            (504, "DEADLINE_EXCEEDED", True),
        ],
    )
    async def test_http_errors(
        self,
        fake: FakeGoogle,
        google: GoogleEmbedder,
        status: int,
        google_status: str,
        retryable: bool,
    ) -> None:
        """An HTTP error names the status and Google's message, and never the key."""
        fake.fail_next(1, status)

        with pytest.raises(EmbedderError) as caught:
            await google.embed(["hello"])

        error = caught.value
        assert error.status_code == status
        assert error.retryable is retryable
        assert f"HTTP {status} {google_status}" in str(error)
        assert_key_hidden(error)

    async def test_429_retry_delay(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """The delay in Google's RetryInfo detail becomes retry_after_seconds."""
        fake.fail_next(1, 429)

        with pytest.raises(EmbedderError) as caught:
            await google.embed(["hello"])

        assert caught.value.retry_after_seconds == 1.0
        assert "Resource has been exhausted" in str(caught.value)

    async def test_wrong_key(self, fake: FakeGoogle) -> None:
        """A wrong key is Google's 400 API_KEY_INVALID: not retryable, key hidden."""
        wrong_key = "AIza-wrong-key-9876543210"
        embedder = GoogleEmbedder(api_key=wrong_key, base_url=fake.url, dimension=DIM)
        try:
            with pytest.raises(EmbedderError) as caught:
                await embedder.embed(["hello"])
        finally:
            await embedder.aclose()

        error = caught.value
        assert error.status_code == 400
        assert error.retryable is False
        assert "API key not valid" in str(error)
        assert "GOOGLE_API_KEY" in str(error)
        assert wrong_key not in str(error)

    async def test_key_redacted_if_echoed(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """A server message that quotes the key is redacted before it is raised."""
        body = {"error": {"code": 403, "message": f"key {API_KEY} is suspended"}}
        fake.respond_next(body, status=403)

        with pytest.raises(EmbedderError) as caught:
            await google.embed(["hello"])

        assert_key_hidden(caught.value)
        assert "[redacted]" in str(caught.value)

    async def test_key_not_logged(
        self,
        fake: FakeGoogle,
        google: GoogleEmbedder,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)

        await google.embed(["first"])
        fake.fail_next(1, 503)
        with pytest.raises(EmbedderError):
            await google.embed(["second"])

        assert caplog.records, "expected httpx request logs to check"
        assert API_KEY not in caplog.text

    async def test_recovers_after_outage(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """fail_next(2) fails exactly two calls, and the third succeeds."""
        fake.fail_next(2, 503)

        for _ in range(2):
            with pytest.raises(EmbedderError):
                await google.embed(["hello"])
        vectors = await google.embed(["hello"])

        assert len(vectors) == 1
        assert [request.status for request in fake.requests] == [503, 503, 200]

    async def test_failure_in_later_batch(self, fake: FakeGoogle) -> None:
        """A failed second batch fails the whole call."""
        embedder = GoogleEmbedder(
            api_key=API_KEY, base_url=fake.url, dimension=DIM, batch_size=2
        )
        ok = {"embeddings": [{"values": [1.0] * DIM}, {"values": [2.0] * DIM}]}
        fake.respond_next(ok)
        fake.fail_next(1, 503)
        try:
            with pytest.raises(EmbedderError) as caught:
                await embedder.embed(["a", "b", "c", "d"])
        finally:
            await embedder.aclose()

        assert caught.value.retryable is True
        assert len(fake.requests) == 2

    @pytest.mark.parametrize(
        ("body", "problem"),
        [
            ({}, "KeyError"),
            ({"embeddings": None}, "TypeError"),
            ({"embeddings": [{"values": [1.0] * DIM}]}, r"expected 2 embeddings"),
            ({"embeddings": [{"vals": [1.0] * DIM}] * 2}, "KeyError"),
            ({"embeddings": [{"values": [1.0] * 4}] * 2}, r"shape \(2, 4\)"),
            (
                {"embeddings": [{"values": [1.0] * DIM}, {"values": [1.0]}]},
                "ValueError",
            ),
            ({"embeddings": [{"values": ["x"] * DIM}] * 2}, "ValueError"),
            ({"embeddings": [{"values": [0.0] * DIM}] * 2}, "all zeros"),
            (b"<html>not json</html>", "JSONDecodeError"),
        ],
    )
    async def test_malformed_response(
        self, fake: FakeGoogle, body: object, problem: str
    ) -> None:
        """A 200 whose body does not fit the request is an EmbedderError."""
        embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url, dimension=DIM)
        fake.respond_next(body)
        try:
            with pytest.raises(EmbedderError, match=problem) as caught:
                await embedder.embed(["one", "two"])
        finally:
            await embedder.aclose()

        assert caught.value.retryable is False
        assert caught.value.status_code is None
        assert "malformed" in str(caught.value)

    async def test_non_finite_values(self, fake: FakeGoogle) -> None:
        embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url, dimension=DIM)
        values = ", ".join(["NaN"] + ["1.0"] * (DIM - 1))
        fake.respond_next(f'{{"embeddings": [{{"values": [{values}]}}]}}'.encode())
        try:
            with pytest.raises(EmbedderError, match="NaN or infinite"):
                await embedder.embed(["one"])
        finally:
            await embedder.aclose()

    async def test_non_json_error_body(
        self, fake: FakeGoogle, google: GoogleEmbedder
    ) -> None:
        """An error page from a proxy is quoted, shortened, in the message."""
        fake.respond_next(b"<html>Bad Gateway</html>" + b"x" * 500, status=502)

        with pytest.raises(EmbedderError) as caught:
            await google.embed(["hello"])

        assert caught.value.retryable is True
        assert "non-JSON body '<html>Bad Gateway</html>" in str(caught.value)
        assert len(str(caught.value)) < 400

    async def test_timeout_is_retryable(self, fake: FakeGoogle) -> None:
        fake.delay_seconds = 2.0
        embedder = GoogleEmbedder(
            api_key=API_KEY, base_url=fake.url, dimension=DIM, timeout_seconds=0.2
        )
        started = time.perf_counter()
        try:
            with pytest.raises(
                EmbedderError, match=r"timed out after 0\.2 s"
            ) as caught:
                await embedder.embed(["hello"])
        finally:
            await embedder.aclose()

        assert time.perf_counter() - started < 1.5
        assert caught.value.retryable is True

    async def test_connection_refused_is_retryable(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # Nothing listens on the port once the probe socket is closed.
        embedder = GoogleEmbedder(
            api_key=API_KEY, base_url=f"http://127.0.0.1:{port}", dimension=DIM
        )
        try:
            with pytest.raises(EmbedderError, match="ConnectError") as caught:
                await embedder.embed(["hello"])
        finally:
            await embedder.aclose()

        assert caught.value.retryable is True
        assert caught.value.status_code is None
        assert_key_hidden(caught.value)

    async def test_closed_embedder_raises(self, fake: FakeGoogle) -> None:
        embedder = GoogleEmbedder(api_key=API_KEY, base_url=fake.url, dimension=DIM)
        await embedder.aclose()

        with pytest.raises(EmbedderError, match="closed"):
            await embedder.embed(["hello"])
        assert fake.requests == []

    async def test_unknown_model_is_404(self, fake: FakeGoogle) -> None:
        embedder = GoogleEmbedder(
            api_key=API_KEY, base_url=fake.url, model="no-such-model", dimension=DIM
        )
        try:
            with pytest.raises(EmbedderError) as caught:
                await embedder.embed(["hello"])
        finally:
            await embedder.aclose()

        assert caught.value.status_code == 404
        assert caught.value.retryable is False
        assert "google_model" in str(caught.value)


class TestFakeGoogle:
    """The fake itself rejects what the real API rejects."""

    def post(self, fake: FakeGoogle, body: object, key: str | None = API_KEY) -> int:
        import httpx

        headers = {} if key is None else {"x-goog-api-key": key}
        url = f"{fake.url}/v1beta/models/gemini-embedding-001:batchEmbedContents"
        return httpx.post(url, json=body, headers=headers).status_code

    def test_rejects_bad_requests(self, fake: FakeGoogle) -> None:
        good = {
            "model": "models/gemini-embedding-001",
            "content": {"parts": [{"text": "hi"}]},
        }
        assert self.post(fake, {"requests": [good]}) == 200
        assert self.post(fake, {"requests": [good]}, key=None) == 403
        assert self.post(fake, {"requests": [good]}, key="wrong") == 400
        assert self.post(fake, {"requests": [good] * 101}) == 400
        assert self.post(fake, {"requests": []}) == 400
        assert self.post(fake, {"requests": [{**good, "model": "models/x"}]}) == 400
        assert self.post(fake, {"requests": [{**good, "taskTyp": "X"}]}) == 400
        assert self.post(fake, {"requests": [{**good, "content": {}}]}) == 400
        assert self.post(fake, {"requests": [{**good, "taskType": "NOPE"}]}) == 400
        bad_size = {**good, "outputDimensionality": "8"}
        assert self.post(fake, {"requests": [bad_size]}) == 400

        body = fake.requests[-1].body
        assert body == {"requests": [bad_size]}


# ---------------------------------------------------------------------------
# create_embedder


class TestCreateEmbedder:
    async def test_local(self) -> None:
        embedder = create_embedder("local", google_api_key=None)
        assert isinstance(embedder, LocalEmbedder)
        await embedder.aclose()

    async def test_google(self) -> None:
        embedder = create_embedder(
            "google",
            google_api_key=API_KEY,
            google_dimension=768,
            batch_size=50,
            timeout_seconds=3.0,
        )
        assert isinstance(embedder, GoogleEmbedder)
        assert embedder.name == "google"
        assert embedder.model == "gemini-embedding-001"
        assert embedder.dimension == 768
        assert embedder.batch_size == 50
        await embedder.aclose()

    @pytest.mark.parametrize("key", [None, ""])
    def test_google_without_key(self, key: str | None) -> None:
        with pytest.raises(ValueError, match="GOOGLE_API_KEY"):
            create_embedder("google", google_api_key=key)

    def test_unknown_kind(self) -> None:
        with pytest.raises(ValueError, match="'local' or 'google', not 'openai'"):
            create_embedder("openai", google_api_key=API_KEY)

    @pytest.mark.parametrize("batch_size", [0, 101])
    def test_google_batch_size_limits(self, batch_size: int) -> None:
        with pytest.raises(ValueError, match="between 1 and 100"):
            create_embedder("google", google_api_key=API_KEY, batch_size=batch_size)

    def test_unknown_model_needs_dimension(self) -> None:
        with pytest.raises(ValueError, match="set google_dimension"):
            create_embedder("google", google_api_key=API_KEY, google_model="other")

    @pytest.mark.parametrize("dimension", [0, 127, 3073])
    def test_dimension_out_of_range(self, dimension: int) -> None:
        with pytest.raises(ValueError, match="google_dimension must be"):
            create_embedder(
                "google", google_api_key=API_KEY, google_dimension=dimension
            )

    async def test_model_prefix_stripped(self) -> None:
        embedder = create_embedder(
            "google", google_api_key=API_KEY, google_model="models/gemini-embedding-001"
        )
        assert embedder.model == "gemini-embedding-001"
        await embedder.aclose()
