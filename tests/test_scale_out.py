"""Several gateway processes sharing rooms through a real redis-server."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.embedded import free_port
from tests.conftest import Client, GatewayProcess, eventually


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server (Debian's) on a free loopback port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: `make tools` installs it")
        pytest.skip("redis-server is not installed (`make tools` installs it)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(10)


def _counter(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return 0.0


def _token(process: GatewayProcess, task: str, user: str, role: str) -> str:
    from service.auth import issue_token

    secret = process.env["CHAT_JWT_SECRET"]
    return issue_token(secret, user=user, task=task, role=role, ttl=600)


async def test_two_instances_share_rooms(
    spawn_gateway: Any, redis_url: str, mongo: Any
) -> None:
    """An operator on one instance and a manager on another chat both ways."""
    env = {"REDIS_URL": redis_url, "CHAT_INDEXING_ENABLED": "false"}
    first = spawn_gateway(env=env)
    env["CHAT_MONGODB_DATABASE"] = first.env["CHAT_MONGODB_DATABASE"]
    second = spawn_gateway(env=env)
    operator = await Client(
        first.url, _token(first, "t1", "olga", "operator")
    ).connect()
    manager = await Client(second.url, _token(second, "t1", "max", "manager")).connect()
    try:
        ack_a = await operator.send("hello from instance one", "x-1")
        ack_b = await manager.send("hello from instance two", "x-2")
        await operator.wait_for(2)
        await manager.wait_for(2)
    finally:
        await operator.close()
        await manager.close()

    assert ack_a["ok"] is True
    assert ack_b["ok"] is True
    assert [m["client_msg_id"] for m in operator.received] == ["x-1", "x-2"]
    assert [m["client_msg_id"] for m in manager.received] == ["x-1", "x-2"]
    stored = mongo[first.env["CHAT_MONGODB_DATABASE"]].messages
    assert stored.count_documents({"client_msg_id": "x-1"}) == 1
    assert stored.count_documents({"client_msg_id": "x-2"}) == 1


async def test_two_workers_report_correct_totals(
    spawn_gateway: Any, redis_url: str
) -> None:
    """With --workers 2, any scrape of /metrics shows the totals of both workers."""
    process = spawn_gateway(
        "--workers", "2", env={"REDIS_URL": redis_url, "CHAT_INDEXING_ENABLED": "false"}
    )

    def worker_pids() -> set[str]:
        return {
            line.split('pid="')[1].split('"')[0]
            for line in httpx.get(f"{process.url}/metrics").text.splitlines()
            if line.startswith("process_resident_memory_bytes{")
        }

    await eventually(lambda: len(worker_pids()) == 2, timeout=30)
    clients = [
        await Client(
            process.url, _token(process, f"w{n % 4}", f"user{n}", "operator")
        ).connect()
        for n in range(8)
    ]
    try:
        for round_number in range(5):
            await asyncio.gather(
                *(
                    c.send("counted", f"c{i}-{round_number}")
                    for i, c in enumerate(clients)
                )
            )
        await clients[0].sio.call("send_message", "junk")
        scrapes = [httpx.get(f"{process.url}/metrics").text for _ in range(6)]
    finally:
        for client in clients:
            await client.close()

    for text in scrapes:
        assert _counter(text, "chat_messages_total", outcome="accepted") == 40
        assert (
            _counter(
                text, "chat_messages_total", outcome="rejected", code="invalid_payload"
            )
            == 1
        )
        assert _counter(text, "chat_active_sockets") == 8
        assert _counter(text, "chat_mongo_write_batch_size_sum") == 40

    async def sockets_closed() -> bool:
        return (
            _counter(httpx.get(f"{process.url}/metrics").text, "chat_active_sockets")
            == 0
        )

    await eventually(sockets_closed, timeout=10)


def test_workers_need_redis(tmp_path: Path) -> None:
    """--workers 2 without REDIS_URL stops at once with the reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS"))}
    env["CHAT_JWT_SECRET"] = "s" * 40
    result = subprocess.run(
        [str(Path(os.sys.executable).with_name("chat-gateway")), "serve", "--workers", "2",
         "--data-dir", str(tmp_path), "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip

    assert result.returncode == 2
    assert "needs REDIS_URL" in result.stdout + result.stderr
