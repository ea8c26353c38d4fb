"""The machine's current speed at running Python code: a yardstick for CPU times.

On a shared virtual machine, the CPU time that the same process needs for the
same work drifts by 10% or more within minutes: other guests compete for
caches and memory bandwidth, and clock rates change. The telemetry benchmark
compares CPU times of gateways measured one after the other, so that drift
lands in its ratios as noise.

The probe runs in a process of its own. Every ``--interval`` seconds it does
one fixed unit of Python work: dict and string operations, a JSON round trip
and reads scattered over a few megabytes of objects. It writes the thread CPU
time of each unit to stdout. Nothing else changes in the unit from one run to
the next, so a slower unit means a slower machine. Dividing a gateway's CPU
time per message by the probe's CPU time per unit, measured over the same
seconds, leaves the part of the gateway's cost that does not come from the
machine's speed. The probe's own load (about 4% of one CPU) is the same for
every configuration.

Run on its own: ``python -m benchmarks.speed_probe`` prints one line per
unit, ``<monotonic seconds> <CPU µs>``, until stdin closes.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO

# About 7 MB of small objects, read in a fixed scattered order: a unit's time
# depends on the caches it shares with other processes, as a gateway's does.
_OBJECTS = 30_000
_READS = 2_000


def _unit(objects: list[dict[str, int]], order: list[int]) -> int:
    """Do one unit of work and return a checksum, so that nothing is skipped."""
    total = 0
    for index in order:
        total += objects[index]["n"]
    record = {f"key-{n}": n * 3 for n in range(150)}
    text = json.dumps(record)
    total += len(json.loads(text))
    words = sorted(text.split(","))
    total += len("|".join(words).upper())
    return total


def run(interval: float, out: IO[str], stop: threading.Event) -> None:
    """Run units every ``interval`` seconds, writing each one's CPU time."""
    rng = random.Random(7)
    objects = [{"n": n, "pad": n * 2} for n in range(_OBJECTS)]
    order = [rng.randrange(_OBJECTS) for _ in range(_READS)]
    # A unit makes no reference cycles, and a collection inside a unit
    # would make it slow for reasons of its own.
    gc.disable()
    _unit(objects, order)  # the first unit warms the interpreter up
    next_at = time.monotonic()
    while not stop.is_set():
        started = time.thread_time_ns()
        _unit(objects, order)
        spent = time.thread_time_ns() - started
        out.write(f"{time.monotonic():.3f} {spent / 1000:.1f}\n")
        out.flush()
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass
class SpeedProbe:
    """The probe as a child process: start it, then read units by time window."""

    interval: float = 0.05
    process: subprocess.Popen[str] | None = None
    units: list[tuple[float, float]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start(self) -> SpeedProbe:
        command = [sys.executable, "-m", "benchmarks.speed_probe"]
        self.process = subprocess.Popen(
            [*command, "--interval", str(self.interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            at, micros = line.split()
            self.units.append((float(at), float(micros)))

    def stop(self) -> None:
        """Stop the probe and keep the units it measured."""
        if self.process is None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)
        if self._reader is not None:
            self._reader.join(30)
        self.process = None

    def median_us(
        self, since: float = 0.0, until: float = float("inf")
    ) -> float | None:
        """Return the median CPU µs of the units run between two monotonic times."""
        inside = [micros for at, micros in self.units if since <= at <= until]
        return round(statistics.median(inside), 1) if inside else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--interval", type=float, default=0.05, help="seconds between units"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    run(args.interval, sys.stdout, stop)


if __name__ == "__main__":
    main()
