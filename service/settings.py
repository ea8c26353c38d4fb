"""Gateway settings, read from the environment (12-factor).

Every field can be set by an environment variable: the ones a user points at
real infrastructure keep their usual names (``MONGODB_URI``, ``QDRANT_URL``,
``REDIS_URL``, ``GOOGLE_API_KEY``), the rest take the ``CHAT_`` prefix. The
``OTEL_*`` variables are read by OpenTelemetry itself (see ``service.tracing``).
Empty infrastructure URLs mean "start the embedded default".
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MIN_SECRET_BYTES", "Settings", "env_name"]

#: HS256 keys shorter than the hash output (32 bytes) weaken the MAC (RFC 7518, 3.2).
MIN_SECRET_BYTES = 32


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


class Settings(BaseSettings):
    """Configuration of one gateway process."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", extra="ignore")

    # Where things run.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    workers: int = Field(default=1, ge=1, le=64)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    # Infrastructure; empty means the embedded default.
    mongodb_uri: str = Field(default="", validation_alias=_env("MONGODB_URI"))
    mongodb_database: str = "chat"
    qdrant_url: str = Field(default="", validation_alias=_env("QDRANT_URL"))
    qdrant_api_key: str = Field(default="", validation_alias=_env("QDRANT_API_KEY"))
    qdrant_collection: str = "chat_messages"
    redis_url: str = Field(default="", validation_alias=_env("REDIS_URL"))

    # Access tokens.
    jwt_secret: str = ""
    token_ttl_seconds: int = Field(default=12 * 3600, gt=0)
    token_leeway_seconds: float = Field(default=30.0, ge=0, le=300)

    # Hot path: validation and limits.
    max_text_chars: int = Field(default=4000, ge=1)
    max_client_msg_id_chars: int = Field(default=64, ge=1, le=256)
    # Engine.IO closes a socket that sends a bigger frame; smaller oversized
    # payloads get an error ack from validation instead.
    max_frame_bytes: int = Field(default=1_000_000, ge=16 * 1024)
    rate_limit_burst: float = Field(default=20, gt=0)
    rate_limit_per_second: float = Field(default=10, gt=0)
    user_rate_limit_burst: float = Field(default=40, gt=0)
    user_rate_limit_per_second: float = Field(default=20, gt=0)
    max_sockets_per_user: int = Field(default=8, ge=1)
    max_sockets: int = Field(default=20000, ge=1)
    allow_polling: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    index_text_in_spans: bool = False

    # MongoDB writer.
    write_concern: str = "1"
    # j=true: the server writes its journal to disk before it acknowledges, so
    # an acked message survives a crash of the database process. With j unset,
    # SecantusDB 0.7 lost messages acked a few ms before a SIGKILL.
    write_journal: bool | None = True
    batch_window_ms: float = Field(default=2.0, ge=0, le=1000)
    batch_max: int = Field(default=256, ge=1, le=10000)
    writer_queue_max: int = Field(default=5000, ge=1)
    # One writer keeps fan-out in arrival order; the next batch fills while a
    # write is in flight. More help only a store that takes writes in parallel.
    writer_concurrency: int = Field(default=1, ge=1, le=32)
    mongo_timeout_seconds: float = Field(default=2.0, gt=0)
    drain_timeout_seconds: float = Field(default=10.0, gt=0)

    # Semantic indexing.
    indexing_enabled: bool = True
    embedder: Literal["local", "google"] = "local"
    google_api_key: str = Field(default="", validation_alias=_env("GOOGLE_API_KEY"))
    google_base_url: str = "https://generativelanguage.googleapis.com"
    google_model: str = "gemini-embedding-001"
    google_dimension: int | None = Field(default=None, ge=1)
    index_queue_max: int = Field(default=10000, ge=1)
    index_batch_max: int = Field(default=32, ge=1, le=100)
    index_retry_seconds: float = Field(default=5.0, gt=0)
    reconcile_interval_seconds: float = Field(default=15.0, gt=0)

    # Telemetry.
    log_level: str = "INFO"
    log_mongo_writes: Literal["all", "sample", "off"] = "sample"
    log_mongo_writes_sample_rate: float = Field(default=0.01, ge=0, le=1)
    runtime_log_interval_seconds: float = Field(default=5.0, gt=0)
    memory_limit_bytes: int | None = Field(default=None, gt=0)
    jaeger_ui_url: str = ""

    # The Socket.IO client file the chat page loads. Unset means the copy that
    # `npm ci` installs under node_modules/ in the repository.
    socketio_client_js: Path | None = None

    @field_validator("mongodb_uri")
    @classmethod
    def _check_mongodb_uri(cls, value: str) -> str:
        if value and not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError(
                "a MongoDB connection string starts with mongodb:// or mongodb+srv://"
            )
        return value

    @field_validator("write_concern")
    @classmethod
    def _check_write_concern(cls, value: str) -> str:
        if value == "majority" or value.isdigit():
            return value
        raise ValueError(
            f"write concern must be a number of nodes or 'majority', not {value!r}"
        )

    @property
    def write_concern_w(self) -> int | str:
        """Return ``w`` for PyMongo's ``WriteConcern``."""
        return int(self.write_concern) if self.write_concern.isdigit() else "majority"


def env_name(field: str) -> str:
    """Return the environment variable that sets a settings field."""
    info = Settings.model_fields.get(field)
    if info is None:
        return field  # errors name aliased fields by their variable already
    choices = getattr(info.validation_alias, "choices", None)
    return str(choices[0]) if choices else f"CHAT_{field.upper()}"
