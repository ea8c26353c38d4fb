"""MongoDB access: the ``messages`` collection, through PyMongo's async client.

A message document::

    {_id: ObjectId, task_id, sender, role, client_msg_id, text,
     created_at: datetime (UTC, ms), indexed_at: datetime | null}

Indexes, kept to the essential ones because each costs time on every insert:

* ``(task_id, client_msg_id)`` unique: makes client retries idempotent;
* ``(task_id, _id)``: history pages, newest first;
* ``indexed_at``: lets the reconciler find what the indexer has not done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection

__all__ = ["MessageStore", "message_view"]

logger = logging.getLogger("chat.store")
Document = dict[str, Any]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_view(doc: Document) -> dict[str, Any]:
    """Return the public shape of a stored message (the ``message`` event)."""
    created = doc["created_at"]
    if created.tzinfo is None:
        created = created.replace(
            tzinfo=datetime.now().astimezone().tzinfo
        ).astimezone()
    return {
        "id": str(doc["_id"]),
        "task_id": doc["task_id"],
        "sender": doc["sender"],
        "role": doc["role"],
        "client_msg_id": doc["client_msg_id"],
        "text": doc["text"],
        "created_at": _iso(created),
    }


class MessageStore:
    """The messages collection and the queries the gateway runs on it."""

    def __init__(
        self,
        uri: str,
        database: str,
        *,
        timeout_seconds: float,
        write_concern: WriteConcern,
    ) -> None:
        self.uri = uri
        self.timeout_seconds = timeout_seconds
        self.client: AsyncMongoClient[Document] = AsyncMongoClient(
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=int(timeout_seconds * 1000),
            connectTimeoutMS=int(timeout_seconds * 1000),
            # After a "shutting down" error (11600, 91) the driver marks the
            # server unknown. A polling monitor checks it again within 0.5 s,
            # while a streaming one waits out its 10 s heartbeat and every
            # write fails until then.
            serverMonitoringMode="poll",
            appname="chat-gateway",
        )
        self.database_name = database
        self._address: tuple[str, int | None] | None = None
        self._address_until = 0.0  # monotonic time until which _address is reused
        base = self.client[database]["messages"]
        self.messages: AsyncCollection[Document] = base.with_options(
            write_concern=write_concern
        )

    @property
    def address(self) -> tuple[str, int | None] | None:
        """Return the host and port of a server, once one is known.

        Read again at most once a second: the driver builds its set of nodes
        on every read, and the write path reads it for every batch's span.
        """
        now = time.monotonic()
        if now < self._address_until:
            return self._address
        try:
            nodes = self.client.nodes
        except Exception:
            return None
        self._address = next(iter(nodes), None)
        self._address_until = now + 1.0 if self._address is not None else 0.0
        return self._address

    async def ensure_indexes(self) -> None:
        """Create the collection's indexes (a no-op when they exist)."""
        await self.messages.create_index(
            [("task_id", ASCENDING), ("client_msg_id", ASCENDING)],
            unique=True,
            name="task_client_msg_id_unique",
        )
        await self.messages.create_index(
            [("task_id", ASCENDING), ("_id", DESCENDING)], name="task_history"
        )
        await self.messages.create_index([("indexed_at", ASCENDING)], name="unindexed")

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def insert_batch(self, docs: Sequence[Document]) -> None:
        """Insert ``docs`` unordered; raises PyMongo's errors unchanged."""
        await self.messages.insert_many(list(docs), ordered=False)

    async def find_by_client_ids(
        self, keys: Iterable[tuple[str, str]]
    ) -> list[Document]:
        """Return the stored messages with these (task_id, client_msg_id) keys."""
        clauses = [{"task_id": task, "client_msg_id": cid} for task, cid in keys]
        if not clauses:
            return []
        return await self.messages.find({"$or": clauses}).to_list()

    async def history(
        self, task_id: str, *, before: ObjectId | None, limit: int
    ) -> list[Document]:
        """Return up to ``limit`` messages of a task, newest first."""
        query: Document = {"task_id": task_id}
        if before is not None:
            query["_id"] = {"$lt": before}
        cursor = self.messages.find(query).sort("_id", DESCENDING).limit(limit)
        return await cursor.to_list()

    async def get_many(self, ids: Sequence[ObjectId]) -> dict[ObjectId, Document]:
        docs = await self.messages.find({"_id": {"$in": list(ids)}}).to_list()
        return {doc["_id"]: doc for doc in docs}

    async def unindexed(
        self, *, created_before: datetime, limit: int
    ) -> list[Document]:
        """Return the oldest messages not yet indexed."""
        query = {"indexed_at": None, "created_at": {"$lt": created_before}}
        cursor = self.messages.find(query).sort("_id", ASCENDING).limit(limit)
        return await cursor.to_list()

    async def count_unindexed(self) -> int:
        return await self.messages.count_documents({"indexed_at": None})

    async def mark_indexed(self, ids: Sequence[ObjectId], at: datetime) -> None:
        await self.messages.update_many(
            {"_id": {"$in": list(ids)}}, {"$set": {"indexed_at": at}}
        )

    async def close(self) -> None:
        await self.client.close()
