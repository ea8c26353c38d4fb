"""Compare two gateway configurations under the same fixed load, round by round.

Two gateways run side by side, each with its own SecantusDB, and take turns
under ``--load`` messages/s for ``--duration`` seconds, ``--rounds`` times
each. Reported per configuration: the gateway's and SecantusDB's CPU time per
message, MongoDB write p95 and ack p50/p95, and for each round the variant's
CPU ratio to the baseline in the same round.

``--variant NAME=VALUE`` sets a gateway setting for the variant only.
``--mongo-options OPTIONS`` appends URI options (for example
``retryWrites=false``) to the variant's MongoDB URI; for that, this benchmark
starts each SecantusDB itself and passes ``MONGODB_URI`` to both gateways.

Run: ``python -m benchmarks.compare --variant CHAT_WRITE_JOURNAL=false``
(about 3 minutes), or ``--mongo-options retryWrites=false``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import harness
from service.embedded import EmbeddedMongo
from service.loadtest.plan import plan_single
from service.loadtest.runner import LoadTestOptions, default_processes, run_load_test
from service.loadtest.server_side import ProcessTree


@contextlib.contextmanager
def _database(workdir: Path) -> Iterator[EmbeddedMongo]:
    server = EmbeddedMongo(workdir / "secantusdb")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _round(
    server: harness.ServerProcess,
    database_pid: int,
    args: argparse.Namespace,
    label: str,
) -> dict[str, Any]:
    options = LoadTestOptions(
        url=server.url,
        tasks=harness.mint_tasks(args.tasks, f"compare-{label}"),
        steps=plan_single(args.tasks, args.load / (2 * args.tasks), args.duration),
        processes=default_processes(args.load, args.tasks),
        metrics_url=server.url + "/metrics",
        server_pid=server.pid,
    )
    database = ProcessTree(database_pid)
    before = sum(database.cpu_seconds().values())
    step = run_load_test(options, progress=None).steps[0]
    database_cpu = sum(database.cpu_seconds().values()) - before
    sent = max(1, step.sent)
    return {
        "gateway_cpu_ms_per_message": round(
            1000 * (step.server_processes_cpu or {}).get("chat-gateway", 0) / sent, 3
        ),
        "database_cpu_ms_per_message": round(1000 * database_cpu / sent, 3),
        "mongo_write_p95_ms": (step.server or {}).get("mongo_write_p95_ms"),
        "ack_p50_ms": round((step.ack.percentile(0.5) or 0) * 1000, 2),
        "ack_p95_ms": round((step.ack.percentile(0.95) or 0) * 1000, 2),
        "errors": step.error_count,
        "uptime": harness.uptime(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="gateway setting for the variant only (repeatable)",
    )
    parser.add_argument("--mongo-options", default="", help="URI options, variant only")
    parser.add_argument("--load", type=float, default=250.0, help="offered msg/s")
    parser.add_argument("--tasks", type=int, default=125, help="tasks (2 sockets each)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs per configuration")
    parser.add_argument("--name", default="compare", help="results file name")
    args = parser.parse_args(argv)
    variant_env = dict(item.split("=", 1) for item in args.variant)

    rounds: dict[str, list[dict[str, Any]]] = {"baseline": [], "variant": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-compare-") as workdir,
        contextlib.ExitStack() as stack,
    ):
        servers = {}
        for name, env in (("baseline", {}), ("variant", variant_env)):
            database = stack.enter_context(_database(Path(workdir) / f"db-{name}"))
            uri = database.uri
            if name == "variant" and args.mongo_options:
                uri += "&" + args.mongo_options
            settings = {**env, "MONGODB_URI": uri}
            server = stack.enter_context(
                harness.gateway(Path(workdir), settings, name=name)
            )
            assert database.process is not None
            servers[name] = (server, database.process.pid)
        for number in range(1, args.rounds + 1):
            for name, (server, database_pid) in servers.items():
                figures = _round(server, database_pid, args, f"{name}-{number}")
                rounds[name].append(figures)
                print(f"  round {number} [{name}] {figures}", flush=True)

    paired = [
        variant["gateway_cpu_ms_per_message"] / baseline["gateway_cpu_ms_per_message"]
        for variant, baseline in zip(rounds["variant"], rounds["baseline"], strict=True)
    ]
    results = {
        "benchmark": "compare",
        "machine": harness.machine(),
        "variant": {"settings": variant_env, "mongo_options": args.mongo_options},
        "load": {"offered_per_second": args.load, "duration_seconds": args.duration},
        "rounds": rounds,
        "gateway_cpu_ratio_per_round": [round(r, 3) for r in paired],
        "gateway_cpu_ratio_median": round(statistics.median(paired), 3),
    }
    path = harness.save(args.name, results)

    print()
    for name, runs in rounds.items():
        columns = ("gateway_cpu_ms_per_message", "database_cpu_ms_per_message")
        columns += ("mongo_write_p95_ms", "ack_p50_ms", "ack_p95_ms")
        print(f"{name}:")
        for column in columns:
            print(f"  {column:28} {[run[column] for run in runs]}")
    print(
        f"variant / baseline gateway CPU per round: {results['gateway_cpu_ratio_per_round']}"
    )
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
