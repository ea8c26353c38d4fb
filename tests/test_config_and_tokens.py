"""Settings, tokens and the CLI, without a server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from service.auth import SecretError, issue_token, load_secret, verify_token
from service.errors import Unauthorized
from service.ratelimit import TokenBucket
from service.settings import Settings

ROOT = Path(__file__).parents[1]
CLI = str(Path(sys.executable).with_name("chat-gateway"))


def _env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    choices = getattr(alias, "choices", None)
    return str(choices[0]) if choices else f"CHAT_{name.upper()}"


def test_every_setting_documented() -> None:
    """docs/configuration.md has a row for every setting."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        _env_name(name)
        for name in Settings.model_fields
        if f"| `{_env_name(name)}` |" not in text
    ]
    assert missing == []


def test_infrastructure_urls_keep_usual_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """MONGODB_URI, QDRANT_URL and REDIS_URL are read without the CHAT_ prefix."""
    monkeypatch.setenv("MONGODB_URI", "mongodb://db.example:27017")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant.example:6333")
    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6379/0")

    settings = Settings()

    assert settings.mongodb_uri == "mongodb://db.example:27017"
    assert settings.qdrant_url == "http://qdrant.example:6333"
    assert settings.redis_url == "redis://redis.example:6379/0"


def _token_with(**variables: str) -> subprocess.CompletedProcess[str]:
    """Run `chat-gateway token` with extra environment variables."""
    env = {**os.environ, "CHAT_JWT_SECRET": "s" * 40, **variables}
    return subprocess.run(
        [CLI, "token", "--task", "t", "--user", "u", "--role", "operator"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_bad_setting_explained() -> None:
    """An invalid value stops the CLI with the setting, the value and exit code 2."""
    result = _token_with(CHAT_WRITE_CONCERN="two")

    assert result.returncode == 2
    assert "CHAT_WRITE_CONCERN='two' is invalid" in result.stderr
    assert "'majority'" in result.stderr


def test_mongodb_uri_needs_scheme() -> None:
    """A MONGODB_URI without a mongodb:// scheme is rejected before any lookup."""
    result = _token_with(MONGODB_URI="notauri")

    assert result.returncode == 2
    assert "MONGODB_URI='notauri' is invalid" in result.stderr


def test_token_command_mints_verifiable_token(tmp_path: Path) -> None:
    """`token` reads the secret `serve` created in the data dir."""
    secret = load_secret("", tmp_path, create=True)
    env = {k: v for k, v in os.environ.items() if k != "CHAT_JWT_SECRET"}
    result = subprocess.run(
        [CLI, "token", "--task", "t9", "--user", "ann", "--role", "manager",
         "--data-dir", str(tmp_path), "--ttl", "60"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip

    principal = verify_token(secret, result.stdout.strip())
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])

    assert (principal.task, principal.user, principal.role) == ("t9", "ann", "manager")
    assert 55 <= claims["exp"] - time.time() <= 61
    assert oct((tmp_path / "jwt-secret").stat().st_mode & 0o777) == "0o600"


def test_token_command_without_secret(tmp_path: Path) -> None:
    """With no secret anywhere, `token` explains how to get one."""
    env = {k: v for k, v in os.environ.items() if k != "CHAT_JWT_SECRET"}
    result = subprocess.run(
        [CLI, "token", "--task", "t", "--user", "u", "--role", "operator",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip

    assert result.returncode == 2
    assert "CHAT_JWT_SECRET" in result.stderr


def test_short_secret_rejected(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="at least 32"):
        load_secret("too-short", tmp_path, create=True)


def test_token_without_exp_rejected() -> None:
    secret = "k" * 40
    token = jwt.encode({"sub": "u", "task": "t", "role": "operator"}, secret, "HS256")

    with pytest.raises(Unauthorized, match="exp"):
        verify_token(secret, token)


def test_token_with_unknown_role_rejected() -> None:
    secret = "k" * 40
    claims = {"sub": "u", "task": "t", "role": "admin", "exp": time.time() + 60}

    with pytest.raises(Unauthorized, match="role"):
        verify_token(secret, jwt.encode(claims, secret, "HS256"))


def test_token_leeway_bounds_skew() -> None:
    """A token expired 10 s ago passes with 30 s leeway and fails with none."""
    secret = "k" * 40
    claims = {"sub": "u", "task": "t", "role": "operator", "exp": int(time.time()) - 10}
    token = jwt.encode(claims, secret, "HS256")

    assert verify_token(secret, token, leeway=30).user == "u"
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(secret, token, leeway=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "admin"}, "role must be one of"),
        ({"ttl": 0}, "ttl must be a positive"),
        ({"task": ""}, "task must be 1 to 128"),
        ({"user": "a\nb"}, "user must be 1 to 128 printable"),
    ],
)
def test_issue_token_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "user": "u",
        "task": "t",
        "role": "operator",
        "ttl": 60,
    }
    values.update(kwargs)

    with pytest.raises(ValueError, match=message):
        issue_token("k" * 40, **values)  # type: ignore[arg-type]


def test_token_bucket_burst_then_refill() -> None:
    bucket = TokenBucket(burst=3, rate=50)

    taken = [bucket.take() for _ in range(4)]
    time.sleep(0.05)

    assert taken == [True, True, True, False]
    assert bucket.take() is True
