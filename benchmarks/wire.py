"""Bytes on the wire per chat message, measured and computed from the frames.

One task's operator and manager connect to a ``chat-gateway serve``
subprocess, each through its own byte-counting TCP relay on 127.0.0.1. The
operator sends messages one at a time and waits for its ack, its own copy of
the ``message`` event (the room includes the sender) and the manager's copy.
The relays count TCP payload bytes in each direction: Engine.IO/Socket.IO
packets plus WebSocket frame headers (RFC 6455: 2 bytes, 4 for payloads of
126 to 65535 bytes, and a 4-byte mask on client frames).

The same bytes are also computed from the text of each packet the clients
sent and received, so the two figures check each other when no compression
is negotiated. With ``deflate``, the measured figure is what permessage-deflate
(as browsers negotiate it) saves.

IP and TCP headers are not in the relay's count. On loopback each frame goes
out in its own segment because asyncio sets TCP_NODELAY. That adds 52 bytes
per frame with IPv4 and the TCP timestamp option, plus any pure ACK segments.

Run: ``python -m benchmarks.wire`` (about 30 seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness
from service.auth import issue_token

_TCP_IP_HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamp option 12
# Each message is a fresh draw of these words, so that permessage-deflate, which
# remembers earlier messages, compresses about as well as it would real chat.
_WORDS = [
    "the",
    "customer",
    "cannot",
    "sign",
    "in",
    "since",
    "this",
    "morning",
    "and",
    "the",
    "reset",
    "link",
    "fails",
    "please",
    "check",
    "order",
    "invoice",
    "payment",
    "account",
    "error",
    "page",
    "again",
    "after",
    "we",
    "restarted",
    "service",
    "yesterday",
    "looks",
    "like",
    "timeout",
    "on",
    "mobile",
    "app",
    "version",
    "ticket",
    "escalated",
    "manager",
    "approved",
    "refund",
    "shipping",
    "delayed",
    "warehouse",
    "tomorrow",
    "thanks",
    "update",
    "status",
    "priority",
    "urgent",
    "screenshot",
    "attached",
]


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:size]


@dataclass
class _Relay:
    """A TCP relay for one connection that counts the bytes in each direction."""

    target_port: int
    up: int = 0  # client to server
    down: int = 0  # server to client
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    server: Any = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        target_reader, target_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self.tasks += [
            asyncio.create_task(self._pipe(reader, target_writer, "up")),
            asyncio.create_task(self._pipe(target_reader, writer, "down")),
        ]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if way == "up":
                    self.up += len(chunk)
                else:
                    self.down += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.server.close()


def _frame_bytes(payload: str, *, masked: bool) -> int:
    """Return the size of a WebSocket text frame carrying ``payload``."""
    size = len(payload.encode())
    header = 2
    if size > 65535:
        header = 10
    elif size > 125:
        header = 4
    if masked:
        header += 4
    return size + header


@dataclass
class _Client:
    """A raw Engine.IO client that records the packets it sends and receives."""

    name: str
    socket: Any = None
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    inbox: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None

    async def connect(self, url: str, token: str, deflate: bool) -> None:
        from websockets.asyncio.client import connect

        self.socket = await connect(
            url, compression="deflate" if deflate else None, ping_interval=None
        )
        await self.socket.recv()  # the Engine.IO open packet
        await self.socket.send("40" + json.dumps({"token": token}))
        reply = str(await self.socket.recv())
        if not reply.startswith("40"):
            raise RuntimeError(f"the gateway rejected the {self.name}: {reply[:200]}")
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            await self._read_frames()

    async def _read_frames(self) -> None:
        async for frame in self.socket:
            text = str(frame)
            # An Engine.IO ping: reply, and keep it out of the recorded packets.
            if text == "2":
                await self.socket.send("3")
                continue
            self.received.append(text)
            await self.inbox.put(text)

    async def send(self, packet: str) -> None:
        self.sent.append(packet)
        await self.socket.send(packet)

    def computed(self) -> tuple[int, int]:
        """Return (up, down) frame bytes computed from the recorded packets."""
        up = sum(_frame_bytes(p, masked=True) for p in self.sent)
        down = sum(_frame_bytes(p, masked=False) for p in self.received)
        return up, down


async def _exchange(
    port: int, messages: int, text_bytes: int, deflate: bool
) -> dict[str, Any]:
    relays = {"operator": _Relay(port), "manager": _Relay(port)}
    clients = {name: _Client(name) for name in relays}
    task = f"wire-{uuid.uuid4().hex[:8]}"
    for name, client in clients.items():
        relay_port = await relays[name].start()
        token = issue_token(
            harness.SECRET, user=f"{task}-{name}", task=task, role=name, ttl=600
        )
        url = f"ws://127.0.0.1:{relay_port}/socket.io/?EIO=4&transport=websocket"
        await client.connect(url, token, deflate)
    await asyncio.sleep(0.2)
    start = {name: (r.up, r.down) for name, r in relays.items()}
    for client in clients.values():
        client.sent.clear()
        client.received.clear()

    operator, manager = clients["operator"], clients["manager"]
    rng = random.Random(1)
    for number in range(messages):
        payload = {"client_msg_id": str(uuid.uuid4()), "text": _text(rng, text_bytes)}
        # Compact JSON, as the JavaScript socket.io-client sends it.
        packet = json.dumps(["send_message", payload], separators=(",", ":"))
        await operator.send(f"42{number}{packet}")
        for _ in range(2):  # the ack and the operator's own copy, in any order
            await asyncio.wait_for(operator.inbox.get(), 10)
        await asyncio.wait_for(manager.inbox.get(), 10)
    await asyncio.sleep(0.2)

    measured = {
        name: (r.up - start[name][0], r.down - start[name][1])
        for name, r in relays.items()
    }
    for client in clients.values():
        await client.socket.close()
    for relay in relays.values():
        await relay.stop()
    return _figures(clients, measured, messages)


def _figures(
    clients: dict[str, _Client], measured: dict[str, tuple[int, int]], messages: int
) -> dict[str, Any]:
    operator, manager = clients["operator"], clients["manager"]
    computed = {name: client.computed() for name, client in clients.items()}
    frames = len(operator.sent) + len(operator.received) + len(manager.received)
    total = sum(up + down for up, down in measured.values())
    samples = {
        "send_message (operator -> gateway)": operator.sent[0],
        "ack (gateway -> operator)": next(
            p for p in operator.received if p[:2] == "43"
        ),
        "message (gateway -> each room member)": manager.received[0],
    }
    return {
        "messages": messages,
        "measured_bytes_per_message": {
            "operator_up": round(measured["operator"][0] / messages, 1),
            "operator_down": round(measured["operator"][1] / messages, 1),
            "manager_up": round(measured["manager"][0] / messages, 1),
            "manager_down": round(measured["manager"][1] / messages, 1),
            "total": round(total / messages, 1),
        },
        "computed_uncompressed_bytes_per_message": round(
            sum(up + down for up, down in computed.values()) / messages, 1
        ),
        "frames_per_message": round(frames / messages, 2),
        "with_tcp_ip_headers_per_message": round(
            (total + frames * _TCP_IP_HEADER_BYTES) / messages, 1
        ),
        "packets": {
            label: {"bytes": len(packet.encode()), "example": packet}
            for label, packet in samples.items()
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200, help="messages sent")
    parser.add_argument(
        "--text-bytes", type=int, default=200, help="message text length in bytes"
    )
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "benchmark": "wire",
        "machine": harness.machine(),
        "text_bytes": args.text_bytes,
        "modes": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-wire-") as workdir,
        harness.gateway(Path(workdir)) as server,
    ):
        for mode in ("plain", "deflate"):
            figures = asyncio.run(
                _exchange(
                    server.port, args.messages, args.text_bytes, mode == "deflate"
                )
            )
            results["modes"][mode] = figures
    path = harness.save("wire", results)

    for mode, figures in results["modes"].items():
        measured = figures["measured_bytes_per_message"]
        print(
            f"{mode:8} {measured['total']} bytes of TCP payload per message "
            f"(computed from the frames without compression: "
            f"{figures['computed_uncompressed_bytes_per_message']}), "
            f"{figures['frames_per_message']} frames, "
            f"{figures['with_tcp_ip_headers_per_message']} bytes with IP/TCP headers"
        )
    for label, packet in results["modes"]["plain"]["packets"].items():
        print(f"  {label}: {packet['bytes']} bytes")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
