"""`chat-gateway serve` start-up failures a user meets first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.embedded import free_port

CLI = str(Path(sys.executable).with_name("chat-gateway"))


def _serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    full_env.update(env)
    return subprocess.run(
        [CLI, "serve", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_data_dir_in_use_rejected(spawn_gateway: Any, tmp_path: Path) -> None:
    """A second gateway on the same data dir stops at once and names the holder."""
    running = spawn_gateway()
    data_dir = tmp_path / "proc-0"

    result = _serve(
        "--port", str(free_port()), "--data-dir", str(data_dir), env=running.env
    )

    assert result.returncode == 2
    assert f"is in use by gateway pid {running.process.pid}" in result.stdout
    assert running.process.poll() is None


def test_port_in_use_rejected(spawn_gateway: Any, tmp_path: Path) -> None:
    """A port in use stops start-up before the gateway claims to have started."""
    running = spawn_gateway()

    result = _serve(
        "--port",
        str(running.port),
        "--data-dir",
        str(tmp_path / "other"),
        env=running.env,
    )

    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{running.port}" in result.stdout
    assert "--port" in result.stdout
    assert "chat gateway started" not in result.stdout


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "http/json",
            "must be 'grpc' or 'http/protobuf'",
        ),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "json", "must be 'grpc' or"),
        ("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "-1", "must be a non-negative integer"),
        ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "abc", "non-negative integer"),
    ],
)
def test_invalid_otel_setting_rejected(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    """An OTEL_* value tracing cannot use stops start-up with one line, exit 2."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        name: value,
    }

    result = _serve("--port", str(free_port()), "--data-dir", str(tmp_path), env=env)

    assert result.returncode == 2
    assert expected in result.stdout
    assert name in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_embedded_defaults_keep_data(spawn_gateway: Any, tmp_path: Path) -> None:
    """With no MONGODB_URI, serve runs SecantusDB itself, and data survives a restart."""
    import httpx

    from service.auth import issue_token

    data_dir = tmp_path / "embedded"
    env = {"MONGODB_URI": "", "CHAT_MONGODB_DATABASE": "chat"}
    first = spawn_gateway("--data-dir", str(data_dir), env=env)
    token = issue_token(
        first.env["CHAT_JWT_SECRET"], user="u", task="t", role="operator", ttl=60
    )
    headers = {"Authorization": f"Bearer {token}"}
    sent = httpx.post(
        f"{first.url}/api/tasks/t/messages",
        json={"client_msg_id": "keep-1", "text": "still here after a restart"},
        headers=headers,
        timeout=30,
    )
    exit_code = first.stop()

    second = spawn_gateway("--data-dir", str(data_dir), env=env)
    history = httpx.get(
        f"{second.url}/api/tasks/t/messages", headers=headers, timeout=30
    )

    assert sent.status_code == 201
    assert exit_code == 0
    assert any("started embedded SecantusDB" in line for line in first.lines())
    assert [m["client_msg_id"] for m in history.json()["messages"]] == ["keep-1"]
