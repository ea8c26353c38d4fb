"""Hostile clients against a live gateway: fuzzed events, raw garbage, REST fuzzing.

The promise under test: whatever one client sends, the gateway does not crash,
sends a well-formed ack for every ``send_message``, and every other client (a
"bystander" in the same room) stays connected and can still chat.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
import websockets
from bson import ObjectId
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

from service.errors import ERROR_CODES
from tests.conftest import Client, RunningGateway, eventually
from tests.test_faults import (
    NO_RATE_LIMITS,
    NO_RATE_LIMITS_ENV,
    metric_value,
    process_rss_bytes,
    raw_connect,
)

T = TypeVar("T")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # keep no example database in the working tree
    suppress_health_check=[HealthCheck.too_slow],
)

# Any JSON value, NaN, infinities and lone surrogates included: json.dumps
# writes them, and a hostile client can send whatever a parser accepts.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=50)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
# Payloads near the valid shape reach the deeper checks (length, duplicates,
# the store) that random values never pass.
client_msg_ids = st.one_of(
    st.uuids().map(str),
    st.sampled_from(["retry-1", "retry-2"]),  # duplicates of earlier messages
    st.text(max_size=80),
    json_values,
)
texts = st.one_of(
    st.text(st.characters(categories=["L", "N", "P", "Zs"]), min_size=1, max_size=80),
    st.text(st.characters(categories=["L"]), min_size=30, max_size=60),
    st.text(min_size=1, max_size=80),
    json_values,
)
near_valid = st.fixed_dictionaries(
    {"client_msg_id": client_msg_ids, "text": texts},
    optional={"traceparent": st.text(max_size=200) | json_values},
)
# Fields a client might add to pick another task, role or sender.
forging = st.fixed_dictionaries(
    {
        "client_msg_id": st.uuids().map(str),
        "text": st.text(min_size=1, max_size=20),
        "task_id": st.text(max_size=10),
    },
    optional={"role": st.sampled_from(["manager", "admin"]), "sender": st.text()},
)
payloads = st.one_of(json_values, near_valid, near_valid, forging)
# A short text limit, so that generated texts can exceed it.
FUZZ_TEXT_CHARS = 40


class ClientLoop:
    """An event loop in a thread, so sync Hypothesis tests can drive async clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def client_loop() -> Iterator[ClientLoop]:
    loop = ClientLoop()
    yield loop
    loop.close()


def check_ack(ack: Any) -> None:
    """Assert that ``ack`` has one of the two documented shapes."""
    assert isinstance(ack, dict), ack
    assert isinstance(ack.get("ok"), bool), ack
    if ack["ok"]:
        assert set(ack) <= {"ok", "id", "created_at", "duplicate"}, ack
        assert ObjectId.is_valid(ack["id"]), ack
        assert isinstance(ack["created_at"], str), ack
    else:
        assert set(ack) == {"ok", "error"}, ack
        assert ack["error"]["code"] in ERROR_CODES, ack
        assert isinstance(ack["error"]["message"], str), ack
        assert ack["error"]["message"], ack


async def bystander_chats(bystander: Client, listener: Client, tag: str) -> None:
    """Assert the bystander is connected and its message reaches the room."""
    assert bystander.sio.connected
    ack = await bystander.send("still chatting", f"bystander-{tag}")
    assert ack["ok"] is True, ack
    await eventually(
        lambda: any(
            m["client_msg_id"] == f"bystander-{tag}" for m in listener.received
        ),
        timeout=5,
    )


@pytest.fixture
def fuzz_room(
    gateway_factory: Any, client_loop: ClientLoop
) -> Iterator[tuple[RunningGateway, Client, Client, Client]]:
    """A gateway and three clients of one room: the fuzzer, a bystander, a listener."""
    gateway = gateway_factory(
        indexing_enabled=False, max_text_chars=FUZZ_TEXT_CHARS, **NO_RATE_LIMITS
    )

    def open_client(user: str) -> Client:
        client = Client(gateway.url, gateway.token("t-fuzz", user))
        return client_loop.run(client.connect())

    clients = (open_client("fuzzer"), open_client("bystander"), open_client("listener"))
    yield gateway, *clients
    for client in clients:
        client_loop.run(client.close())


