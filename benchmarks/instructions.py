"""Instructions per message: telemetry's cost counted by callgrind, not timed.

CPU time per message moves by several per cent from run to run on a shared
machine, more than most changes to the tracing code. Valgrind's callgrind
counts the instructions a process executes, which for the same code and load
are nearly the same whatever else the machine does. This benchmark runs the
real gateway under callgrind, with its SecantusDB beside it (not counted),
and offers real Socket.IO clients a slow fixed load: a warm-up step, then
the measured step at the same rate. It counts the gateway's instructions
during the measured step only (connecting and the warm-up are left out),
in three configurations:

* ``off``: no OTLP endpoint, ``CHAT_LOG_MONGO_WRITES=off``;
* ``unsampled``: tracing on, nothing sampled (``OTEL_TRACES_SAMPLER=always_off``),
  no per-write log line: the cost of the tracing code on a dropped trace;
* ``traced``: as ``benchmarks.telemetry``'s ``traced``, every message traced
  and exported to an OTLP sink on 127.0.0.1, every MongoDB write logged.

The load is slow because callgrind runs the gateway about 50 times slower
than it runs alone. So each batch write carries about one message, where at
250 msg/s it carries about two, and the batch's span, its log line and the
round trip to MongoDB fall on each message rather than on two.

``--gateway-pythonpath DIR`` has the gateways import their code from DIR,
for example a checkout of an earlier commit (``git worktree add``), so that
two versions of the code can be counted one after the other.

Needs valgrind (``apt-get install valgrind``). Run: ``python -m
benchmarks.instructions`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.telemetry import start_sink, traced_settings
from service.loadtest.plan import StepSpec
from service.loadtest.runner import LoadTestOptions, StepResult, run_load_test

WARM_UP_SECONDS = 5.0


def _configurations(sink_port: int) -> dict[str, dict[str, str]]:
    return {
        "off": {"CHAT_LOG_MONGO_WRITES": "off"},
        "unsampled": {
            **traced_settings(sink_port),
            "OTEL_TRACES_SAMPLER": "always_off",
            "CHAT_LOG_MONGO_WRITES": "off",
        },
        "traced": traced_settings(sink_port),
    }


def _control(*args: str) -> None:
    """Send a command to the callgrind run (``callgrind_control``)."""
    subprocess.run(
        ["callgrind_control", *args], check=True, capture_output=True, timeout=60
    )


def _count(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(
        f"no instruction total found in {dump}: the callgrind dump is incomplete"
    )


def _run(
    workdir: Path, name: str, env: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    out = workdir / f"{name}.callgrind"
    prefix = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",  # off until the warm-up step has run
        f"--callgrind-out-file={out}",
    ]
    rate = args.load / (2 * args.tasks)  # per user
    steps = [
        StepSpec(index, args.load, args.tasks, rate, duration)
        for index, duration in enumerate((WARM_UP_SECONDS, args.duration))
    ]
    measured: list[StepResult] = []

    def on_step(result: StepResult) -> None:
        # Counting starts after the warm-up and stops before the sockets close.
        if result.spec.index == 0:
            _control("--instr=on", str(server.pid))
        else:
            _control("--dump", str(server.pid))
            measured.append(result)

    with harness.gateway(workdir, env, name=name, prefix=prefix, timeout=300) as server:
        options = LoadTestOptions(
            url=server.url,
            tasks=harness.mint_tasks(args.tasks, f"instructions-{name}"),
            steps=steps,
            processes=1,
            server_pid=server.pid,
            seed=1,
        )
        run_load_test(options, progress=None, on_step=on_step)
    if not measured:
        raise RuntimeError(f"the measured step of {name} did not run")
    step = measured[0]
    dumps = sorted(workdir.glob(f"{out.name}.*"))
    if not dumps:
        raise RuntimeError(
            f"callgrind wrote no dump for {name}: check that callgrind_control "
            "can reach the gateway process (valgrind's vgdb)"
        )
    instructions = _count(dumps[0])  # the dump taken at the end of the measured step
    return {
        "sent": step.sent,
        "errors": step.error_count,
        "instructions": instructions,
        "instructions_per_message": round(instructions / max(1, step.sent)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", type=float, default=8.0, help="offered msg/s")
    parser.add_argument("--tasks", type=int, default=8, help="tasks (2 sockets each)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of the measured step"
    )
    parser.add_argument(
        "--gateway-pythonpath",
        type=Path,
        metavar="DIR",
        help="import the gateway's code from DIR (a checkout of another commit)",
    )
    parser.add_argument(
        "--results-name", default="instructions", help="results file name"
    )
    args = parser.parse_args(argv)
    if (
        args.gateway_pythonpath is not None
        and not (args.gateway_pythonpath / "service" / "__init__.py").is_file()
    ):
        parser.error(
            f"--gateway-pythonpath {args.gateway_pythonpath} has no service/ "
            "package: give the top folder of a checkout of this repository"
        )
    for option, value in (
        ("--load", args.load),
        ("--tasks", args.tasks),
        ("--duration", args.duration),
    ):
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"{option} must be a finite number above 0, not {value:g}")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run `apt-get install valgrind`")

    sink = start_sink()
    results: dict[str, Any] = {
        "benchmark": "instructions",
        "machine": harness.machine(),
        "load_per_second": args.load,
        "duration_seconds": args.duration,
        "configurations": {},
    }
    figures = results["configurations"]
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as workdir:
        for name, env in _configurations(sink.server_port).items():
            if args.gateway_pythonpath is not None:
                env["PYTHONPATH"] = str(args.gateway_pythonpath.resolve())
            print(f"gateway under callgrind, {name} ...", flush=True)
            figures[name] = _run(Path(workdir), name, env, args)
            per_message = figures[name]["instructions_per_message"]
            print(
                f"  {figures[name]['sent']} messages, "
                f"{per_message:,} instructions per message",
                flush=True,
            )
    sink.shutdown()
    off = figures["off"]["instructions_per_message"]
    for values in figures.values():
        values["ratio_to_off"] = round(values["instructions_per_message"] / off, 3)
    print("\nconfiguration  instructions/message  x off")
    for name, values in figures.items():
        print(
            f"{name:<14} {values['instructions_per_message']:>20,}  "
            f"{values['ratio_to_off']:.3f}"
        )
    results["gateway_pythonpath"] = (
        str(args.gateway_pythonpath.resolve()) if args.gateway_pythonpath else None
    )
    print(f"results: {harness.save(args.results_name, results)}")
    return results


if __name__ == "__main__":
    main()
