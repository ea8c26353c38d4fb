"""Running the app under uvicorn: one process, or N workers on one port.

Each process drains on SIGTERM before uvicorn closes its sockets (see
``Gateway.install_signal_handlers``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from types import FrameType
from typing import Any

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
    if settings.workers == 1:
        from service.app import create_app

        # uvicorn re-raises the stopping signal once it has shut down; exiting
        # with 0 then tells process managers that the shutdown was clean.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, _exit_cleanly)
        uvicorn.Server(_uvicorn_config(create_app(settings), settings)).run()
        return
    _serve_workers(settings)


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
        os.environ["MONGODB_URI"] = embedded.uri

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
    listener = config.bind_socket()
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
