"""Security properties of a live gateway: tokens, task isolation, limits, exposure.

Every test talks to a real gateway over real sockets. The threat model and
the limits these tests hold are in docs/security.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pydantic
import pytest
import socketio
import websockets
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.auth import issue_token
from service.embedded import EmbeddedMongo, free_port
from service.settings import Settings
from tests.conftest import SECRET, RunningGateway, eventually, http
from tests.fake_google import FakeGoogle
from tests.test_faults import metric_value, raw_ack, raw_connect

OTHER_SECRET = "another-secret-that-nobody-configured-" + "y" * 10


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "olga",
        "task": "t1",
        "role": "operator",
        "iat": now,
        "exp": now + 600,
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def sign(values: dict[str, Any], key: str | None, algorithm: str = "HS256") -> str:
    """Sign claims as a client could, with any key and algorithm."""
    with warnings.catch_warnings():
        # PyJWT warns about a key shorter than the hash; forging one is the point.
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(values, key, algorithm=algorithm)


async def frames_until_quiet(
    ws: websockets.ClientConnection, quiet: float = 0.5
) -> list[str | bytes]:
    """Read frames until none arrives for ``quiet`` seconds."""
    frames: list[str | bytes] = []
    while True:
        try:
            frames.append(await asyncio.wait_for(ws.recv(), quiet))
        except TimeoutError:
            return frames


async def connect_error(url: str, auth: Any, **options: Any) -> dict[str, Any]:
    """Return the connect_error data of a connect the gateway must reject."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(url, auth=auth, transports=["websocket"], **options)
    assert errors, "the gateway rejected the connect without a connect_error"
    error: dict[str, Any] = errors[0]
    return error


