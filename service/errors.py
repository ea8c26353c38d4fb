"""Errors the gateway reports to clients, each with a stable code.

The tree::

    ChatError                 code, message; becomes an error ack or an HTTP error
    ├── InvalidPayload        invalid_payload     400
    ├── TextTooLong           text_too_long       413
    ├── Unauthorized          unauthorized        401
    ├── Forbidden             forbidden           403
    ├── RateLimited           rate_limited        429
    ├── Overloaded            overloaded          503
    └── StoreUnavailable      store_unavailable   503

Clients match on ``code``; ``message`` is for people and says what failed, on
which value, and what to do.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERROR_CODES",
    "ChatError",
    "Forbidden",
    "InvalidPayload",
    "Overloaded",
    "RateLimited",
    "StoreUnavailable",
    "TextTooLong",
    "Unauthorized",
]


class ChatError(Exception):
    """An error with a stable code, reported to the client that caused it."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_ack(self) -> dict[str, Any]:
        """Return the Socket.IO error ack for this error."""
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


class InvalidPayload(ChatError):
    code = "invalid_payload"
    http_status = 400


class TextTooLong(ChatError):
    code = "text_too_long"
    http_status = 413


class Unauthorized(ChatError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ChatError):
    code = "forbidden"
    http_status = 403


class RateLimited(ChatError):
    code = "rate_limited"
    http_status = 429


class Overloaded(ChatError):
    code = "overloaded"
    http_status = 503


class StoreUnavailable(ChatError):
    code = "store_unavailable"
    http_status = 503


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        InvalidPayload,
        TextTooLong,
        Unauthorized,
        Forbidden,
        RateLimited,
        StoreUnavailable,
        Overloaded,
    )
)
