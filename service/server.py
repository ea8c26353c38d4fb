"""Running the app under uvicorn: one process, or N workers on one port.

Each process drains on SIGTERM before uvicorn closes its sockets (see
``Gateway.install_signal_handlers``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import IO, Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from service.auth import load_secret
from service.embedded import EmbeddedMongo
from service.settings import Settings

__all__ = ["ServeError", "serve"]

logger = logging.getLogger("chat.server")


class ServeError(RuntimeError):
    """The settings do not allow the requested way of serving."""


def _uvicorn_config(app: Any, settings: Settings, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws="websockets-sansio",
        # Engine.IO enforces its own frame limit; let slightly bigger frames
        # through uvicorn so that Engine.IO, not the socket layer, decides.
        ws_max_size=settings.max_frame_bytes + 1024,
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds) + 5,
        **extra,
    )


def serve(settings: Settings) -> None:
    """Serve the gateway until a signal stops it."""
    load_secret(settings.jwt_secret, settings.data_dir, create=True)
    lock = _lock_data_dir(settings.data_dir)
    try:
        if settings.workers == 1:
            _serve_one(settings)
        else:
            _serve_workers(settings)
    finally:
        lock.close()


def _serve_one(settings: Settings) -> None:
    from service.app import create_app

    # Bind before the app starts, so a port in use fails at once and clearly.
    listener = _bind(settings)
    # uvicorn re-raises the stopping signal once it has shut down. Exiting
    # with 0 then shows process managers that the shutdown was clean.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, _exit_cleanly)
    config = _uvicorn_config(create_app(settings), settings)
    uvicorn.Server(config).run(sockets=[listener])


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir for as long as this process serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "gateway.lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ServeError(
            f"the data dir {data_dir} is in use by {holder}: stop that gateway, "
            "or pass another --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"gateway pid {os.getpid()}\n")
    handle.flush()
    return handle


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
    except OSError as exc:
        listener.close()
        raise ServeError(
            f"cannot listen on {settings.host}:{settings.port} ({exc.strerror}): "
            "pass another --port, or set CHAT_PORT"
        ) from None
    listener.set_inheritable(True)
    return listener


def _exit_cleanly(number: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _check_workers(settings: Settings) -> None:
    if not settings.redis_url:
        raise ServeError(
            f"--workers {settings.workers} needs REDIS_URL: the workers share rooms "
            "through Redis, or an operator and a manager on different workers would "
            "not see each other's messages"
        )
    if settings.indexing_enabled and not settings.qdrant_url:
        raise ServeError(
            f"--workers {settings.workers} needs QDRANT_URL: Qdrant's local mode lets "
            "one process open its folder. Set QDRANT_URL, or CHAT_INDEXING_ENABLED=false"
        )


def _serve_workers(settings: Settings) -> None:
    _check_workers(settings)
    embedded = None
    if not settings.mongodb_uri:
        # One embedded server for all workers, owned by this supervisor.
        embedded = EmbeddedMongo(settings.data_dir / "secantusdb")
        embedded.start()
        os.environ["MONGODB_URI"] = embedded.gateway_uri

    multiproc = settings.data_dir / "prometheus-multiproc"
    shutil.rmtree(multiproc, ignore_errors=True)
    multiproc.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    os.environ["CHAT_WORKERS"] = str(settings.workers)
    metrics_server = _start_supervisor_metrics(settings)

    config = _uvicorn_config(
        "service.app:create_app_from_env",
        settings,
        factory=True,
        workers=settings.workers,
    )
    listener = _bind(settings)
    logger.info(
        "starting workers",
        extra={
            "workers": settings.workers,
            "host": settings.host,
            "port": settings.port,
        },
    )
    try:
        Multiprocess(config, sockets=[listener]).run()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if embedded is not None:
            embedded.stop()


def _start_supervisor_metrics(settings: Settings) -> Any:
    if settings.metrics_port is None:
        return None
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(settings.metrics_port, settings.host, registry)
    logger.info("serving metrics of all workers", extra={"port": settings.metrics_port})
    return server