def test_fuzzed_payloads_get_acks(
    fuzz_room: tuple[RunningGateway, Client, Client, Client],
    client_loop: ClientLoop,
    figures: Any,
) -> None:
    """200 generated send_message payloads: each gets a well-formed ack."""
    gateway, fuzzer, bystander, listener = fuzz_room
    codes: Counter[str] = Counter()

    @FUZZ
    @given(payload=payloads)
    def send(payload: Any) -> None:
        ack = client_loop.run(fuzzer.sio.call("send_message", payload, timeout=10))
        check_ack(ack)
        if not ack["ok"]:
            codes[ack["error"]["code"]] += 1
        else:
            codes["ok, duplicate" if ack.get("duplicate") else "ok"] += 1
        assert bystander.sio.connected

    send()
    client_loop.run(bystander_chats(bystander, listener, "payloads"))

    assert fuzzer.sio.connected
    assert gateway.thread.is_alive()
    assert sum(codes.values()) >= 200
    figures(load="200 generated payloads, one at a time", acks=dict(codes))


RESERVED_CLIENT_EVENTS = {"connect", "connect_error", "disconnect", "send_message"}


def test_fuzzed_events_and_args(
    fuzz_room: tuple[RunningGateway, Client, Client, Client],
    client_loop: ClientLoop,
    figures: Any,
) -> None:
    """Unknown events and send_message with any number of arguments harm no one."""
    gateway, fuzzer, bystander, listener = fuzz_room
    sent = Counter[str]()

    @FUZZ
    @given(
        event=st.text(min_size=1, max_size=30).filter(
            lambda name: name not in RESERVED_CLIENT_EVENTS
        ),
        args=st.lists(json_values, max_size=6),
        known=st.booleans(),
    )
    # python-socketio hands an event named "*" to the catch-all handler
    # without its name; with no argument that handler once raised TypeError.
    @example(event="*", args=[], known=False)
    @example(event="message", args=[{"text": "spoofed"}], known=False)
    def emit(event: str, args: list[Any], known: bool) -> None:
        if known:
            ack = client_loop.run(
                fuzzer.sio.call("send_message", tuple(args), timeout=10)
            )
            check_ack(ack)
            if len(args) != 1:
                assert ack["error"]["code"] == "invalid_payload"
            sent["send_message"] += 1
        else:
            answer = client_loop.run(fuzzer.sio.call(event, tuple(args), timeout=10))
            assert answer is None
            sent["unknown"] += 1
        assert bystander.sio.connected

    emit()
    client_loop.run(bystander_chats(bystander, listener, "events"))
    ignored = metric_value(gateway, "chat_events_ignored_total", reason="unknown_event")

    assert fuzzer.sio.connected
    assert ignored == sent["unknown"]
    figures(
        load="200 generated events, one at a time",
        sent=dict(sent),
        events_ignored=ignored,
    )


# -- Raw Engine.IO and Socket.IO packets ----------------------------------------

# Each case: frames sent on a raw websocket after the Engine.IO open and the
# Socket.IO connect. "4" is an Engine.IO message, "42" a Socket.IO event.
MALFORMED: dict[str, list[str | bytes]] = {
    "empty frame": [""],
    "unknown Engine.IO type": ["9"],
    "not a packet": ["hello"],
    "NUL byte": ["\x00"],
    "base64 prefix, bad base64": ["b!!!"],
    "empty Engine.IO message": ["4"],
    "client ping with probe": ["2probe"],
    "unsolicited pong": ["3"],
    "upgrade on websocket": ["5"],
    "noop": ["6"],
    "unknown Socket.IO type": ["47"],
    "event without data": ["42"],
    "truncated JSON": ['42["send_message",{"client_msg_id":"a"'],
    "event as object": ['42{"event":"send_message"}'],
    "empty event array": ["42[]"],
    "numeric event name": ["42[1,2,3]"],
    "JSON nested 100,000 deep": ["42" + "[" * 100_000],
    "5,000-digit number": ['421["send_message",' + "9" * 5000 + "]"],
    "float overflow": ['421["send_message",{"client_msg_id":"f","text":1e999}]'],
    "lone surrogates": ['421["send_message",{"client_msg_id":"\\ud800","text":"x"}]'],
    "ack id of 25 digits": ['421234567890123456789012345["send_message",{}]'],
    "ack id of 101 digits": ["42" + "1" * 101 + '["send_message",{}]'],
    "negative ack id": ['42-1["send_message",{}]'],
    "wrong namespace event": ['42/admin,["send_message",{}]'],
    "connect to unknown namespace": ["40/admin,{}"],
    "second connect": ['40{"token":"x"}'],
    "ack without id": ["43"],
    "ack for unknown id": ['43999["x"]'],
    "binary event, no attachment": [
        '451-["send_message",{"_placeholder":true,"num":0}]'
    ],
    "binary event and attachment": [
        '451-1["send_message",{"_placeholder":true,"num":0}]',
        b"\x00\x01",
    ],
    "10-digit attachment count": ['459999999999-["send_message"]'],
    "bare binary frame": [b"\x04garbage"],
    "100 kB text frame": ["4" + "a" * 100_000],
    "Socket.IO disconnect": ["41"],
    "Engine.IO close": ["1"],
}


