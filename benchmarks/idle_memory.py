"""Memory per idle socket: the gateway's RSS before and after N idle clients.

The gateway runs as ``chat-gateway serve`` with a fresh data dir. Idle clients
are raw Engine.IO websocket clients (the ``websockets`` package, which is far
lighter than python-socketio on the client side), spread over several client
processes. Each one connects to the default namespace with its own user's
token, replies to Engine.IO pings and sends nothing else.

RSS is read from ``/proc/PID/status`` (VmRSS) of the gateway process alone;
the embedded SecantusDB child is reported apart and left out of the figure.
A warm-up of 100 sockets, opened and closed before the baseline, keeps
one-time costs (imports, first allocations) out of the per-socket figure.

Three modes, each on a fresh server:

* ``plain``: the gateway, clients without compression, like python-socketio's
  aiohttp client;
* ``deflate``: the gateway, clients that negotiate permessage-deflate like a
  browser, because each compressed socket keeps zlib state on the server;
* ``bare``: the bare python-socketio server of ``benchmarks.bare_server`` with
  plain clients, which is what the stack itself costs.

The server's idle CPU (server process and SecantusDB, from /proc) is read over
10 s at each level too: with no messages, it is the cost of Engine.IO pings
(one per socket every 25 s) and of the gateway's timers.

Target: at most 30 KB per socket at 1,000 and 5,000 sockets.

Run: ``python -m benchmarks.idle_memory`` (about 4 minutes), or ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness
from service.loadtest.server_side import ProcessTree

TARGET_KB_PER_SOCKET = 30.0
_WARM_UP_SOCKETS = 100
_SETTLE_SECONDS = 3.0
# Engine.IO pings each socket every 25 s, so 10 s samples 40% of the sockets.
_IDLE_CPU_SECONDS = 10.0


# -- client processes -------------------------------------------------------


async def _open(url: str, token: str, deflate: bool) -> Any:
    from websockets.asyncio.client import connect

    socket = await connect(
        url,
        compression="deflate" if deflate else None,
        ping_interval=None,  # Engine.IO has its own pings, handled below
        open_timeout=60,
    )
    opening = await socket.recv()
    if not str(opening).startswith("0"):
        raise RuntimeError(f"expected an Engine.IO open packet, got {opening!r:.80}")
    await socket.send("40" + json.dumps({"token": token}))
    reply = str(await socket.recv())
    if not reply.startswith("40"):
        raise RuntimeError(f"the gateway rejected the socket: {reply[:200]}")
    return socket


async def _answer_pings(socket: Any) -> None:
    try:
        async for frame in socket:
            if frame == "2":
                await socket.send("3")
    except Exception:  # noqa: S110 - a closed socket ends its idle loop
        pass


async def _client_main(conn: Connection, url: str, deflate: bool) -> None:
    sockets: list[Any] = []
    keepers: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(50)

    async def open_one(token: str) -> str | None:
        async with gate:
            try:
                socket = await _open(url, token, deflate)
            except Exception as exc:  # reported to the parent
                return f"{type(exc).__name__}: {exc}"
        sockets.append(socket)
        keepers.append(asyncio.create_task(_answer_pings(socket)))
        return None

    while True:
        command, tokens = await asyncio.to_thread(conn.recv)
        if command == "open":
            errors = await asyncio.gather(*(open_one(t) for t in tokens))
            failed = [e for e in errors if e]
            conn.send((len(tokens) - len(failed), failed[:3]))
        elif command == "close":
            await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)
            sockets.clear()
            conn.send((0, []))
        else:
            break
    for task in keepers:
        task.cancel()


def _client_process(conn: Connection, url: str, deflate: bool) -> None:
    asyncio.run(_client_main(conn, url, deflate))


class _Clients:
    """Idle-client processes, each holding a share of the sockets."""

    def __init__(self, url: str, processes: int, deflate: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[Any] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(
                target=_client_process, args=(child, url, deflate), daemon=True
            )
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    def _all(self, command: str, shares: list[list[str]]) -> int:
        for conn, share in zip(self.conns, shares, strict=True):
            conn.send((command, share))
        opened = 0
        for conn in self.conns:
            count, errors = conn.recv()
            if errors:
                raise RuntimeError(f"idle sockets failed to open: {'; '.join(errors)}")
            opened += count
        return opened

    def open(self, tokens: list[str]) -> int:
        shares = [tokens[i :: len(self.conns)] for i in range(len(self.conns))]
        return self._all("open", shares)

    def close_all(self) -> None:
        self._all("close", [[] for _ in self.conns])

    def stop(self) -> None:
        for conn in self.conns:
            conn.send(("stop", []))
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()


# -- measuring --------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def _children_rss_kb(pid: int) -> dict[str, int]:
    """Return the RSS of each direct child of ``pid``, by its command name."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(pid) and "VmRSS" in fields:
            name = fields["Name"].strip()
            found[name] = found.get(name, 0) + int(fields["VmRSS"].split()[0])
    return found


