"""Run every benchmark in turn: ``python -m benchmarks [--quick] [NAME ...]``.

Each one writes ``benchmarks/results/<name>.json``; docs/performance.md
explains the figures. The full set takes about 16 minutes, ``--quick`` about 6.
"""

from __future__ import annotations

import argparse
import importlib
import time

# In the order they run: the cheap, quiet measurements first.
BENCHMARKS = ("spans", "wire", "idle_memory", "throughput", "telemetry")
OPTIONAL = ("profile", "socket_memory", "compare", "instructions")
HAVE_QUICK = ("idle_memory", "throughput", "telemetry")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: {', '.join(BENCHMARKS)}; "
        f"also: {', '.join(OPTIONAL)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the short variant of each benchmark"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.names) - {*BENCHMARKS, *OPTIONAL})
    if unknown:
        parser.error(
            f"unknown benchmark {', '.join(unknown)}: choose from "
            f"{', '.join((*BENCHMARKS, *OPTIONAL))}"
        )
    for name in args.names or BENCHMARKS:
        started = time.monotonic()
        print(f"== {name} ==", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        quick = ["--quick"] if args.quick and name in HAVE_QUICK else []
        module.main(quick)
        print(f"== {name}: {time.monotonic() - started:.0f} s ==\n", flush=True)


if __name__ == "__main__":
    main()
