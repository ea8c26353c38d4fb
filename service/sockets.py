"""The Socket.IO side: authenticated connects, rooms, and the ``send_message`` event.

A client connects to the default namespace with ``auth: {token}``. The token
decides the socket's task and role; the socket joins the room ``task:<id>``
and nothing else. Events other than ``send_message`` are counted and dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import socketio

from service.auth import Principal, verify_token
from service.errors import ChatError, InvalidPayload
from service.messages import MessageService
from service.metrics import Metrics
from service.ratelimit import TokenBucket
from service.settings import Settings

__all__ = ["SocketGateway", "create_socket_server"]

logger = logging.getLogger("chat.sockets")


@dataclass(slots=True)
class _SocketState:
    principal: Principal
    bucket: TokenBucket


class _JsonOnlyPacket(socketio.packet.Packet):  # type: ignore[misc]  # untyped
    """A Socket.IO packet that must not announce binary attachments.

    The chat protocol is JSON only. python-socketio 5.18 keeps every attachment
    a binary event announces (up to 10 digits of them) until the last arrives,
    so one socket could make the server hold any amount of memory.
    """

    def decode(self, encoded_packet: Any) -> int:
        attachments = int(super().decode(encoded_packet) or 0)
        if attachments:
            raise ValueError(
                f"a packet announced {attachments} binary attachments; "
                "send_message takes JSON only"
            )
        return attachments


def create_socket_server(settings: Settings) -> socketio.AsyncServer:
    """Build the python-socketio server, with Redis fan-out when REDIS_URL is set."""
    manager = None
    if settings.redis_url:
        manager = socketio.AsyncRedisManager(settings.redis_url)
    transports = ["polling", "websocket"] if settings.allow_polling else ["websocket"]
    return socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        serializer=_JsonOnlyPacket,
        transports=transports,
        # None allows only the origin that the Host header names. python-socketio
        # reads an empty list as "check no Origin at all", so never pass one.
        cors_allowed_origins=settings.cors_origins or None,
        max_http_buffer_size=settings.max_frame_bytes,
        logger=False,
        engineio_logger=False,
    )


class SocketGateway:
    """Connect/disconnect bookkeeping and the ``send_message`` handler."""

    def __init__(
        self,
        sio: socketio.AsyncServer,
        settings: Settings,
        metrics: Metrics,
        service: MessageService,
        secret: str,
    ) -> None:
        self.sio = sio
        self._settings = settings
        self._metrics = metrics
        self._service = service
        self._secret = secret
        self._sockets: dict[str, _SocketState] = {}
        self._per_user: Counter[str] = Counter()
        self._per_room: Counter[str] = Counter()
        sio.on("connect", self.connect)
        sio.on("disconnect", self.disconnect)
        sio.on("send_message", self.send_message)
        sio.on("*", self.other_event)

    @property
    def active(self) -> int:
        return len(self._sockets)

    def room_size(self, room: str) -> int:
        """Return how many of this process's sockets are in ``room``."""
        return self._per_room[room]

    def _reject(
        self, code: str, message: str, **fields: Any
    ) -> socketio.exceptions.ConnectionRefusedError:
        self._metrics.connections.labels(outcome="rejected").inc()
        logger.info(
            "connection refused", extra={"code": code, "reason": message, **fields}
        )
        return socketio.exceptions.ConnectionRefusedError(message, {"code": code})

    async def connect(
        self, sid: str, environ: Any = None, auth: Any = None, *_: Any
    ) -> None:
        if sid in self._sockets:
            # python-socketio also calls this handler for a client event named
            # "connect". A connected socket that sends one joins no second room.
            await self.other_event("connect", sid)
            return
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            principal = verify_token(
                self._secret, token, leeway=self._settings.token_leeway_seconds
            )
        except ChatError as error:
            raise self._reject(error.code, error.message, sid=sid) from None

        if len(self._sockets) >= self._settings.max_sockets:
            raise self._reject(
                "overloaded",
                f"the gateway holds its maximum of {self._settings.max_sockets} sockets: "
                "retry later or connect to another instance",
                sid=sid,
            )
        if self._per_user[principal.user] >= self._settings.max_sockets_per_user:
            raise self._reject(
                "rate_limited",
                f"user {principal.user!r} already has {self._settings.max_sockets_per_user} "
                "sockets open: close one first",
                sid=sid,
                user=principal.user,
            )

        self._sockets[sid] = _SocketState(
            principal,
            TokenBucket(
                self._settings.rate_limit_burst, self._settings.rate_limit_per_second
            ),
        )
        self._per_user[principal.user] += 1
        self._per_room[principal.room] += 1
        await self.sio.enter_room(sid, principal.room)
        self._metrics.connections.labels(outcome="accepted").inc()
        self._metrics.active_sockets.set(len(self._sockets))
        logger.debug(
            "socket connected",
            extra={"sid": sid, "task_id": principal.task, "user": principal.user},
        )

    async def disconnect(self, sid: str, reason: Any = None, *_: Any) -> None:
        if self.sio.manager.is_connected(sid, "/"):
            # python-socketio marks a socket as leaving before it calls this
            # handler, so a socket still connected sent a "disconnect" event.
            await self.other_event("disconnect", sid)
            return
        state = self._sockets.pop(sid, None)
        if state is None:
            return
        user, room = state.principal.user, state.principal.room
        self._per_user[user] -= 1
        if self._per_user[user] <= 0:
            del self._per_user[user]
            self._service.forget_user(user)
        self._per_room[room] -= 1
        if self._per_room[room] <= 0:
            del self._per_room[room]
        self._metrics.active_sockets.set(len(self._sockets))
        logger.debug("socket disconnected", extra={"sid": sid, "reason": str(reason)})

    async def send_message(self, sid: str, *args: Any) -> dict[str, Any]:
        state = self._sockets.get(sid)
        if state is None:
            return InvalidPayload("this socket is not connected: reconnect").to_ack()
        if len(args) != 1:
            error = InvalidPayload(
                f"send_message takes one payload object, got {len(args)} arguments"
            )
            return self._service.reject(state.principal, error, client_id=sid)
        return await self._service.handle(
            state.principal, args[0], socket_bucket=state.bucket, client_id=sid
        )

    async def other_event(self, event: str, sid: str = "", *args: Any) -> None:
        # python-socketio passes a client event named "*" without its name, so
        # then ``event`` is the sid and ``sid`` the first argument, if any.
        self._metrics.events_ignored.labels(reason="unknown_event").inc()
        logger.debug(
            "ignored unknown event", extra={"sid": sid, "event": str(event)[:64]}
        )

    async def fanout(self, room: str, view: dict[str, Any]) -> int:
        """Emit an accepted message to its room; return this process's socket count."""
        await self.sio.emit("message", view, room=room)
        return self._per_room[room]
