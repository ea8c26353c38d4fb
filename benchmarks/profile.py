"""CPU profile of the gateway under load: py-spy on the gateway and SecantusDB.

Starts ``chat-gateway serve``, offers a fixed load for ``--duration`` seconds
with the load generator, and samples both the gateway process and its
embedded SecantusDB child (a Python program too) with py-spy. Writes a
flame graph (SVG) per process and prints the share of samples by component,
grouped by the file each sampled frame comes from, and the top functions by
their own time.

Needs py-spy (``.venv/bin/pip install py-spy``) and the right to trace the
gateway's processes: root, or ``kernel.yama.ptrace_scope=0``.

Run: ``python -m benchmarks.profile --rate 400`` (about 40 seconds).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import harness
from service.loadtest.plan import plan_single
from service.loadtest.runner import LoadTestOptions, default_processes, run_load_test

# Components by the first folder of a sampled frame's file (py-spy prints paths
# relative to site-packages or the standard library).
_COMPONENTS = {
    "service": "gateway code (service/)",
    "socketio": "python-socketio",
    "engineio": "python-engineio",
    "uvicorn": "uvicorn",
    "websockets": "websockets",
    "pymongo": "pymongo and bson",
    "bson": "pymongo and bson",
    "prometheus_client": "prometheus-client",
    "opentelemetry": "opentelemetry",
    "secantus": "SecantusDB",
    "wiredtiger": "WiredTiger bindings",
    "json": "json",
    "logging": "logging",
    "asyncio": "asyncio (Python part)",
    "google": "protobuf",
}
# py-spy shortens the paths of the opentelemetry namespace packages to their
# inner folders (``trace/``, ``sdk/``, ``common/_internal/``). No other package
# that the gateway imports has top-level folders of these names.
_COMPONENTS.update(
    dict.fromkeys(
        (
            "opentelemetry", "trace", "sdk", "common", "util", "_shared_internal",
            "exporter", "context", "propagators", "attributes", "instrumentation",
            "semconv", "resources",
        ),
        "opentelemetry",
    )
)  # fmt: skip
# uvloop runs its C loop under this frame: time spent there is the event loop
# itself (polling, socket reads and writes, scheduling callbacks).
_LOOP_FRAME = "Runner.run (asyncio/runners.py"
# Start-up files whose frames are under every sample; left out of the inclusive list.
_ENTRY_FILES = ("(service/cli.py:", "(service/server.py:")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+)(?::\d+)?\)$")


def _component(frame: str) -> str:
    if frame.startswith(_LOOP_FRAME):
        return "event loop (uvloop, C)"
    match = _FRAME.match(frame)
    if match is None:
        return "other"
    folder = match["path"].split("/", 1)[0]
    return _COMPONENTS.get(folder, "other (stdlib, C extensions)")


def _below_loop(frames: list[str]) -> list[str]:
    """Return the frames the event loop runs, or all but the first off the loop.

    The start-up frames above the loop (the CLI, uvicorn's runner) are on
    every sample of the loop's thread and would count as 100% inclusive.
    """
    for index, frame in enumerate(frames):
        if frame.startswith(_LOOP_FRAME):
            return frames[index:]
    return frames[1:]


def _summarize(raw: Path, top: int) -> dict[str, Any]:
    """Aggregate py-spy's collapsed stacks.

    Self time goes to the sampled (leaf) frame's component and function.
    Inclusive time counts a sample once for every component and every gateway
    function on its stack, which shows, for example, the whole cost of
    tracing or of one step of the pipeline.
    """
    by_component: collections.Counter[str] = collections.Counter()
    under_component: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        by_component[_component(frames[-1])] += count
        by_function[frames[-1]] += count
        for component in {_component(frame) for frame in _below_loop(frames)}:
            under_component[component] += count
        pipeline = {
            frame.split(" (")[0]
            for frame in frames
            if "(service/" in frame and not any(e in frame for e in _ENTRY_FILES)
        }
        for function in pipeline:
            inclusive[function] += count
    if not total:
        return {"samples": 0}

    def shares(
        counter: collections.Counter[str], limit: int | None
    ) -> dict[str, float]:
        return {name: round(n / total, 3) for name, n in counter.most_common(limit)}

    return {
        "samples": total,
        "self_time_by_component": shares(by_component, None),
        "inclusive_time_by_component": shares(under_component, None),
        "top_functions_self": shares(by_function, top),
        "gateway_functions_inclusive": shares(inclusive, top),
    }


def _record(
    pid: int, seconds: float, stem: Path
) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
    """Start py-spy on ``pid`` for ``seconds``; return its files and processes."""
    spy = shutil.which("py-spy", path=str(harness.BIN)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: run `.venv/bin/pip install py-spy`")
    svg, raw = stem.with_suffix(".svg"), stem.with_suffix(".txt")
    common = ["--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200"]
    spies = [
        subprocess.Popen(
            [spy, "record", "--format", fmt, "-o", str(path), "--nonblocking", *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for path, fmt in ((svg, "flamegraph"), (raw, "raw"))
    ]
    return [svg, raw], spies


def _child_pid(pid: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(
            line.split(":\t", 1) for line in status.splitlines() if ":\t" in line
        )
        if fields.get("PPid", "").strip() == str(pid) and name in fields.get(
            "Name", ""
        ):
            return int(entry.name)
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=400.0, help="offered msg/s")
    parser.add_argument("--tasks", type=int, default=200, help="tasks (2 sockets each)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--top", type=int, default=15, help="functions to list")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra gateway setting, e.g. OTEL_TRACES_SAMPLER=always_on (repeatable)",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="trace every message to an OTLP sink on 127.0.0.1, as "
        "benchmarks.telemetry's traced configuration does",
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    results_name = "profile-traced" if args.traced else "profile"
    sink = None
    if args.traced:
        from benchmarks.telemetry import start_sink, traced_settings

        sink = start_sink()
        env.update(traced_settings(sink.server_port))

    out = harness.RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    steps = plan_single(args.tasks, args.rate / (2 * args.tasks), args.duration)
    results: dict[str, Any] = {"benchmark": "profile", "machine": harness.machine()}
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-") as workdir,
        harness.gateway(Path(workdir), env) as server,
    ):
        options = LoadTestOptions(
            url=server.url,
            tasks=harness.mint_tasks(args.tasks, "profile"),
            steps=steps,
            processes=default_processes(args.rate, args.tasks),
            metrics_url=server.url + "/metrics",
            server_pid=server.pid,
            seed=1,
        )
        secantus = _child_pid(server.pid, "secantus")
        files: dict[str, list[Path]] = {}
        spies: list[subprocess.Popen[bytes]] = []
        # Sample the middle of the run: connecting and ramp-up are left out.
        sample_seconds = max(1.0, args.duration - 4)

        def start_recording() -> None:
            targets = {"gateway": server.pid, "secantusdb": secantus}
            for name, pid in targets.items():
                if pid is not None:
                    stem = out / f"{results_name}-{name}"
                    files[name], started = _record(pid, sample_seconds, stem)
                    spies.extend(started)

        outcome_holder: list[Any] = []
        runner = threading.Thread(
            target=lambda: outcome_holder.append(run_load_test(options, progress=None))
        )
        runner.start()
        # Sampling starts once the workers run and the sockets are connected,
        # estimated at 2 s plus 2 s per 100 tasks.
        timer = threading.Timer(2 + args.tasks / 50, start_recording)
        timer.start()
        runner.join()
        timer.join()
        for spy in spies:
            spy.wait(60)
    step = outcome_holder[0].steps[0]
    results["load"] = {
        "offered_per_second": args.rate,
        "achieved_per_second": round(step.achieved, 1),
        "ack_p95_ms": round((step.ack.percentile(0.95) or 0) * 1000, 2),
        "server": step.server,
        "server_processes_cpu_seconds": step.server_processes_cpu,
        "uptime": harness.uptime(),
    }
    for name, (svg, raw) in files.items():
        results[name] = {"flamegraph": str(svg), **_summarize(raw, args.top)}
    if sink is not None:
        sink.shutdown()
    path = harness.save(results_name, results)

    print(
        f"load: {args.rate:g} msg/s offered, {results['load']['achieved_per_second']} "
        f"achieved, p95 ack {results['load']['ack_p95_ms']} ms; CPU seconds "
        f"{results['load']['server_processes_cpu_seconds']}"
    )
    for name in files:
        summary = results[name]
        print(f"{name}: {summary.get('samples', 0)} samples, self time by component:")
        inclusive = summary.get("inclusive_time_by_component", {})
        for component, share in summary.get("self_time_by_component", {}).items():
            print(
                f"  {share:6.1%}  {component} "
                f"(inclusive {inclusive.get(component, 0):.1%})"
            )
        print("  top functions by self time:")
        for function, share in summary.get("top_functions_self", {}).items():
            print(f"  {share:6.1%}  {function}")
        if summary.get("gateway_functions_inclusive"):
            print("  gateway functions, inclusive time:")
        for function, share in summary.get("gateway_functions_inclusive", {}).items():
            print(f"  {share:6.1%}  {function}")
    print(f"machine: {harness.uptime()}")
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