async def read_until_quiet(
    ws: websockets.ClientConnection, quiet: float = 0.3
) -> tuple[list[str | bytes], bool]:
    """Return the frames received until ``quiet`` seconds pass, and if it closed."""
    frames: list[str | bytes] = []
    while True:
        try:
            frames.append(await asyncio.wait_for(ws.recv(), quiet))
        except TimeoutError:
            return frames, False
        except websockets.ConnectionClosed:
            return frames, True


async def test_malformed_packets_harm_no_one(
    gateway_factory: Any, connect: Any, figures: Any
) -> None:
    """Garbage frames on a raw websocket: no crash, no other socket closed or leaked."""
    gateway = gateway_factory(indexing_enabled=False, **NO_RATE_LIMITS)
    bystander = await connect(gateway, gateway.token("t-raw", "bystander"))
    listener = await connect(gateway, gateway.token("t-raw", "listener"))
    sockets = gateway.gateway.sockets
    outcomes: dict[str, str] = {}

    for number, (case, frames) in enumerate(MALFORMED.items()):
        attacker = await raw_connect(gateway.url, gateway.token("t-raw", "attacker"))
        for frame in frames:
            await attacker.send(frame)
        received, closed = await read_until_quiet(attacker)
        outcomes[case] = "closed" if closed else f"open, {len(received)} frames back"
        await attacker.close()

        await bystander_chats(bystander, listener, str(number))
        # The attacker's socket is gone from every room at once, not at ping timeout.
        await eventually(lambda: sockets.active == 2, timeout=2, every=0.05)
        acks = [f for f in received if isinstance(f, str) and f.startswith("43")]
        for ack in acks:
            check_ack(json.loads(ack[ack.index("[") :])[0])

    async with httpx.AsyncClient(base_url=gateway.url) as api:
        health = await api.get("/healthz")
    figures(
        load=f"{len(MALFORMED)} malformed-frame cases, one raw socket each, "
        "2 bystanders chatting",
        cases=outcomes,
        bystanders_connected=bystander.sio.connected and listener.sio.connected,
        messages_delivered_to_listener=len(listener.received),
    )
    assert health.status_code == 200
    assert sockets._per_user == Counter({"bystander": 1, "listener": 1})
    assert gateway.gateway.sio._binary_packet == {}


async def test_binary_attachments_not_buffered(
    spawn_gateway: Any, figures: Any
) -> None:
    """A binary event announcing many attachments cannot make the server hoard memory."""
    from service.auth import issue_token

    process = spawn_gateway(
        env={"CHAT_INDEXING_ENABLED": "false", **NO_RATE_LIMITS_ENV}
    )
    token = issue_token(
        process.env["CHAT_JWT_SECRET"], user="olga", task="t1", role="operator", ttl=60
    )
    attacker = await raw_connect(process.url, token)
    before = process_rss_bytes(process.process.pid)
    chunk = bytes(900_000)

    await attacker.send('45999-["send_message",{"_placeholder":true,"num":0}]')
    for _ in range(100):
        await attacker.send(chunk)
    _frames, closed = await read_until_quiet(attacker, quiet=1.0)
    after = process_rss_bytes(process.process.pid)
    await attacker.close()
    growth = after - before

    figures(
        load="1 socket: a binary event announcing 999 attachments, then "
        "100 frames of 900 kB",
        rss_before_mb=round(before / 2**20, 1),
        rss_after_mb=round(after / 2**20, 1),
        attacker_closed=closed,
    )
    assert growth < 30 * 2**20, f"the gateway kept {growth / 2**20:.0f} MB"


# -- REST -----------------------------------------------------------------------


def test_rest_api_schemathesis(gateway_factory: Any, figures: Any) -> None:
    """Generated requests for every operation of /openapi.json: never a 5xx."""
    gateway = gateway_factory()
    token = gateway.token("t1", "olga")
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    strategy = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(
        GenerationMode.NEGATIVE
    )
    own_task = schema.as_strategy(path_parameters={"task": "t1"})

    @FUZZ
    @given(case=strategy | own_task)
    def call(case: Any) -> None:
        response = case.call(base_url=gateway.url, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

    started = time.monotonic()
    call()
    figures(
        load="200 generated requests (positive and negative) with a valid token",
        statuses=dict(sorted(statuses.items())),
        seconds=round(time.monotonic() - started, 1),
    )
    assert statuses[201] + statuses[200] > 0
    assert server_errors == []
