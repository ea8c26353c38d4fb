"""The Python memory of one idle socket in the gateway, by package.

Runs the gateway in this process (uvicorn in a thread, embedded SecantusDB in
a temporary folder), opens N idle Engine.IO websocket clients from a child
process, and compares two tracemalloc snapshots taken before and after. The
difference, grouped by the package that allocated it, shows which layer
(uvicorn, python-engineio, asyncio, the gateway) the per-socket memory of
``benchmarks.idle_memory`` belongs to. tracemalloc counts Python allocations
only, so zlib state and allocator overhead are left out.

Run: ``python -m benchmarks.socket_memory`` (about 30 seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import multiprocessing
import tempfile
import threading
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks import harness


def _hold_sockets(url: str, tokens: list[str], conn: Connection) -> None:
    """Open one idle socket per token, report, and keep them until the parent ends."""

    async def run() -> None:
        from websockets.asyncio.client import connect

        sockets = []
        for token in tokens:
            socket = await connect(url, compression=None, ping_interval=None)
            await socket.recv()
            await socket.send("40" + json.dumps({"token": token}))
            reply = str(await socket.recv())
            if not reply.startswith("40"):
                raise RuntimeError(f"the gateway rejected the socket: {reply[:200]}")
            sockets.append(socket)
        conn.send(len(sockets))
        await asyncio.to_thread(conn.recv)
        for socket in sockets:
            await socket.close()

    asyncio.run(run())


def _package(filename: str) -> str:
    """Return a short name for the package or stdlib module of ``filename``."""
    path = Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "service" in parts:
        return "service (the gateway)"
    return f"stdlib {path.stem}"


def _open_sockets(url: str, count: int, prefix: str) -> tuple[Connection, Any]:
    from service.auth import issue_token

    tokens = [
        issue_token(
            harness.SECRET,
            user=f"{prefix}{n}",
            task=f"{prefix}{n}",
            role="operator",
            ttl=600,
        )
        for n in range(count)
    ]
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_hold_sockets, args=(url, tokens, child))
    process.start()
    opened = parent.recv()
    if opened != count:
        raise RuntimeError(f"opened {opened} of {count} sockets")
    return parent, process


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=500, help="idle sockets")
    parser.add_argument("--top", type=int, default=12, help="packages to list")
    args = parser.parse_args(argv)

    import uvicorn

    from service.app import create_app
    from service.embedded import free_port
    from service.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-socket-memory-") as workdir:
        port = free_port()
        settings = Settings(
            port=port,
            data_dir=Path(workdir),
            jwt_secret=harness.SECRET,
            indexing_enabled=False,
        )
        config = uvicorn.Config(
            create_app(settings, tracer_provider=None),
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="on",
            ws="websockets-sansio",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"

        # A warm-up round keeps one-time allocations out of the difference.
        conn, process = _open_sockets(url, 50, "warm")
        conn.send(None)
        process.join(30)
        time.sleep(1)

        tracemalloc.start()
        gc.collect()
        before = tracemalloc.take_snapshot()
        conn, process = _open_sockets(url, args.sockets, "idle")
        time.sleep(2)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        conn.send(None)
        process.join(30)
        server.should_exit = True
        thread.join(30)

    by_package: collections.Counter[str] = collections.Counter()
    for stat in after.compare_to(before, "filename"):
        by_package[_package(stat.traceback[0].filename)] += stat.size_diff
    total = sum(by_package.values())
    results = {
        "benchmark": "socket_memory",
        "machine": harness.machine(),
        "sockets": args.sockets,
        "python_bytes_per_socket": round(total / args.sockets),
        "by_package_bytes_per_socket": {
            name: round(size / args.sockets)
            for name, size in by_package.most_common(args.top)
        },
    }
    path = harness.save("socket_memory", results)

    print(
        f"{args.sockets} idle sockets: {total / args.sockets / 1024:.1f} KB of "
        "Python allocations per socket, by package:"
    )
    for name, size in results["by_package_bytes_per_socket"].items():
        print(f"  {size / 1024:6.1f} KB  {name}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
