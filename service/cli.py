"""The ``chat-gateway`` command: ``serve``, ``token`` and ``loadtest``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

__all__ = ["main"]

logger = logging.getLogger("chat.cli")


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the gateway (embedded MongoDB and Qdrant unless configured)",
        description="Run the gateway. Every option can also be set with its CHAT_* "
        "variable; MONGODB_URI, QDRANT_URL and REDIS_URL switch to real servers.",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument(
        "--data-dir", type=Path, help="folder for embedded data (default ./data)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes on one port (default 1; >1 needs REDIS_URL)",
    )


def _add_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "token",
        help="print a signed access token",
        description="Print an HS256 JWT for one user in one task. The secret is "
        "CHAT_JWT_SECRET, or the one `serve` created in the data dir.",
    )
    parser.add_argument(
        "--task", required=True, help="task id; the token grants only this task"
    )
    parser.add_argument("--user", required=True, help="user id (the token's sub)")
    parser.add_argument("--role", required=True, choices=["operator", "manager"])
    parser.add_argument(
        "--data-dir", type=Path, help="folder holding the secret (default ./data)"
    )
    parser.add_argument(
        "--ttl",
        type=float,
        help="lifetime in seconds (default 43200); the gateway accepts a token "
        "CHAT_TOKEN_LEEWAY_SECONDS (30) past its expiry, for clock skew",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-gateway", description="Observability-first Socket.IO chat gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_token(commands)
    try:
        from service.loadtest.cli import add_loadtest  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # the load generator is optional
        pass
    else:
        add_loadtest(commands)
    return parser


def _settings_from(args: argparse.Namespace) -> object:
    """Export the flags as CHAT_* variables, then read every setting.

    Exporting keeps one source of truth: worker processes read the same
    environment the supervisor saw.
    """
    for flag in ("host", "port", "data_dir", "workers"):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"CHAT_{flag.upper()}"] = str(value)
    from service.settings import Settings

    return Settings()


def _token(args: argparse.Namespace) -> int:
    from service.auth import SecretError, issue_token, load_secret
    from service.settings import Settings

    settings = _settings_from(args)
    assert isinstance(settings, Settings)
    try:
        secret = load_secret(settings.jwt_secret, settings.data_dir, create=False)
        ttl = args.ttl if args.ttl is not None else settings.token_ttl_seconds
        print(
            issue_token(secret, user=args.user, task=args.task, role=args.role, ttl=ttl)
        )
    except (SecretError, ValueError) as exc:
        print(f"chat-gateway token: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.auth import SecretError
    from service.embedded import EmbeddedMongoError
    from service.logs import configure_logging
    from service.server import ServeError, serve
    from service.settings import Settings

    settings = _settings_from(args)
    assert isinstance(settings, Settings)
    configure_logging(settings.log_level)
    try:
        # The OpenTelemetry SDK raises on an invalid OTEL_* limit when imported.
        from service.tracing import check_environment

        check_environment()
    except ValueError as exc:
        logger.error("cannot start: %s: fix or unset the variable", exc)
        return 2
    try:
        serve(settings)
    except (ServeError, SecretError, EmbeddedMongoError) as exc:
        logger.error("cannot start: %s", exc)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "serve":
            return _serve(args)
        handler = args.handler
        return int(handler(args))
    except ValidationError as exc:
        print(f"chat-gateway: {_explain(exc)}", file=sys.stderr)
        return 2


def _explain(exc: ValidationError) -> str:
    """Name each invalid setting by its environment variable, with its value."""
    from service.settings import env_name

    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(
            f"{env_name(field)}={error.get('input')!r} is invalid: {message}"
        )
    return "; ".join(problems)


if __name__ == "__main__":
    sys.exit(main())
