"""The browser chat page: ``/``, its files under ``/static``, and ``/api/config``.

The page's own code lives in ``service/static``. The Socket.IO client it loads
is not copied into this repository: ``/static/vendor/socket.io.min.js`` serves
the file that ``npm ci`` installs from the ``socket.io-client`` package, or the
file ``CHAT_SOCKETIO_CLIENT_JS`` names.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from service.settings import Settings

__all__ = ["SOCKETIO_CLIENT_JS", "STATIC_DIR", "install_page"]

logger = logging.getLogger("chat.page")

STATIC_DIR = Path(__file__).parent / "static"
SOCKETIO_CLIENT_JS = (
    Path(__file__).resolve().parents[1]
    / "node_modules"
    / "socket.io-client"
    / "dist"
    / "socket.io.min.js"
)

# The page sets message text with textContent only. This policy is a second
# line of defence: it blocks inline and third-party scripts. CSP Level 3 lets
# 'self' in connect-src match ws: and wss: on the page's own host and port, and
# the browser tests run the page under this policy.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


class PageConfig(BaseModel):
    jaeger_ui_url: str | None = Field(
        description="Base URL of the Jaeger UI (CHAT_JAEGER_UI_URL), or null when "
        "unset. The page links each message's trace to {jaeger_ui_url}/trace/{trace_id}."
    )
    max_text_chars: int = Field(
        description="The maximum message length in characters (CHAT_MAX_TEXT_CHARS)."
    )


def _missing_client(path: Path) -> PlainTextResponse:
    return PlainTextResponse(
        f"the Socket.IO client is missing: {path} does not exist. Run `npm ci` in "
        "the repository root, or set CHAT_SOCKETIO_CLIENT_JS to the socket.io.min.js "
        "file of the socket.io-client 4.x npm package",
        status_code=404,
    )


def install_page(api: FastAPI, settings: Settings) -> None:
    """Add the chat page, its static files and its config route to ``api``."""
    client_js = settings.socketio_client_js or SOCKETIO_CLIENT_JS
    vendor_files = {
        client_js.name: client_js,
        client_js.name + ".map": client_js.with_name(client_js.name + ".map"),
    }
    if not client_js.is_file():
        logger.warning(
            "the chat page cannot connect because the Socket.IO client %s does "
            "not exist: run `npm ci` or set CHAT_SOCKETIO_CLIENT_JS",
            client_js,
        )

    @api.get(
        "/api/config",
        response_model=PageConfig,
        summary="Read the settings the chat page needs (no token required)",
    )
    async def page_config() -> PageConfig:
        return PageConfig(
            jaeger_ui_url=settings.jaeger_ui_url.rstrip("/") or None,
            max_text_chars=settings.max_text_chars,
        )

    # Registered before the /static mount, so these paths reach this route.
    @api.get("/static/vendor/{name}", include_in_schema=False)
    async def vendor_file(request: Request, name: str) -> Response:
        path = vendor_files.get(name)
        if path is None:
            return PlainTextResponse(f"{request.url.path} not found", status_code=404)
        if not path.is_file():
            return _missing_client(path)
        is_map = name.endswith(".map")
        return FileResponse(
            path, media_type="application/json" if is_map else "text/javascript"
        )

    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @api.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )
