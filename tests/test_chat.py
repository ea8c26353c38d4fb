"""End-to-end chat through a real gateway, real SecantusDB and real clients."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import socketio

from tests.conftest import RunningGateway, eventually, fail_point, http


async def test_operator_and_manager_chat(
    gateway: RunningGateway, connect: Any, mongo: Any
) -> None:
    """Each participant receives the other's message, and each is stored once."""
    operator = await connect(gateway, gateway.token("t1", "olga", "operator"))
    manager = await connect(gateway, gateway.token("t1", "max", "manager"))

    ack_a = await operator.send("Customer cannot sign in since 9am", "a-1")
    ack_b = await manager.send("Looking into it now", "b-1")

    assert ack_a["ok"] is True
    assert ack_b["ok"] is True
    for client in (operator, manager):
        received = await client.wait_for(2)
        assert [m["client_msg_id"] for m in received] == ["a-1", "b-1"]
    first = manager.received[0]
    assert first["id"] == ack_a["id"]
    assert first["sender"] == "olga"
    assert first["role"] == "operator"
    assert first["task_id"] == "t1"
    assert first["created_at"] == ack_a["created_at"]

    stored = list(mongo[gateway.database].messages.find({"task_id": "t1"}))
    assert sorted(d["client_msg_id"] for d in stored) == ["a-1", "b-1"]


async def test_retry_returns_first_ack(
    gateway: RunningGateway, connect: Any, mongo: Any
) -> None:
    """A retried client_msg_id is acked with the first id and not fanned out twice."""
    operator = await connect(gateway, gateway.token("t1", "olga"))
    manager = await connect(gateway, gateway.token("t1", "max", "manager"))

    first = await operator.send("hello", "same-id")
    again = await operator.send("hello", "same-id")
    await manager.wait_for(1)
    await asyncio.sleep(0.3)

    assert again["ok"] is True
    assert again["id"] == first["id"]
    assert again["duplicate"] is True
    assert len(manager.received) == 1
    assert (
        mongo[gateway.database].messages.count_documents({"client_msg_id": "same-id"})
        == 1
    )


async def test_concurrent_duplicates_stored_once(
    gateway: RunningGateway, connect: Any, mongo: Any
) -> None:
    """The same id sent many times at once lands in one batch and is stored once."""
    operator = await connect(gateway, gateway.token("t1", "olga"))

    acks = await asyncio.gather(
        *(operator.send("burst", "dup-burst") for _ in range(5))
    )

    assert {ack["id"] for ack in acks} == {acks[0]["id"]}
    assert sum(1 for ack in acks if ack.get("duplicate")) == 4
    assert (
        mongo[gateway.database].messages.count_documents({"client_msg_id": "dup-burst"})
        == 1
    )


async def test_id_reused_by_other_sender_rejected(
    gateway: RunningGateway, connect: Any, mongo: Any
) -> None:
    """Another sender's id is an error, never a duplicate ack that drops the text."""
    operator = await connect(gateway, gateway.token("t1", "olga"))
    manager = await connect(gateway, gateway.token("t1", "mia", role="manager"))

    first = await operator.send("from the operator", "shared-id")
    second = await manager.send("from the manager", "shared-id")
    again = await manager.send("from the manager", "own-id")

    assert first["ok"] is True
    assert second["ok"] is False
    assert second["error"]["code"] == "invalid_payload"
    assert "already used by another sender" in second["error"]["message"]
    assert again["ok"] is True
    stored = mongo[gateway.database].messages.find_one({"client_msg_id": "shared-id"})
    assert stored["text"] == "from the operator"


async def test_rooms_isolate_tasks(gateway: RunningGateway, connect: Any) -> None:
    """A socket of one task never receives another task's messages."""
    first = await connect(gateway, gateway.token("t1", "olga"))
    other = await connect(gateway, gateway.token("t2", "zed"))

    await first.send("only for t1", "iso-1")
    await first.wait_for(1)
    await asyncio.sleep(0.3)

    assert other.received == []


async def test_other_task_token_refused(gateway: RunningGateway) -> None:
    """A token for one task cannot read, write or search another task."""
    token = gateway.token("t2", "zed")
    async with http(gateway, token) as client:
        post = await client.post(
            "/api/tasks/t1/messages", json={"client_msg_id": "x", "text": "intrusion"}
        )
        read = await client.get("/api/tasks/t1/messages")
        search = await client.get("/api/search", params={"q": "x", "task": "t1"})

    for response in (post, read, search):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        (None, "missing access token"),
        ({"token": "not-a-jwt"}, "invalid access token"),
        ({"token": 42}, "missing access token"),
    ],
)
async def test_connect_refused_with_reason(
    gateway: RunningGateway, auth: Any, reason: str
) -> None:
    """A bad token is refused at connect time, and the reason reaches the client."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)

    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(gateway.url, auth=auth, transports=["websocket"])

    assert errors
    assert reason in errors[0]["message"]
    assert errors[0]["data"]["code"] == "unauthorized"


async def test_expired_token_refused(gateway: RunningGateway) -> None:
    """An expired token (past the leeway) is refused as expired."""
    token = gateway.token("t1", "olga", ttl=1)
    await asyncio.sleep(1.2)
    gateway.gateway.settings.token_leeway_seconds = 0
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)

    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(
            gateway.url, auth={"token": token}, transports=["websocket"]
        )

    assert "expired" in errors[0]["message"]


INVALID_PAYLOADS = [
    ("not an object", "invalid_payload"),
    (["a", "list"], "invalid_payload"),
    (None, "invalid_payload"),
    ({"text": "no id"}, "invalid_payload"),
    ({"client_msg_id": "", "text": "empty id"}, "invalid_payload"),
    ({"client_msg_id": "x" * 65, "text": "long id"}, "invalid_payload"),
    ({"client_msg_id": 7, "text": "number id"}, "invalid_payload"),
    ({"client_msg_id": "ok"}, "invalid_payload"),
    ({"client_msg_id": "ok", "text": 12}, "invalid_payload"),
    ({"client_msg_id": "ok", "text": ""}, "invalid_payload"),
    ({"client_msg_id": "ok", "text": "   "}, "invalid_payload"),
    ({"client_msg_id": "ok", "text": "x" * 4001}, "text_too_long"),
    ({"client_msg_id": "ok", "text": "hi", "blob": "z" * 200_000}, "invalid_payload"),
    ({"client_msg_id": "ok", "text": "hi", "traceparent": 5}, "invalid_payload"),
]


@pytest.mark.parametrize(("payload", "code"), INVALID_PAYLOADS)
async def test_invalid_payload_gets_code(
    gateway: RunningGateway, connect: Any, payload: Any, code: str
) -> None:
    """Each kind of bad payload gets an error ack with its stable code."""
    client = await connect(gateway, gateway.token("t1", "olga"))

    ack = await client.sio.call("send_message", payload, timeout=10)

    assert ack["ok"] is False
    assert ack["error"]["code"] == code
    assert ack["error"]["message"]
    # The socket survives and still works.
    assert (await client.send("still here", "after-bad"))["ok"] is True


async def test_text_at_limit_accepted(gateway: RunningGateway, connect: Any) -> None:
    """Exactly 4,000 characters, including non-ASCII ones, is accepted."""
    client = await connect(gateway, gateway.token("t1", "olga"))

    ack = await client.send("é" * 3999 + "🙂", "limit")

    assert ack["ok"] is True


async def test_rate_limit_per_socket(gateway_factory: Any, connect: Any) -> None:
    """A burst above the token bucket gets rate_limited; the rest is stored."""
    gateway = gateway_factory(rate_limit_burst=5, rate_limit_per_second=1)
    client = await connect(gateway, gateway.token("t1", "olga"))

    acks = [await client.send(f"m{i}", f"rl-{i}") for i in range(8)]

    codes = [ack.get("error", {}).get("code") for ack in acks]
    assert codes[:5] == [None] * 5
    assert set(codes[5:]) == {"rate_limited"}


async def test_overloaded_when_queue_full(
    gateway_factory: Any, connect: Any, secantus: Any
) -> None:
    """With the writer's queue full, new messages are refused at once."""
    gateway = gateway_factory(writer_queue_max=3, batch_max=1, rate_limit_burst=100)
    client = await connect(gateway, gateway.token("t1", "olga"))
    fail_point(
        secantus.uri,
        {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 800},
        times=3,
    )
    try:
        acks = await asyncio.gather(
            *(client.send(f"m{i}", f"ov-{i}") for i in range(12))
        )
    finally:
        fail_point(secantus.uri, None)

    codes = [ack.get("error", {}).get("code") for ack in acks]
    assert "overloaded" in codes
    assert None in codes


