"""Qdrant access: one collection of message vectors, filtered by task.

The same synchronous ``QdrantClient`` serves both modes, always called from a
thread pool: Qdrant's local mode (the embedded default) does its work in the
calling thread even through ``AsyncQdrantClient``, so a call on the event loop
would stall every socket. Local mode also allows one client per path, so a
single worker thread owns it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qdrant_client import QdrantClient
from qdrant_client.http import models

__all__ = ["SearchHit", "VectorIndex", "point_id"]

T = TypeVar("T")
# Point ids must be UUIDs or integers; deriving them from the message id makes
# an upsert of the same message idempotent.
_POINT_NAMESPACE = uuid.UUID("6f0c3a52-4a55-4a1c-9d1e-5c8f4b7e2a10")


def point_id(message_id: str) -> str:
    """Return the Qdrant point id of a message."""
    return str(uuid.uuid5(_POINT_NAMESPACE, message_id))


@dataclass(frozen=True, slots=True)
class SearchHit:
    message_id: str
    score: float


class VectorIndex:
    """The message-vector collection in Qdrant (local path or server URL)."""

    def __init__(self, *, url: str, api_key: str, path: Path, collection: str) -> None:
        self.collection = collection
        self.local = not url
        self.location = str(path) if self.local else url
        # One thread for local mode, which allows one client per path and
        # locks around its storage anyway; a few for a server.
        self._executor = ThreadPoolExecutor(
            max_workers=1 if self.local else 4, thread_name_prefix="qdrant"
        )
        self._url = url
        self._api_key = api_key
        self._path = path
        self._client: QdrantClient | None = None
        self._dimension: int | None = None

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._dimension is not None

    async def open(self, dimension: int) -> None:
        """Connect (or open the local path) and make sure the collection exists.

        Raises whatever Qdrant raises: a server that is down, or a local path
        that another process holds. Callers retry later.
        """
        await self._call(self._open, dimension)

    def _open(self, dimension: int) -> None:
        if self._client is None:
            if self.local:
                self._path.mkdir(parents=True, exist_ok=True)
                self._client = QdrantClient(path=str(self._path))
            else:
                self._client = QdrantClient(
                    url=self._url, api_key=self._api_key or None, timeout=10
                )
        self._ensure_collection(dimension)
        self._dimension = dimension

    @property
    def client(self) -> QdrantClient:
        if self._client is None:
            raise RuntimeError("Qdrant is not open yet: call open() first")
        return self._client

    async def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: function(*args, **kwargs)
        )

    def _ensure_collection(self, dimension: int) -> None:
        client = self.client
        if client.collection_exists(self.collection):
            info = client.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = getattr(vectors, "size", None)
            if size is not None and size != dimension:
                raise RuntimeError(
                    f"Qdrant collection {self.collection!r} contains {size}-dimensional "
                    f"vectors but the embedder makes {dimension}: set "
                    "CHAT_QDRANT_COLLECTION to a new name or delete the collection"
                )
            return
        client.create_collection(
            self.collection,
            vectors_config=models.VectorParams(
                size=dimension, distance=models.Distance.COSINE
            ),
        )
        if not self.local:
            client.create_payload_index(
                self.collection, "task_id", models.PayloadSchemaType.KEYWORD
            )

    async def upsert(
        self, vectors: Sequence[Sequence[float]], payloads: Sequence[dict[str, Any]]
    ) -> None:
        """Store one vector per message; payloads carry ``message_id`` and ``task_id``."""
        points = [
            models.PointStruct(id=point_id(p["message_id"]), vector=list(v), payload=p)
            for v, p in zip(vectors, payloads, strict=True)
        ]
        await self._call(self.client.upsert, self.collection, points=points, wait=True)

    async def search(
        self, vector: Sequence[float], *, task_id: str, limit: int
    ) -> list[SearchHit]:
        """Return the nearest messages of one task, best first."""
        task_filter = models.Filter(
            must=[
                models.FieldCondition(
                    key="task_id", match=models.MatchValue(value=task_id)
                )
            ]
        )
        response = await self._call(
            self.client.query_points,
            self.collection,
            query=list(vector),
            query_filter=task_filter,
            limit=limit,
            with_payload=True,
        )
        return [
            SearchHit(
                message_id=str(point.payload["message_id"]), score=float(point.score)
            )
            for point in response.points
            if point.payload
        ]

    async def ping(self) -> None:
        await self._call(self.client.get_collections)

    async def close(self) -> None:
        if self._client is not None:
            await self._call(self._client.close)
            self._client = None
        self._executor.shutdown(wait=False)