def _anonymous_kb(pid: int) -> int:
    """Return private anonymous memory (what chat_heap_bytes reports), in KB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Anonymous in /proc/{pid}/smaps_rollup")


def _active_sockets(url: str) -> int:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name == "chat_active_sockets":
            return int(float(value))
    return -1


def _settled(server: harness.ServerProcess) -> dict[str, Any]:
    """Wait for the server to settle, then read its memory and idle CPU."""
    time.sleep(_SETTLE_SECONDS)
    tree = ProcessTree(server.pid)
    before = tree.cpu_seconds()
    time.sleep(_IDLE_CPU_SECONDS)
    after = tree.cpu_seconds()
    return {
        "idle_cpu_cores": {
            name: round((seconds - before.get(name, 0.0)) / _IDLE_CPU_SECONDS, 4)
            for name, seconds in after.items()
        },
        "gateway_rss_kb": _rss_kb(server.pid),
        "anonymous_kb": _anonymous_kb(server.pid),
        "children_rss_kb": _children_rss_kb(server.pid),
        "active_sockets": _active_sockets(server.url),
    }


def _tokens(start: int, count: int, prefix: str) -> list[str]:
    from service.auth import issue_token

    tokens = []
    for number in range(start, start + count):
        task = f"{prefix}-{number}"
        tokens.append(
            issue_token(
                harness.SECRET,
                user=f"{task}-user",
                task=task,
                role="operator",
                ttl=3600,
            )
        )
    return tokens


def _server(workdir: Path, mode: str, levels: list[int], bare_ws: str) -> Any:
    if mode == "bare":
        return harness.bare_server(workdir / "bare", ws=bare_ws)
    env = {"CHAT_MAX_SOCKETS": str(max(levels) + 1000)}
    return harness.gateway(workdir, env, name=f"idle-{mode}")


def _measure(
    workdir: Path, mode: str, levels: list[int], processes: int, bare_ws: str
) -> dict[str, Any]:
    with _server(workdir, mode, levels, bare_ws) as server:
        url = server.url.replace("http://", "ws://") + (
            "/socket.io/?EIO=4&transport=websocket"
        )
        clients = _Clients(url, processes, deflate=mode == "deflate")
        try:
            clients.open(_tokens(0, _WARM_UP_SOCKETS, f"warm-{mode}"))
            clients.close_all()
            baseline = _settled(server)
            print(f"  [{mode}] baseline: {baseline}", flush=True)
            measured = []
            opened = 0
            for level in levels:
                started = time.monotonic()
                opened += clients.open(_tokens(opened, level - opened, f"idle-{mode}"))
                seconds = time.monotonic() - started
                figures = _settled(server)
                delta = figures["gateway_rss_kb"] - baseline["gateway_rss_kb"]
                anonymous = figures["anonymous_kb"] - baseline["anonymous_kb"]
                figures.update(
                    sockets=opened,
                    open_seconds=round(seconds, 1),
                    rss_delta_kb=delta,
                    kb_per_socket=round(delta / opened, 2),
                    anonymous_kb_per_socket=round(anonymous / opened, 2),
                )
                measured.append(figures)
                print(
                    f"  [{mode}] {opened} sockets: +{delta} KB RSS, "
                    f"{figures['kb_per_socket']} KB per socket "
                    f"(server reports {figures['active_sockets']} active), "
                    f"idle CPU {figures['idle_cpu_cores']} cores",
                    flush=True,
                )
        finally:
            clients.stop()
    server_name = f"bare python-socketio ({bare_ws})" if mode == "bare" else "gateway"
    return {
        "server": server_name,
        "baseline": baseline,
        "levels": measured,
        "uptime": harness.uptime(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--levels", default="1000,5000", help="socket counts, comma-separated"
    )
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument(
        "--modes",
        default="plain,deflate,bare",
        help="plain and deflate: gateway with uncompressed or permessage-deflate "
        "clients; bare: the bare python-socketio server with plain clients",
    )
    parser.add_argument(
        "--bare-ws",
        default="websockets-sansio",
        choices=["websockets-sansio", "websockets", "wsproto"],
        help="uvicorn websocket protocol of the bare server",
    )
    parser.add_argument("--quick", action="store_true", help="500 and 1000 sockets")
    parser.add_argument(
        "--results-name",
        default="idle_memory",
        help="write benchmarks/results/NAME.json (default idle_memory)",
    )
    args = parser.parse_args(argv)
    levels = [500, 1000] if args.quick else [int(n) for n in args.levels.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    limit = harness.raise_open_files(max(levels) * 2 + 1000)
    machine = harness.machine()
    results: dict[str, Any] = {
        "benchmark": "idle_memory",
        "machine": machine,
        "open_files_limit": limit,
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as workdir:
        for mode in modes:
            print(f"idle sockets, {mode} clients:", flush=True)
            results["modes"][mode] = _measure(
                Path(workdir), mode, levels, args.processes, args.bare_ws
            )
    results["target"] = {
        "kb_per_socket_at_most": TARGET_KB_PER_SOCKET,
        **{
            f"{mode}_met": all(
                level["kb_per_socket"] <= TARGET_KB_PER_SOCKET
                for level in figures["levels"]
            )
            for mode, figures in results["modes"].items()
        },
    }
    path = harness.save(args.results_name, results)

    print()
    for mode, figures in results["modes"].items():
        print(f"{mode}: {figures['server']}")
        for level in figures["levels"]:
            print(
                f"{mode:8} {level['sockets']:>6} sockets: "
                f"{level['kb_per_socket']} KB RSS per socket "
                f"(target <= {TARGET_KB_PER_SOCKET:g}), "
                f"{level['anonymous_kb_per_socket']} KB anonymous memory per socket"
            )
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
