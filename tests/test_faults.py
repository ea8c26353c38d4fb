"""Faults of the parts around the gateway, under load, against real components.

Each test drives a real gateway over real sockets and breaks a real
dependency: it kills SecantusDB, arms its ``failCommand`` fail point, locks
Qdrant's folder, makes the embedder fail or sends SIGTERM to the process. Then
it checks the promise on-call engineers rely on. Every message acked ``ok`` is
in MongoDB exactly once, every other message got an error ack, and the
gateway recovers without a restart. Each test writes the figures it measured to
``<basetemp>/reliability/<test>.json`` and prints them, and
docs/reliability.md tabulates them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
import socketio
import websockets
from prometheus_client.parser import text_string_to_metric_families
from qdrant_client import QdrantClient

from service.embedded import EmbeddedMongo
from tests.conftest import Client, RunningGateway, eventually, fail_point
from tests.fake_google import FakeGoogle

# Rate limits far above the offered load, so that the fault, not the limiter,
# decides each outcome.
NO_RATE_LIMITS: dict[str, Any] = {
    "rate_limit_burst": 10_000,
    "rate_limit_per_second": 10_000,
    "user_rate_limit_burst": 10_000,
    "user_rate_limit_per_second": 10_000,
}
NO_RATE_LIMITS_ENV = {
    f"CHAT_{name.upper()}": str(value) for name, value in NO_RATE_LIMITS.items()
}
STORE_ERRORS = {"store_unavailable", "overloaded"}
GOOGLE_KEY = "fake-google-key-for-fault-tests-000000"


@dataclass
class Outcome:
    """What one send_message call got back, as the client saw it."""

    client_msg_id: str
    text: str
    sent_at: float
    latency: float
    code: str | None
    message_id: str | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.code is None


async def send_one(
    client: Client, client_msg_id: str, text: str, timeout: float = 15
) -> Outcome:
    """Send one message and classify the ack.

    The code is ``not_sent`` when the socket was already closed, so the
    message never left the client, and ``no_ack`` when no ack came in time.
    """
    started = time.monotonic()
    payload = {"client_msg_id": client_msg_id, "text": text}
    try:
        ack = await client.sio.call("send_message", payload, timeout=timeout)
    except socketio.exceptions.BadNamespaceError:
        return Outcome(client_msg_id, text, started, 0.0, "not_sent")
    except (socketio.exceptions.SocketIOError, ConnectionError):
        return Outcome(
            client_msg_id, text, started, time.monotonic() - started, "no_ack"
        )
    latency = time.monotonic() - started
    if not isinstance(ack, dict) or "ok" not in ack:
        return Outcome(client_msg_id, text, started, latency, f"malformed: {ack!r}")
    if ack["ok"]:
        duplicate = bool(ack.get("duplicate"))
        return Outcome(
            client_msg_id, text, started, latency, None, ack["id"], duplicate
        )
    return Outcome(client_msg_id, text, started, latency, ack["error"]["code"])


async def send_steadily(
    client: Client,
    prefix: str,
    stop: asyncio.Event,
    outcomes: list[Outcome],
    pause: float = 0.05,
    timeout: float = 15,
) -> None:
    """Send one message at a time, ``pause`` seconds apart, until ``stop`` is set.

    A sender whose socket has closed stops at once.
    """
    number = 0
    while not stop.is_set():
        client_msg_id = f"{prefix}-{number}"
        text = f"{prefix} message {number}"
        outcome = await send_one(client, client_msg_id, text, timeout)
        outcomes.append(outcome)
        if outcome.code == "not_sent":
            return
        number += 1
        await asyncio.sleep(pause)


def stored_by_client_id(
    mongo_uri: str, database: str
) -> tuple[dict[tuple[str, str], dict[str, Any]], Counter[tuple[str, str]]]:
    """Return the stored messages by (task_id, client_msg_id), and their counts."""
    with pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000) as client:
        docs = list(client[database].messages.find({}))
    counts = Counter((doc["task_id"], doc["client_msg_id"]) for doc in docs)
    return {(d["task_id"], d["client_msg_id"]): d for d in docs}, counts


def percentile(values: list[float], fraction: float) -> float:
    """Return the ``fraction`` quantile (nearest rank) of ``values``, 0 if empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def check_acked_stored_once(
    outcomes: list[Outcome],
    task: str,
    stored: dict[tuple[str, str], dict[str, Any]],
    counts: Counter[tuple[str, str]],
) -> int:
    """Assert each ok-acked message is stored once under its id; return losses."""
    lost = 0
    for outcome in outcomes:
        if not outcome.ok:
            continue
        key = (task, outcome.client_msg_id)
        if key not in stored:
            lost += 1
            continue
        assert counts[key] == 1, f"{key} stored {counts[key]} times"
        assert str(stored[key]["_id"]) == outcome.message_id
    return lost