async def test_history_pages_newest_first(
    gateway: RunningGateway, connect: Any
) -> None:
    """History comes newest first, in pages linked by next_before."""
    client = await connect(gateway, gateway.token("t1", "olga"))
    for number in range(5):
        await client.send(f"message {number}", f"h-{number}")

    async with http(gateway, gateway.token("t1", "olga")) as api:
        first = (await api.get("/api/tasks/t1/messages", params={"limit": 3})).json()
        second = (
            await api.get(
                "/api/tasks/t1/messages",
                params={"limit": 3, "before": first["next_before"]},
            )
        ).json()
        too_big = await api.get("/api/tasks/t1/messages", params={"limit": 201})
        bad_cursor = await api.get("/api/tasks/t1/messages", params={"before": "zzz"})

    assert [m["text"] for m in first["messages"]] == [
        "message 4",
        "message 3",
        "message 2",
    ]
    assert [m["text"] for m in second["messages"]] == ["message 1", "message 0"]
    assert second["next_before"] is None
    assert too_big.status_code == 400
    assert bad_cursor.status_code == 400
    assert bad_cursor.json()["error"]["code"] == "invalid_payload"


async def test_rest_send_uses_pipeline(gateway: RunningGateway, connect: Any) -> None:
    """POST /api/tasks/{task}/messages stores, fans out and acks like the event."""
    listener = await connect(gateway, gateway.token("t1", "max", "manager"))
    token = gateway.token("t1", "olga")

    cut_short = b'{"client_msg_id": "r-4", "text": "x"'  # no closing brace
    async with http(gateway, token) as api:
        created = await api.post(
            "/api/tasks/t1/messages", json={"client_msg_id": "r-1", "text": "from REST"}
        )
        retried = await api.post(
            "/api/tasks/t1/messages", json={"client_msg_id": "r-1", "text": "from REST"}
        )
        too_long = await api.post(
            "/api/tasks/t1/messages", json={"client_msg_id": "r-2", "text": "y" * 4001}
        )
        no_auth = await api.post(
            "/api/tasks/t1/messages",
            json={"client_msg_id": "r-3", "text": "x"},
            headers={"Authorization": ""},
        )
        not_json = await api.post(
            "/api/tasks/t1/messages",
            content=cut_short,
            headers={"Content-Type": "application/json"},
        )

    assert created.status_code == 201
    assert retried.status_code == 200
    assert retried.json()["id"] == created.json()["id"]
    assert too_long.status_code == 413
    assert too_long.json()["error"]["code"] == "text_too_long"
    assert no_auth.status_code == 401
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_payload"
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert f"at character {len(cut_short)}" in not_json.json()["error"]["message"]
    received = await listener.wait_for(1)
    assert received[0]["text"] == "from REST"


async def test_search_finds_paraphrase(gateway: RunningGateway, connect: Any) -> None:
    """Semantic search ranks a paraphrase of the query first (local MiniLM embedder)."""
    client = await connect(gateway, gateway.token("t1", "olga"))
    await client.send("The customer cannot log in to their account", "s-1")
    await client.send("The shipment will arrive on Tuesday", "s-2")
    await client.send("Please update the invoice total", "s-3")
    token = gateway.token("t1", "olga")

    async def indexed() -> bool:
        return gateway.gateway.metrics.indexed._value.get() >= 3

    await eventually(indexed)
    async with http(gateway, token) as api:
        response = await api.get(
            "/api/search", params={"q": "user has a sign-in problem"}
        )

    results = response.json()["results"]
    assert response.status_code == 200
    assert results[0]["message"]["client_msg_id"] == "s-1"
    assert results[0]["score"] > results[1]["score"]


async def test_blank_search_rejected(gateway: RunningGateway) -> None:
    async with http(gateway, gateway.token("t1", "olga")) as api:
        response = await api.get("/api/search", params={"q": "   "})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_payload"


async def test_health_and_readiness(gateway: RunningGateway) -> None:
    async with http(gateway) as api:
        health = await api.get("/healthz")
        ready = await api.get("/readyz")

    assert health.status_code == 200
    assert ready.status_code == 200
    assert set(ready.json()["checks"]) == {"mongodb", "qdrant", "writer"}
