"""Signed access tokens: HS256 JWTs that name one user, one task and one role.

The task and role come only from the token, never from a message, so a socket
can reach nothing but its own task.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jwt

from service.errors import Unauthorized
from service.settings import MIN_SECRET_BYTES

__all__ = [
    "ROLES",
    "Principal",
    "SecretError",
    "issue_token",
    "load_secret",
    "verify_token",
]

logger = logging.getLogger("chat.auth")

Role = Literal["operator", "manager"]
ROLES: tuple[Role, ...] = ("operator", "manager")
_SECRET_FILE = "jwt-secret"  # noqa: S105 - a file name, not a secret
_MAX_ID_CHARS = 128


class SecretError(RuntimeError):
    """The signing secret is missing or too short."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified identity behind a socket or request."""

    user: str
    task: str
    role: Role

    @property
    def room(self) -> str:
        return f"task:{self.task}"


def _check_secret(secret: str, source: str) -> str:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise SecretError(
            f"the JWT secret from {source} is {len(secret.encode())} bytes; "
            f"HS256 needs at least {MIN_SECRET_BYTES}. Set CHAT_JWT_SECRET to a "
            "longer random value, e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'`"
        )
    return secret


def load_secret(configured: str, data_dir: Path, *, create: bool) -> str:
    """Return the signing secret: ``CHAT_JWT_SECRET`` or the data dir's file.

    With ``create``, a missing file is made with a fresh random secret, readable
    by this user only.
    """
    if configured:
        return _check_secret(configured, "CHAT_JWT_SECRET")

    path = data_dir / _SECRET_FILE
    if path.exists():
        return _check_secret(path.read_text().strip(), str(path))
    if not create:
        raise SecretError(
            f"no JWT secret: CHAT_JWT_SECRET is not set and {path} does not exist. "
            "Start `chat-gateway serve` with this --data-dir once, or set "
            "CHAT_JWT_SECRET"
        )

    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    logger.info("created a JWT signing secret", extra={"path": str(path)})
    return secret


def _check_id(kind: str, value: str) -> str:
    if not value or len(value) > _MAX_ID_CHARS or not value.isprintable():
        raise ValueError(
            f"{kind} must be 1 to {_MAX_ID_CHARS} printable characters, not {value!r}"
        )
    return value


def issue_token(secret: str, *, user: str, task: str, role: str, ttl: float) -> str:
    """Return a signed token for ``user`` in ``task`` that expires in ``ttl`` s."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    now = int(time.time())
    claims = {
        "sub": _check_id("user", user),
        "task": _check_id("task", task),
        "role": role,
        "iat": now,
        "exp": now + int(ttl),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: object, *, leeway: float = 30.0) -> Principal:
    """Verify ``token`` and return its principal, or raise ``Unauthorized``."""
    if not isinstance(token, str) or not token:
        raise Unauthorized(
            "missing access token: connect with auth {token: '<JWT>'} or an "
            "'Authorization: Bearer <JWT>' header; `chat-gateway token` mints one"
        )
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=leeway,
            options={"require": ["exp", "sub", "task", "role"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("access token expired: mint a new one") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"invalid access token: {exc}") from None

    user, task, role = claims["sub"], claims["task"], claims["role"]
    if not all(isinstance(v, str) and v for v in (user, task)) or role not in ROLES:
        raise Unauthorized(
            f"invalid access token: claims sub and task must be strings and role "
            f"one of {', '.join(ROLES)}, got role {role!r}"
        )
    return Principal(user=user, task=task, role=role)
