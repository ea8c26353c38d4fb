"""The gateway against a client written outside this repository.

``tests/js/two_clients.mjs`` runs under Node with the official socket.io-client
npm package from ``node_modules`` (``npm ci``), so the protocol side of the
client is the Socket.IO project's code, not ours.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.page import SOCKETIO_CLIENT_JS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "js" / "two_clients.mjs"
TASK = "T-2001"


def run_clients(*arguments: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH: install Node.js 18 or later")
    if not SOCKETIO_CLIENT_JS.exists():
        pytest.fail(f"{SOCKETIO_CLIENT_JS} not found: run `npm ci`")
    return subprocess.run(
        [node, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_js_clients_chat_both_ways(gateway_factory: Any, mongo: Any) -> None:
    """An operator and a manager on socket.io-client each get the other's message."""
    gateway = gateway_factory(indexing_enabled=False)

    result = run_clients(
        "--url", gateway.url,
        "--operator-token", gateway.token(TASK, "olga", "operator"),
        "--manager-token", gateway.token(TASK, "max", "manager"),
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    assert summary["socket_io_client"].startswith("4.")
    for role, user in (("operator", "olga"), ("manager", "max")):
        side = summary[role]
        assert side["ack"]["ok"] is True
        assert "duplicate" not in side["ack"]
        assert side["retry_ack"] == {**side["ack"], "duplicate": True}
        assert side["received_other"] is True
        own = [
            m
            for m in side["received"]
            if m["client_msg_id"] == side["sent"]["client_msg_id"]
        ]
        assert own == [
            {
                "id": side["ack"]["id"],
                "client_msg_id": side["sent"]["client_msg_id"],
                "sender": user,
                "role": role,
                "task_id": TASK,
            }
        ]
    assert len(summary["operator"]["received"]) == 2
    assert len(summary["manager"]["received"]) == 2
    stored = mongo[gateway.database].messages
    assert stored.count_documents({"task_id": TASK}) == 2


def test_js_client_rejected_token(gateway_factory: Any) -> None:
    """A token the gateway did not sign fails the connect with its code."""
    gateway = gateway_factory(indexing_enabled=False)

    result = run_clients(
        "--url", gateway.url,
        "--operator-token", "not-a-jwt",
        "--manager-token", gateway.token(TASK, "max", "manager"),
        "--timeout-ms", "5000",
    )  # fmt: skip

    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is False
    assert summary["error"].startswith("operator could not connect: unauthorized:")