@pytest.fixture
def own_mongo(tmp_path: Path) -> Iterator[EmbeddedMongo]:
    """A SecantusDB server of this test alone, free to be killed and restarted."""
    server = EmbeddedMongo(tmp_path / "own-mongo")
    server.start()
    yield server
    server.stop()


async def open_clients(
    gateway: RunningGateway, connect: Any, task: str, count: int
) -> list[Client]:
    return [
        await connect(gateway, gateway.token(task, f"user-{number}"))
        for number in range(count)
    ]


def metric_value(gateway: RunningGateway, name: str, **labels: str) -> float:
    """Return one sample of the gateway's registry, 0 when it is absent."""
    for family in gateway.gateway.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# -- MongoDB -------------------------------------------------------------------


async def test_mongo_kill_under_load(
    own_mongo: EmbeddedMongo, gateway_factory: Any, connect: Any, figures: Any
) -> None:
    """SecantusDB killed and restarted mid-load: no acked message is lost."""
    gateway = gateway_factory(
        mongodb_uri=own_mongo.uri,
        mongo_timeout_seconds=1.0,
        indexing_enabled=False,
        **NO_RATE_LIMITS,
    )
    clients = await open_clients(gateway, connect, "t-kill", 8)
    by_prefix = {f"c{n}": client for n, client in enumerate(clients)}
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    load_started = time.monotonic()
    senders = [
        asyncio.create_task(send_steadily(client, prefix, stop, outcomes))
        for prefix, client in by_prefix.items()
    ]

    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    own_mongo.kill()
    await asyncio.sleep(2.0)
    await asyncio.to_thread(own_mongo.start)
    restarted_at = time.monotonic()

    def recovered() -> bool:
        return any(o.ok and o.sent_at >= restarted_at for o in outcomes)

    await eventually(recovered, timeout=15, every=0.02)
    recovery = min(
        o.sent_at + o.latency for o in outcomes if o.ok and o.sent_at >= restarted_at
    )
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*senders)
    load_seconds = time.monotonic() - load_started

    codes = Counter(o.code for o in outcomes if not o.ok)
    stored, counts = stored_by_client_id(own_mongo.uri, gateway.database)
    lost = check_acked_stored_once(outcomes, "t-kill", stored, counts)
    errored_but_stored = sum(
        1 for o in outcomes if not o.ok and ("t-kill", o.client_msg_id) in stored
    )

    # A client resends every message that got an error, with the same id.
    retries = [
        await send_one(
            by_prefix[o.client_msg_id.split("-")[0]], o.client_msg_id, o.text
        )
        for o in outcomes
        if not o.ok
    ]
    stored_after, counts_after = stored_by_client_id(own_mongo.uri, gateway.database)

    acked = sum(1 for o in outcomes if o.ok)
    figures(
        load=f"8 clients, 1 message each 50 ms after its ack, for {load_seconds:.1f} s",
        offered=len(outcomes),
        acked_ok=acked,
        error_acks=dict(codes),
        stored=len(stored),
        errored_but_stored=errored_but_stored,
        lost=lost,
        outage_seconds=round(restarted_at - killed_at, 2),
        recovery_seconds=round(recovery - restarted_at, 3),
        retried=len(retries),
        stored_after_retries=len(stored_after),
        write_errors=metric_value(
            gateway, "chat_mongo_write_errors_total", error="timeout"
        )
        + metric_value(gateway, "chat_mongo_write_errors_total", error="unavailable"),
    )
    assert lost == 0
    assert acked > 0
    assert codes, "the kill produced no error ack: the fault did not happen"
    assert set(codes) <= STORE_ERRORS, f"unexpected outcomes: {codes}"
    assert recovery - restarted_at < 5
    assert all(retry.ok for retry in retries), [r.code for r in retries if not r.ok]
    assert len(stored_after) == len(outcomes)
    assert max(counts_after.values()) == 1


@pytest.mark.parametrize("error_code", [2, 11600])
async def test_insert_errors_injected(
    gateway_factory: Any,
    connect: Any,
    secantus: EmbeddedMongo,
    figures: Any,
    error_code: int,
) -> None:
    """Failed inserts give store_unavailable; a resend with the same id is stored once.

    Code 2 (BadValue) fails one batch per attempt. Code 11600
    (InterruptedAtShutdown) is a retryable error: the driver marks the server
    unknown, checks it again and retries the insert once by itself.
    """
    gateway = gateway_factory(indexing_enabled=False, **NO_RATE_LIMITS)
    client = await connect(gateway, gateway.token("t-fail", "olga"))
    fail_point(
        secantus.uri,
        {"failCommands": ["insert"], "errorCode": error_code},
        times=3,
    )
    try:
        outcomes = [await send_one(client, f"f-{n}", f"message {n}") for n in range(8)]
    finally:
        fail_point(secantus.uri, None)
    failed = [o for o in outcomes if not o.ok]
    recovered_after = sum(o.latency for o in outcomes[: len(failed) + 1])
    retries = [await send_one(client, o.client_msg_id, o.text) for o in failed]

    stored, counts = stored_by_client_id(secantus.uri, gateway.database)
    lost = check_acked_stored_once(outcomes + retries, "t-fail", stored, counts)
    figures(
        load="1 client, 8 messages one after another; 3 insert attempts fail",
        error_code=error_code,
        acked_ok=len(outcomes) - len(failed),
        error_acks=dict(Counter(o.code for o in failed)),
        retries_ok=sum(1 for r in retries if r.ok),
        stored=len(stored),
        lost=lost,
        recovery_seconds=round(recovered_after, 3),
        max_ack_ms=ms(max(o.latency for o in outcomes)),
    )
    # The driver retries code 11600 within CHAT_MONGO_TIMEOUT_SECONDS.
    assert len(failed) == (3 if error_code == 2 else 0)
    assert {o.code for o in failed} <= {"store_unavailable"}
    assert outcomes[len(failed) :] == [o for o in outcomes if o.ok]
    assert recovered_after < 3
    assert all(retry.ok for retry in retries)
    assert lost == 0
    assert len(stored) == len(outcomes)
    assert max(counts.values()) == 1
    errors = metric_value(gateway, "chat_mongo_write_errors_total", error="unavailable")
    assert errors == len(failed)


async def test_slow_writes_time_out(
    gateway_factory: Any, connect: Any, secantus: EmbeddedMongo, figures: Any
) -> None:
    """Inserts blocked past CHAT_MONGO_TIMEOUT_SECONDS fail in time; resends store once."""
    timeout = 0.5
    gateway = gateway_factory(
        indexing_enabled=False, mongo_timeout_seconds=timeout, **NO_RATE_LIMITS
    )
    clients = await open_clients(gateway, connect, "t-slow", 4)
    fail_point(
        secantus.uri,
        {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 1500},
        times=1,
    )
    try:
        first = await asyncio.gather(
            *(send_one(c, f"s-{n}", f"slow {n}") for n, c in enumerate(clients))
        )
        later = [await send_one(clients[0], f"s-late-{n}", "late") for n in range(3)]
    finally:
        fail_point(secantus.uri, None)
    outcomes = [*first, *later]
    failed = [o for o in outcomes if not o.ok]
    await asyncio.sleep(1.5)  # let a blocked insert that still runs finish
    senders = {o.client_msg_id: clients[n] for n, o in enumerate(first)}
    retries = [  # each from its own sender, as a client resends
        await send_one(
            senders.get(o.client_msg_id, clients[0]), o.client_msg_id, o.text
        )
        for o in failed
    ]

    stored, counts = stored_by_client_id(secantus.uri, gateway.database)
    lost = check_acked_stored_once(outcomes + retries, "t-slow", stored, counts)
    error_latencies = [o.latency for o in failed]
    figures(
        load="4 clients at once, then 3 messages; 1 insert blocked 1.5 s",
        mongo_timeout_seconds=timeout,
        acked_ok=len(outcomes) - len(failed),
        error_acks=dict(Counter(o.code for o in failed)),
        error_ack_max_ms=ms(max(error_latencies, default=0)),
        errored_but_stored=sum(
            1 for o in failed if ("t-slow", o.client_msg_id) in stored
        ),
        retries_acked_duplicate=sum(1 for r in retries if r.duplicate),
        stored=len(stored),
        lost=lost,
    )
    assert failed, "no write timed out: the fail point did not block"
    assert {o.code for o in failed} == {"store_unavailable"}
    assert max(error_latencies) < timeout + 0.5
    assert all(o.ok for o in later)
    assert all(retry.ok for retry in retries)
    assert lost == 0
    assert len(stored) == len(outcomes)
    assert max(counts.values()) == 1
    assert metric_value(gateway, "chat_mongo_write_errors_total", error="timeout") >= 1