# -- Tokens ---------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("chat-gateway")), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    full_env.update(env)
    return subprocess.run(
        command, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("command", ["serve", "token"])
def test_short_secret_exits_2(
    command: str, secantus: EmbeddedMongo, tmp_path: Path
) -> None:
    """A CHAT_JWT_SECRET under 32 bytes stops the CLI with exit code 2."""
    secret = "only-31-bytes-of-secret-value-x"
    assert len(secret.encode()) == 31
    args = ["--data-dir", str(tmp_path)]
    if command == "serve":
        args += ["--port", str(free_port())]
    else:
        args += ["--task", "t1", "--user", "olga", "--role", "operator"]
    env = {"CHAT_JWT_SECRET": secret, "MONGODB_URI": secantus.uri}

    result = run_cli(command, *args, env=env)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "is 31 bytes; HS256 needs at least 32" in output
    assert "CHAT_JWT_SECRET" in output
    assert secret not in output


def test_secret_of_32_bytes_accepted(tmp_path: Path) -> None:
    from service.auth import load_secret

    assert load_secret("s" * 32, tmp_path, create=False) == "s" * 32


# Built when each test runs, so that times in the claims are current.
BAD_TOKENS: dict[str, tuple[Callable[[], str], str]] = {
    "no exp": (lambda: sign(claims(exp=None), SECRET), 'missing the "exp"'),
    "other secret": (
        lambda: sign(claims(), OTHER_SECRET),
        "Signature verification failed",
    ),
    "HS512": (
        lambda: sign(claims(), SECRET, "HS512"),
        "The specified alg value is not allowed",
    ),
    "alg none": (
        lambda: sign(claims(), None, "none"),
        "The specified alg value is not allowed",
    ),
    "no task": (lambda: sign(claims(task=None), SECRET), '"task"'),
    "unknown role": (
        lambda: sign(claims(role="admin"), SECRET),
        "role one of operator, manager",
    ),
    "not yet valid": (
        lambda: sign(claims(iat=int(time.time()) + 120), SECRET),
        "not yet valid",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_token_rejected(gateway: RunningGateway, case: str) -> None:
    """Each malformed or forged token is rejected on both the socket and REST."""
    make_token, reason = BAD_TOKENS[case]
    token = make_token()

    error = await connect_error(gateway.url, {"token": token})
    async with http(gateway, token) as api:
        response = await api.get("/api/tasks/t1/messages")

    assert error["data"]["code"] == "unauthorized"
    assert reason in error["message"]
    assert token not in error["message"]
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert token not in response.text


async def test_leeway_bounds_clock_skew(gateway_factory: Any, connect: Any) -> None:
    """A token 10 s past exp passes a 30 s leeway and fails a 5 s one."""
    now = int(time.time())
    late = sign(claims(iat=now - 100, exp=now - 10), SECRET)
    early = sign(claims(iat=now + 10), SECRET)
    lenient = gateway_factory(token_leeway_seconds=30)
    strict = gateway_factory(token_leeway_seconds=5)

    accepted = await connect(lenient, late)
    accepted_early = await connect(lenient, early)
    error = await connect_error(strict.url, {"token": late})
    early_error = await connect_error(strict.url, {"token": early})

    assert accepted.sio.connected
    assert accepted_early.sio.connected
    assert error["message"] == "access token expired: mint a new one"
    assert "not yet valid" in early_error["message"]
    with pytest.raises(pydantic.ValidationError):
        Settings(token_leeway_seconds=301)


# -- Task isolation -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"task_id": "t2"}, {"role": "manager"}, {"sender": "max"}, {"room": "task:t2"}],
)
async def test_payload_cannot_choose_task(
    gateway: RunningGateway, connect: Any, mongo: Any, fields: dict[str, str]
) -> None:
    """Fields that name a task, role, sender or room are rejected, never obeyed."""
    intruder = await connect(gateway, gateway.token("t1", "olga"))
    victim = await connect(gateway, gateway.token("t2", "zed"))

    ack = await intruder.send("hijack", "hijack-1", **fields)
    await asyncio.sleep(0.2)

    assert ack["ok"] is False
    assert ack["error"]["code"] == "invalid_payload"
    assert victim.received == []
    assert mongo[gateway.database].messages.count_documents({}) == 0


async def test_forged_connect_event_ignored(gateway_factory: Any, connect: Any) -> None:
    """A "connect" event with another task's token joins no room; it is counted."""
    gateway = gateway_factory(max_sockets_per_user=1)
    forger = await raw_connect(gateway.url, gateway.token("t1", "olga"))
    other_task_token = gateway.token("t2", "olga")
    sender = await connect(gateway, gateway.token("t2", "zed"))

    await forger.send("42" + json.dumps(["connect", {}, {"token": other_task_token}]))
    await forger.send("42" + json.dumps(["connect"]))
    await asyncio.sleep(0.2)
    await sender.send("only for t2", "t2-1")
    await forger.send("421" + json.dumps(["send_message", {"text": 1}]))
    frames = await frames_until_quiet(forger)

    assert not any("only for t2" in str(frame) for frame in frames)
    assert any(str(frame).startswith("431[") for frame in frames)
    sockets = gateway.gateway.sockets
    assert sockets.room_size("task:t2") == 1
    assert dict(sockets._per_user) == {"olga": 1, "zed": 1}
    assert (
        metric_value(gateway, "chat_events_ignored_total", reason="unknown_event") == 2
    )
    await forger.close()


async def test_forged_disconnect_keeps_limits(gateway_factory: Any) -> None:
    """A "disconnect" event neither drops the socket's state nor frees its slot."""
    gateway = gateway_factory(max_sockets_per_user=1)
    token = gateway.token("t1", "olga")
    forger = await raw_connect(gateway.url, token)

    await forger.send("42" + json.dumps(["disconnect"]))
    await forger.send("42" + json.dumps(["disconnect", "x", 1, 2]))
    await asyncio.sleep(0.2)
    error = await connect_error(gateway.url, {"token": token})
    await forger.send(
        "421" + json.dumps(["send_message", {"client_msg_id": "a", "text": "b"}])
    )
    ack = await raw_ack(forger, 1)

    assert error["data"]["code"] == "rate_limited"
    assert gateway.gateway.sockets.active == 1
    assert ack[0]["ok"] is True
    assert (
        metric_value(gateway, "chat_events_ignored_total", reason="unknown_event") == 2
    )
    await forger.close()


async def test_unknown_events_ignored_and_counted(
    gateway: RunningGateway, connect: Any
) -> None:
    """Events other than send_message are dropped, counted, and change nothing."""
    client = await connect(gateway, gateway.token("t1", "olga"))
    other = await connect(gateway, gateway.token("t2", "zed"))

    await client.sio.emit("join", {"room": "task:t2"})
    await client.sio.emit("enter_room", "task:t2")
    await client.sio.emit("message", {"text": "spoofed broadcast"})
    answer = await client.sio.call("history", {"task": "t2"}, timeout=5)
    await other.send("t2 only", "t2-1")
    ack = await client.send("still works", "t1-1")
    await asyncio.sleep(0.2)

    assert answer is None
    assert ack["ok"] is True
    assert [m["text"] for m in client.received] == ["still works"]
    assert [m["text"] for m in other.received] == ["t2 only"]
    ignored = metric_value(gateway, "chat_events_ignored_total", reason="unknown_event")
    assert ignored == 4


# -- Limits ---------------------------------------------------------------------


async def test_text_limit_setting(gateway_factory: Any, connect: Any) -> None:
    gateway = gateway_factory(max_text_chars=10)
    client = await connect(gateway, gateway.token("t1", "olga"))

    at_limit = await client.send("x" * 10, "limit-10")
    over = await client.send("x" * 11, "limit-11")

    assert at_limit["ok"] is True
    assert over["error"]["code"] == "text_too_long"
    assert over["error"]["message"] == (
        "text is 11 characters; the limit is 10: split the message"
    )


@pytest.mark.parametrize("extra_bytes", [512, 2_000_000])
async def test_oversized_frame_closes_one_socket(
    gateway_factory: Any, connect: Any, extra_bytes: int
) -> None:
    """A frame above CHAT_MAX_FRAME_BYTES closes that socket; the room chats on."""
    gateway = gateway_factory(max_frame_bytes=16 * 1024)
    bystander = await connect(gateway, gateway.token("t1", "max", "manager"))
    attacker = await raw_connect(gateway.url, gateway.token("t1", "olga"))
    payload = {"client_msg_id": "big", "text": "x" * (16 * 1024 + extra_bytes)}

    await attacker.send("421" + json.dumps(["send_message", payload]))
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(attacker.recv(), 5)
    await eventually(lambda: gateway.gateway.sockets.active == 1, timeout=5)
    ack = await bystander.send("still here", "after-big")

    assert ack["ok"] is True
    assert bystander.sio.connected
    assert [m["text"] for m in await bystander.wait_for(1)] == ["still here"]


async def test_frame_under_limit_gets_error_ack(
    gateway: RunningGateway, connect: Any
) -> None:
    """A payload under the frame limit but over the text limit gets text_too_long."""
    client = await connect(gateway, gateway.token("t1", "olga"))

    ack = await client.send("x" * 200_000, "big-text")

    assert ack["error"]["code"] == "text_too_long"
    assert client.sio.connected


async def test_socket_limits_reject_with_code(
    gateway_factory: Any, connect: Any
) -> None:
    """Connects beyond CHAT_MAX_SOCKETS_PER_USER and CHAT_MAX_SOCKETS are rejected."""
    gateway = gateway_factory(max_sockets_per_user=2, max_sockets=3)
    first = await connect(gateway, gateway.token("t1", "olga"))
    await connect(gateway, gateway.token("t1", "olga"))

    per_user = await connect_error(gateway.url, {"token": gateway.token("t1", "olga")})
    await connect(gateway, gateway.token("t1", "max"))
    total = await connect_error(gateway.url, {"token": gateway.token("t1", "zed")})
    await first.close()
    await eventually(lambda: gateway.gateway.sockets.active == 2, timeout=5)
    again = await connect(gateway, gateway.token("t1", "zed"))

    assert per_user["data"]["code"] == "rate_limited"
    assert per_user["message"] == (
        "user 'olga' already has 2 sockets open: close one first"
    )
    assert total["data"]["code"] == "overloaded"
    assert "maximum of 3 sockets" in total["message"]
    assert again.sio.connected
    rejected = metric_value(
        gateway, "chat_socket_connections_total", outcome="rejected"
    )
    assert rejected == 2


async def test_rate_limit_per_user(gateway_factory: Any, connect: Any) -> None:
    """One user's sockets share a bucket: two sockets cannot double the rate."""
    gateway = gateway_factory(
        rate_limit_burst=10,
        rate_limit_per_second=10,
        user_rate_limit_burst=4,
        user_rate_limit_per_second=0.5,
    )
    first = await connect(gateway, gateway.token("t1", "olga"))
    second = await connect(gateway, gateway.token("t1", "olga"))

    acks = [
        await client.send(f"m{n}", f"user-rl-{n}-{index}")
        for n in range(3)
        for index, client in enumerate((first, second))
    ]

    codes = [ack.get("error", {}).get("code") for ack in acks]
    assert codes == [None] * 4 + ["rate_limited"] * 2
    assert acks[-1]["error"]["message"].startswith(
        "user rate limit of 0.5 messages/s (burst 4) exceeded: retry in"
    )


async def test_rate_limit_per_socket_message(
    gateway_factory: Any, connect: Any
) -> None:
    gateway = gateway_factory(rate_limit_burst=2, rate_limit_per_second=0.5)
    client = await connect(gateway, gateway.token("t1", "olga"))

    acks = [await client.send(f"m{n}", f"sock-rl-{n}") for n in range(3)]

    assert acks[2]["error"]["code"] == "rate_limited"
    assert acks[2]["error"]["message"].startswith(
        "socket rate limit of 0.5 messages/s (burst 2) exceeded"
    )


# -- Transports and origins -----------------------------------------------------


async def websocket_handshake(url: str, origin: str | None) -> int | str:
    """Open the Engine.IO websocket; return the open packet, or the HTTP status."""
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    try:
        async with websockets.connect(ws_url, origin=origin) as ws:  # type: ignore[arg-type]
            return str(await ws.recv())
    except websockets.InvalidStatus as exc:
        return int(exc.response.status_code)


async def test_foreign_origin_rejected(gateway: RunningGateway) -> None:
    """By default only the gateway's own origin (or none) may open a socket."""
    own = gateway.url

    foreign = await websocket_handshake(gateway.url, "https://evil.example")
    same = await websocket_handshake(gateway.url, own)
    without = await websocket_handshake(gateway.url, None)

    assert foreign == 403
    assert str(same).startswith("0{")
    assert str(without).startswith("0{")


async def test_listed_origin_allowed(gateway_factory: Any) -> None:
    gateway = gateway_factory(cors_origins=["https://ops.example.com"])

    listed = await websocket_handshake(gateway.url, "https://ops.example.com")
    other = await websocket_handshake(gateway.url, "https://evil.example")

    assert str(listed).startswith("0{")
    assert other == 403


def test_cors_origins_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_CORS_ORIGINS", '["https://ops.example.com"]')

    assert Settings().cors_origins == ["https://ops.example.com"]


async def test_polling_rejected_by_default(gateway_factory: Any) -> None:
    """Long-polling is off unless CHAT_ALLOW_POLLING=true, and obeys the origin rule."""
    closed = gateway_factory()
    opened = gateway_factory(allow_polling=True)
    path = "/socket.io/?EIO=4&transport=polling"

    async with httpx.AsyncClient() as api:
        rejected = await api.get(closed.url + path)
        allowed = await api.get(opened.url + path)
        foreign = await api.get(
            opened.url + path, headers={"Origin": "https://evil.example"}
        )

    assert rejected.status_code == 400
    assert rejected.json() == "Invalid transport"
    assert allowed.status_code == 200
    assert allowed.text.startswith("0{")
    assert foreign.status_code == 400
    assert "not an accepted origin" in foreign.text


# -- Exposure -------------------------------------------------------------------


async def test_metrics_on_own_port(gateway_factory: Any) -> None:
    """With CHAT_METRICS_PORT, /metrics leaves the main port for its own one."""
    port = free_port()
    gateway = gateway_factory(metrics_port=port)

    async with httpx.AsyncClient() as api:
        main = await api.get(gateway.url + "/metrics")
        own = await api.get(f"http://127.0.0.1:{port}/metrics")

    assert main.status_code == 404
    assert "chat_" not in main.text
    assert own.status_code == 200
    assert "chat_active_sockets" in own.text


async def test_secrets_absent_from_logs(spawn_gateway: Any) -> None:
    """Debug logs of a run with bad tokens and a failing embedder hold no secret."""
    jwt_secret = "jwt-secret-for-the-log-test-" + "q" * 24
    google_key = "AIzaFAKE-google-key-for-the-log-test-000"
    with FakeGoogle(api_key=google_key) as fake:
        process = spawn_gateway(
            env={
                "CHAT_JWT_SECRET": jwt_secret,
                "GOOGLE_API_KEY": google_key,
                "CHAT_EMBEDDER": "google",
                "CHAT_GOOGLE_BASE_URL": fake.url,
                "CHAT_GOOGLE_DIMENSION": "128",
                "CHAT_LOG_LEVEL": "DEBUG",
                "CHAT_INDEX_RETRY_SECONDS": "0.2",
            }
        )
        good = issue_token(jwt_secret, user="olga", task="t1", role="operator", ttl=60)
        forged = sign(claims(), OTHER_SECRET)
        expired = sign(claims(exp=int(time.time()) - 3600), jwt_secret)
        tokens = [good, forged, expired]

        errors = [
            await connect_error(process.url, {"token": token})
            for token in (forged, expired)
        ]
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(
            process.url, auth={"token": good}, transports=["websocket"]
        )
        fake.fail_next(1, status=403)  # the indexer's first attempt fails
        ack = await client.call(
            "send_message", {"client_msg_id": "s-1", "text": "hello"}, timeout=10
        )
        await client.disconnect()
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as api:

            async def indexed() -> bool:
                text = (await api.get("/metrics")).text
                return "chat_indexed_messages_total 1.0" in text

            await eventually(indexed, timeout=20)
            fake.fail_next(1, status=403)  # and so does the search's
            bodies = [
                await api.get(
                    "/api/tasks/t1/messages",
                    headers={"Authorization": f"Bearer {token}"},
                )
                for token in tokens
            ]
            search = await api.get(
                "/api/search",
                params={"q": "hello"},
                headers={"Authorization": f"Bearer {good}"},
            )
        process.stop()
        keys_sent = {request.headers.get("x-goog-api-key") for request in fake.requests}

    log = process.log_path.read_text()
    secrets = {
        "jwt secret": jwt_secret,
        "google key": google_key,
        **{f"token {n}": token for n, token in enumerate(tokens)},
        **{f"signature {n}": token.rsplit(".", 1)[1] for n, token in enumerate(tokens)},
    }
    answers = json.dumps(errors) + "".join(r.text for r in [*bodies, search])

    assert ack["ok"] is True
    assert [r.status_code for r in bodies] == [200, 401, 401]
    assert search.status_code == 503
    assert keys_sent == {google_key}
    assert "Signature verification failed" in log
    assert "Google embedding request" in log
    for name, value in secrets.items():
        assert value not in log, f"the {name} is in the log"
        assert value not in answers, f"the {name} is in a response"


def span_values(exporter: InMemorySpanExporter) -> list[str]:
    """Return every attribute and event-attribute value of the finished spans."""
    values = []
    for span in exporter.get_finished_spans():
        values += [str(value) for value in (span.attributes or {}).values()]
        for event in span.events:
            values += [str(value) for value in (event.attributes or {}).values()]
    return values


@pytest.mark.parametrize("text_in_spans", [False, True])
async def test_message_text_in_spans_opt_in(
    gateway_factory: Any, connect: Any, spans: Any, text_in_spans: bool
) -> None:
    """Message text reaches span attributes only with CHAT_INDEX_TEXT_IN_SPANS=true.

    Tokens never do, whatever the setting.
    """
    provider, exporter = spans
    gateway = gateway_factory(
        tracer_provider=provider, index_text_in_spans=text_in_spans
    )
    token = gateway.token("t1", "olga")
    client = await connect(gateway, token)
    text = "customer card number ends 4242"

    await client.send(text, "span-1")
    async with http(gateway, token) as api:
        await api.post(
            "/api/tasks/t1/messages", json={"client_msg_id": "span-2", "text": text}
        )
        await api.get("/api/tasks/t1/messages")
    await eventually(lambda: metric_value(gateway, "chat_indexed_messages_total") >= 2)

    values = span_values(exporter)
    carrying = [value for value in values if text in value]
    assert len(carrying) == (2 if text_in_spans else 0)
    assert not [value for value in values if token.rsplit(".", 1)[1] in value]
