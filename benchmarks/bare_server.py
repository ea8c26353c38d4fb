"""A bare python-socketio server: the ceiling of this stack on this machine.

Same uvicorn and python-socketio setup as the gateway (ASGI, websocket only,
the websockets-sansio protocol), but ``send_message`` only acks and emits to
the room: no validation, rate limits, MongoDB write, metrics or tracing. The
token's ``task`` claim is read without checking its signature, only to pick
the room, so the same load generator drives both servers.

Run: ``python -m benchmarks.bare_server --port 8001``
"""

from __future__ import annotations

import argparse
import itertools
import os
from datetime import UTC, datetime
from typing import Any

import jwt
import socketio
import uvicorn

_ids = itertools.count()
_PROCESS_TAG = os.urandom(6).hex()


def create_app() -> Any:
    sio = socketio.AsyncServer(
        async_mode="asgi",
        transports=["websocket"],
        cors_allowed_origins=[],
        logger=False,
        engineio_logger=False,
    )
    principals: dict[str, dict[str, Any]] = {}

    @sio.on("connect")
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = auth.get("token", "") if isinstance(auth, dict) else ""
        claims = jwt.decode(token, options={"verify_signature": False})
        principals[sid] = claims
        await sio.enter_room(sid, f"task:{claims['task']}")

    @sio.on("disconnect")
    async def disconnect(sid: str, reason: Any = None) -> None:
        principals.pop(sid, None)

    @sio.on("send_message")
    async def send_message(sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        claims = principals[sid]
        # The same fields and sizes as the gateway's `message` event and ack.
        created = datetime.now(UTC).isoformat(timespec="milliseconds")
        view = {
            "id": f"{_PROCESS_TAG}{next(_ids):012x}",
            "task_id": claims["task"],
            "sender": claims["sub"],
            "role": claims["role"],
            "client_msg_id": payload["client_msg_id"],
            "text": payload["text"],
            "created_at": created.replace("+00:00", "Z"),
        }
        await sio.emit("message", view, room=f"task:{claims['task']}")
        return {"ok": True, "id": view["id"], "created_at": view["created_at"]}

    return socketio.ASGIApp(sio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--ws",
        default="websockets-sansio",
        choices=["websockets-sansio", "websockets", "wsproto"],
        help="uvicorn's websocket protocol (the gateway uses websockets-sansio)",
    )
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        ws=args.ws,
    )


if __name__ == "__main__":
    main()