# -- Indexing -----------------------------------------------------------------


def qdrant_point_count(folder: Path, collection: str = "chat_messages") -> int:
    client = QdrantClient(path=str(folder))
    try:
        return int(client.count(collection, exact=True).count)
    finally:
        client.close()


async def chat_through_outage(
    gateway: RunningGateway, connect: Any, task: str, seconds: float
) -> list[Outcome]:
    """Four clients chat for ``seconds``; every message must be acked ok."""
    clients = await open_clients(gateway, connect, task, 4)
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    senders = [
        asyncio.create_task(send_steadily(c, f"{task}{n}", stop, outcomes, pause=0.1))
        for n, c in enumerate(clients)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*senders)
    return outcomes


def indexing_gauges(gateway: RunningGateway) -> dict[str, float]:
    return {
        "backlog": metric_value(gateway, "chat_index_backlog_messages"),
        "queue": metric_value(gateway, "chat_index_queue_depth"),
    }


async def check_drained(
    gateway: RunningGateway, secantus: EmbeddedMongo, total: int
) -> float:
    """Wait until every message is indexed; return the seconds it took."""
    started = time.monotonic()

    def drained() -> bool:
        gauges = indexing_gauges(gateway)
        return (
            metric_value(gateway, "chat_indexed_messages_total") >= total
            and gauges["backlog"] == 0
            and gauges["queue"] == 0
        )

    await eventually(drained, timeout=40, every=0.1)
    return time.monotonic() - started


def unindexed_count(secantus: EmbeddedMongo, database: str) -> int:
    with pymongo.MongoClient(secantus.uri) as client:
        return client[database].messages.count_documents({"indexed_at": None})


def google_settings(fake: FakeGoogle) -> dict[str, Any]:
    return {
        "embedder": "google",
        "google_api_key": GOOGLE_KEY,
        "google_base_url": fake.url,
        "google_dimension": 128,
        "index_retry_seconds": 0.1,
    }


async def test_qdrant_outage_backlog_drains(
    gateway_factory: Any,
    connect: Any,
    secantus: EmbeddedMongo,
    tmp_path: Path,
    figures: Any,
) -> None:
    """With Qdrant's folder locked, chat goes on; the backlog drains once it is free."""
    data_dir = tmp_path / "gateway-qdrant"
    (data_dir / "qdrant").mkdir(parents=True)
    # Local mode lets one client hold a folder: this one keeps the gateway out.
    holder = QdrantClient(path=str(data_dir / "qdrant"))
    with FakeGoogle(api_key=GOOGLE_KEY) as fake:
        try:
            gateway = gateway_factory(
                data_dir=data_dir, **google_settings(fake), **NO_RATE_LIMITS
            )
            outcomes = await chat_through_outage(gateway, connect, "t-qd", 3.0)
            await asyncio.sleep(1.2)  # one reconcile interval: the backlog gauge
            during = indexing_gauges(gateway)
            upsert_errors = metric_value(
                gateway, "chat_index_errors_total", stage="upsert"
            )
            indexed_during = metric_value(gateway, "chat_indexed_messages_total")
        finally:
            holder.close()
        released_at = time.monotonic()
        drain_seconds = await check_drained(gateway, secantus, len(outcomes))
        indexed = metric_value(gateway, "chat_indexed_messages_total")
        unindexed = unindexed_count(secantus, gateway.database)
        gateway.stop()
    points = qdrant_point_count(data_dir / "qdrant")

    figures(
        load="4 clients, 1 message each 100 ms after its ack, for 3 s",
        acked_ok=sum(1 for o in outcomes if o.ok),
        backlog_during=during["backlog"],
        queue_depth_during=during["queue"],
        upsert_errors=upsert_errors,
        drain_seconds=round(drain_seconds, 2),
        recovery_seconds=round(time.monotonic() - released_at, 2),
        indexed=indexed,
        qdrant_points=points,
        lost=sum(1 for o in outcomes if not o.ok),
    )
    assert all(o.ok for o in outcomes), Counter(o.code for o in outcomes)
    assert indexed_during == 0
    assert during["backlog"] == len(outcomes)
    assert during["queue"] == len(outcomes)
    assert upsert_errors >= 1
    assert indexed == len(outcomes)
    assert unindexed == 0
    assert points == len(outcomes)


async def test_embedder_outage_backlog_drains(
    gateway_factory: Any,
    connect: Any,
    secantus: EmbeddedMongo,
    tmp_path: Path,
    figures: Any,
) -> None:
    """With the embedder failing, chat goes on; every message is embedded once after."""
    data_dir = tmp_path / "gateway-embedder"
    with FakeGoogle(api_key=GOOGLE_KEY) as fake:
        gateway = gateway_factory(
            data_dir=data_dir, **google_settings(fake), **NO_RATE_LIMITS
        )
        # With retries 0.1 s apart, doubling, five failures last about 3 s.
        fake.fail_next(5, status=503)
        outcomes = await chat_through_outage(gateway, connect, "t-em", 2.0)
        during = indexing_gauges(gateway)
        embed_errors = metric_value(gateway, "chat_index_errors_total", stage="embed")
        drain_seconds = await check_drained(gateway, secantus, len(outcomes))
        indexed = metric_value(gateway, "chat_indexed_messages_total")
        unindexed = unindexed_count(secantus, gateway.database)
        embedded = Counter(fake.embedded_texts)
        failed_requests = sum(1 for r in fake.requests if r.status == 503)
        gateway.stop()
    points = qdrant_point_count(data_dir / "qdrant")

    figures(
        load="4 clients, 1 message each 100 ms after its ack, for 2 s",
        acked_ok=sum(1 for o in outcomes if o.ok),
        backlog_during=during["backlog"],
        queue_depth_during=during["queue"],
        embed_errors=embed_errors,
        failed_embed_requests=failed_requests,
        drain_seconds=round(drain_seconds, 2),
        indexed=indexed,
        texts_embedded_twice=sum(1 for n in embedded.values() if n > 1),
        qdrant_points=points,
        lost=sum(1 for o in outcomes if not o.ok),
    )
    assert all(o.ok for o in outcomes), Counter(o.code for o in outcomes)
    assert during["backlog"] > 0
    assert during["queue"] > 0
    assert embed_errors == failed_requests == 5
    assert indexed == len(outcomes)
    assert unindexed == 0
    assert sorted(embedded) == sorted(o.text for o in outcomes)
    assert max(embedded.values()) == 1
    assert points == len(outcomes)


# -- The gateway process --------------------------------------------------------


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def connect_process(url: str, token: str) -> Client:
    client = Client(url, token)
    return await client.connect()


def json_events(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        if line.startswith("{"):
            event = json.loads(line)
            if "message" in event:
                events.append(event)
    return events


# (insert delay in ms, CHAT_DRAIN_TIMEOUT_SECONDS): a store slower than usual,
# and one stuck past the drain timeout.
SIGTERM_CASES = {"slow-store": (300, 5.0), "stuck-store": (3000, 1.0)}


@pytest.mark.parametrize("case", list(SIGTERM_CASES))
async def test_sigterm_drains_in_flight(
    spawn_gateway: Any, secantus: EmbeddedMongo, figures: Any, case: str
) -> None:
    """SIGTERM mid-load: every message in flight gets its ack, then the process exits.

    With a store that answers within CHAT_DRAIN_TIMEOUT_SECONDS the in-flight
    messages are written and acked ok; with one stuck past it they get
    store_unavailable and the process still exits in time.
    """
    from service.auth import issue_token

    block_ms, drain_timeout = SIGTERM_CASES[case]
    process = spawn_gateway(
        env={
            "CHAT_INDEXING_ENABLED": "false",
            "CHAT_DRAIN_TIMEOUT_SECONDS": str(drain_timeout),
            "CHAT_MONGO_TIMEOUT_SECONDS": "20",
            **NO_RATE_LIMITS_ENV,
        }
    )
    secret = process.env["CHAT_JWT_SECRET"]
    database = process.env["CHAT_MONGODB_DATABASE"]
    clients = [
        await connect_process(
            process.url,
            issue_token(
                secret, user=f"user-{n}", task="t-term", role="operator", ttl=60
            ),
        )
        for n in range(8)
    ]
    # Slow inserts keep several batches in flight when the signal arrives.
    fail_point(
        secantus.uri,
        {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": block_ms},
    )
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    try:
        senders = [
            asyncio.create_task(
                send_steadily(c, f"c{n}s{k}", stop, outcomes, pause=0.02, timeout=4)
            )
            for n, c in enumerate(clients)
            for k in range(3)  # three messages in flight per client
        ]
        await asyncio.sleep(1.5)
        signalled_at = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.process.wait, drain_timeout + 20)
        exit_seconds = time.monotonic() - signalled_at
        stop.set()
        await asyncio.gather(*senders)
    finally:
        fail_point(secantus.uri, None)
        for client in clients:
            await client.close()
    await asyncio.sleep(block_ms / 1000)  # a blocked insert may still land

    stored, counts = stored_by_client_id(secantus.uri, database)
    lost = check_acked_stored_once(outcomes, "t-term", stored, counts)
    codes = Counter(o.code for o in outcomes if not o.ok)
    before_signal = [o for o in outcomes if o.sent_at < signalled_at]
    in_flight = [o for o in before_signal if o.sent_at + o.latency >= signalled_at]
    acked_keys = {("t-term", o.client_msg_id) for o in outcomes if o.ok}
    stored_without_ack = [key for key in stored if key not in acked_keys]
    events = json_events(process.lines())
    messages = [event["message"] for event in events]
    drain_line = next((e for e in events if "left" in e), {})
    figures(
        load=f"8 clients x 3 senders back to back; inserts blocked {block_ms} ms",
        drain_timeout_seconds=drain_timeout,
        offered=len(outcomes),
        acked_ok=len(acked_keys),
        error_acks=dict(codes),
        in_flight_at_signal=len(in_flight),
        in_flight_outcomes=dict(Counter(o.code or "ok" for o in in_flight)),
        stored=len(stored),
        stored_without_ok_ack=len(stored_without_ack),
        lost=lost,
        drain_log=drain_line.get("message"),
        drain_seconds=drain_line.get("seconds"),
        exit_code=exit_code,
        exit_seconds=round(exit_seconds, 2),
    )
    assert exit_code == 0
    assert exit_seconds < drain_timeout + 3
    assert "draining: new messages are rejected" in messages
    assert "chat gateway stopped" in messages
    assert lost == 0
    assert in_flight, "no message was in flight at the signal"
    # Messages sent later were rejected, or raced the closing socket.
    assert set(codes) <= {"overloaded", "store_unavailable", "not_sent", "no_ack"}
    if case == "slow-store":
        assert "drained" in messages
        assert {o.code for o in in_flight} == {None}
        assert stored_without_ack == []
    else:
        assert "drain timed out; unwritten messages get errors" in messages
        assert {o.code for o in in_flight} == {"store_unavailable"}


async def test_overload_rejects_fast(
    spawn_gateway: Any, secantus: EmbeddedMongo, figures: Any
) -> None:
    """Offered load far above capacity: fast overloaded acks, bounded latency, flat memory."""
    from service.auth import issue_token

    queue_max = 40
    process = spawn_gateway(
        env={
            "CHAT_INDEXING_ENABLED": "false",
            "CHAT_WRITER_QUEUE_MAX": str(queue_max),
            "CHAT_BATCH_MAX": "8",
            "CHAT_WRITER_CONCURRENCY": "1",
            "CHAT_MONGO_TIMEOUT_SECONDS": "5",
            **NO_RATE_LIMITS_ENV,
        }
    )
    pid = process.process.pid
    secret = process.env["CHAT_JWT_SECRET"]
    database = process.env["CHAT_MONGODB_DATABASE"]
    clients = [
        await connect_process(
            process.url,
            issue_token(
                secret, user=f"user-{n}", task="t-over", role="operator", ttl=60
            ),
        )
        for n in range(10)
    ]

    async def offer(rate_per_client: float, seconds: float, tag: str) -> list[Outcome]:
        """Send at a fixed rate per client without waiting for acks (open loop)."""
        tasks = []
        started = time.monotonic()
        for number in range(int(rate_per_client * seconds)):
            due = started + number / rate_per_client
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            for client_number, client in enumerate(clients):
                client_msg_id = f"{tag}-{client_number}-{number}"
                tasks.append(
                    asyncio.create_task(send_one(client, client_msg_id, "load", 20))
                )
        return list(await asyncio.gather(*tasks))

    await offer(5, 1.0, "warm")
    rss_before = process_rss_bytes(pid)
    # One insert at a time, 100 ms each, of at most 8 messages: the store takes
    # at most 80 messages/s.
    fail_point(
        secantus.uri,
        {"failCommands": ["insert"], "blockConnection": True, "blockTimeMS": 100},
    )
    try:
        overload = await offer(40, 3.0, "over")
        rss_after = process_rss_bytes(pid)
        recovery_started = time.monotonic()
        calm = [
            await send_one(clients[n % len(clients)], f"calm-{n}", "calm")
            for n in range(10)
        ]
    finally:
        fail_point(secantus.uri, None)
    async with httpx.AsyncClient(base_url=process.url) as api:
        metrics_text = (await api.get("/metrics")).text
    for client in clients:
        await client.close()

    accepted = [o for o in overload if o.ok]
    rejected = [o for o in overload if o.code == "overloaded"]
    other = Counter(o.code for o in overload if not o.ok and o.code != "overloaded")
    stored, counts = stored_by_client_id(secantus.uri, database)
    lost = check_acked_stored_once(overload + calm, "t-over", stored, counts)
    overloaded_counter = max(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "chat_messages_total"
        and sample.labels.get("code") == "overloaded"
    )
    figures(
        load="10 clients x 40 messages/s for 3 s (400 messages/s offered); "
        "store capacity 80 messages/s",
        writer_queue_max=queue_max,
        offered=len(overload),
        acked_ok=len(accepted),
        overloaded=len(rejected),
        other_errors=dict(other),
        overloaded_p50_ms=ms(percentile([o.latency for o in rejected], 0.5)),
        overloaded_p95_ms=ms(percentile([o.latency for o in rejected], 0.95)),
        accepted_p50_ms=ms(percentile([o.latency for o in accepted], 0.5)),
        accepted_p95_ms=ms(percentile([o.latency for o in accepted], 0.95)),
        accepted_max_ms=ms(max((o.latency for o in accepted), default=0)),
        rss_before_mb=round(rss_before / 2**20, 1),
        rss_after_mb=round(rss_after / 2**20, 1),
        calm_ok=sum(1 for o in calm if o.ok),
        calm_mean_ms=ms(statistics.fmean(o.latency for o in calm)),
        recovery_seconds=round(time.monotonic() - recovery_started, 2),
        overloaded_counter=overloaded_counter,
        stored=len(stored),
        lost=lost,
    )
    assert len(rejected) > len(overload) / 2
    assert accepted
    assert not other, other
    assert overloaded_counter == len(rejected)
    assert percentile([o.latency for o in rejected], 0.95) < 0.25
    assert percentile([o.latency for o in accepted], 0.95) < 2.0
    assert rss_after - rss_before < 40 * 2**20
    assert all(o.ok for o in calm)
    assert lost == 0
    assert len(stored) == len(accepted) + len(calm) + 50  # the warm-up's 5 x 10
    assert max(counts.values()) == 1


async def raw_connect(url: str, token: str) -> websockets.ClientConnection:
    """Open a websocket and do the Engine.IO and Socket.IO handshakes by hand."""
    ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
    ws = await websockets.connect(ws_url, max_size=None, ping_interval=None)
    opening = await ws.recv()
    assert str(opening).startswith("0{"), opening
    await ws.send("40" + json.dumps({"token": token}))
    reply = await ws.recv()
    assert str(reply).startswith("40{"), reply
    return ws


async def raw_ack(ws: websockets.ClientConnection, ack_id: int) -> Any:
    """Read frames until the Socket.IO ack ``ack_id`` arrives; return its data."""
    prefix = f"43{ack_id}"
    while True:
        frame = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(frame, str) and frame.startswith(prefix + "["):
            return json.loads(frame[len(prefix) :])


async def test_reconnect_storm_leaks_nothing(
    gateway_factory: Any, figures: Any
) -> None:
    """200 clients x 3 rounds connect at once and leave: no socket, room or counter stays.

    Half leave with a Socket.IO disconnect; the other half drop the TCP
    connection with no close frame at all, as a client that loses its network.
    """
    gateway = gateway_factory(indexing_enabled=False, **NO_RATE_LIMITS)
    sockets = gateway.gateway.sockets
    clients_per_round, rounds = 200, 3
    rss: list[int] = []
    round_seconds: list[float] = []

    async def polite_client(round_number: int, number: int) -> bool:
        token = gateway.token(f"t-storm-{number % 20}", f"u{number}")
        client = await Client(gateway.url, token).connect()
        ack = await send_one(client, f"r{round_number}-{number}", "hello")
        await client.close()
        return ack.ok

    async def vanishing_client(round_number: int, number: int) -> bool:
        token = gateway.token(f"t-storm-{number % 20}", f"u{number}")
        ws = await raw_connect(gateway.url, token)
        payload = {"client_msg_id": f"r{round_number}-{number}", "text": "bye"}
        await ws.send("421" + json.dumps(["send_message", payload]))
        ack = await raw_ack(ws, 1)
        ws.transport.abort()
        return bool(ack[0]["ok"])

    for round_number in range(rounds):
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                (polite_client if n % 2 else vanishing_client)(round_number, n)
                for n in range(clients_per_round)
            )
        )
        round_seconds.append(time.monotonic() - started)
        assert all(results)
        await eventually(lambda: sockets.active == 0, timeout=20)
        await eventually(lambda: not gateway.gateway.sio.eio.sockets, timeout=20)
        gc.collect()
        rss.append(process_rss_bytes(os.getpid()))

    rooms = {
        room
        for room, members in gateway.gateway.sio.manager.rooms.get("/", {}).items()
        if members
    }
    figures(
        load=f"{clients_per_round} clients at once (half vanish without a close) "
        f"connect, send, leave; {rounds} rounds",
        round_seconds=[round(s, 2) for s in round_seconds],
        rss_mb=[round(value / 2**20, 1) for value in rss],
        accepted_connections=metric_value(
            gateway, "chat_socket_connections_total", outcome="accepted"
        ),
        active_sockets=metric_value(gateway, "chat_active_sockets"),
        acked_ok=metric_value(
            gateway, "chat_messages_total", outcome="accepted", code=""
        ),
    )
    assert metric_value(gateway, "chat_active_sockets") == 0
    assert sockets._sockets == {}
    assert sockets._per_user == Counter()
    assert sockets._per_room == Counter()
    assert gateway.gateway.service._user_buckets == {}
    assert rooms == set()
    # The first round warms allocator pools; later rounds must not keep growing.
    # NOTE: the test process holds the clients too, so this bounds both sides.
    assert rss[-1] - rss[0] < 30 * 2**20
