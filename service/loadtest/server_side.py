"""Server-side figures of a step: its /metrics and its processes' CPU.

``scrape()`` reads the gateway's Prometheus exposition before and after a
step. ``summarize()`` turns the difference into per-step figures: CPU time per
message, MongoDB write p50/p95, batch sizes and event-loop lag. Quantiles are
interpolated inside the histogram buckets as PromQL's
``histogram_quantile()`` does, so they match what a dashboard would show.

``ProcessTree`` reads CPU time from ``/proc`` for a server started on this
machine, including its children (the embedded SecantusDB), which the
gateway's own ``process_cpu_seconds_total`` does not count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsSnapshot", "ProcessTree", "scrape", "summarize"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Every sample of one scrape, keyed by sample name and sorted labels."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def total(self, name: str, **labels: str) -> float:
        """Return the sum of the samples called ``name`` that carry ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, pairs), value in self.samples.items()
            if sample == name and wanted <= set(pairs)
        )

    def buckets(self, histogram: str) -> dict[float, float]:
        """Return the cumulative bucket counts of ``histogram``, summed by ``le``."""
        counts: dict[float, float] = {}
        for (sample, pairs), value in self.samples.items():
            if sample != histogram + "_bucket":
                continue
            bound = float(dict(pairs)["le"])
            counts[bound] = counts.get(bound, 0.0) + value
        return counts


def scrape(url: str, timeout: float = 5.0) -> MetricsSnapshot | None:
    """Return the samples at ``url``, or None when it does not serve metrics."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    try:
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = float(sample.value)
    except ValueError:
        return None
    return MetricsSnapshot(samples)


def _quantile(
    fraction: float, buckets: dict[float, float], *, interpolate: bool = True
) -> float | None:
    """Return a quantile from cumulative bucket counts.

    With ``interpolate`` the value is placed linearly inside its bucket, as
    PromQL's ``histogram_quantile()`` does. Without it, the value is the
    bucket's upper bound, which suits whole-number histograms such as batch
    sizes.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = fraction * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # PromQL returns the highest finite bound
            if count == lower_count or not interpolate:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def _delta_buckets(
    before: MetricsSnapshot, after: MetricsSnapshot, histogram: str
) -> dict[float, float]:
    old = before.buckets(histogram)
    return {
        le: count - old.get(le, 0.0) for le, count in after.buckets(histogram).items()
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(
    before: MetricsSnapshot, after: MetricsSnapshot, wall_seconds: float
) -> dict[str, Any]:
    """Return the server's own figures for the time between two scrapes."""

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    accepted = delta("chat_messages_total", outcome="accepted")
    cpu = delta("process_cpu_seconds_total")
    writes = delta("chat_mongo_write_duration_seconds_count")
    batched = delta("chat_mongo_write_batch_size_sum")
    write_buckets = _delta_buckets(before, after, "chat_mongo_write_duration_seconds")
    batch_buckets = _delta_buckets(before, after, "chat_mongo_write_batch_size")
    ack_buckets = _delta_buckets(before, after, "chat_message_ack_duration_seconds")
    lag_buckets = _delta_buckets(before, after, "chat_event_loop_lag_seconds")
    return {
        "accepted": int(accepted),
        "rejected": int(delta("chat_messages_total", outcome="rejected")),
        "cpu_seconds": round(cpu, 3),
        "cpu_percent": round(100 * cpu / wall_seconds, 1) if wall_seconds else None,
        "cpu_ms_per_message": round(1000 * cpu / accepted, 4) if accepted else None,
        "mongo_writes": int(writes),
        "mongo_write_p50_ms": _ms(_quantile(0.5, write_buckets)),
        "mongo_write_p95_ms": _ms(_quantile(0.95, write_buckets)),
        "mongo_write_mean_ms": _ms(
            delta("chat_mongo_write_duration_seconds_sum") / writes if writes else None
        ),
        "batch_size_mean": round(batched / writes, 2) if writes else None,
        "batch_size_p50_at_most": _quantile(0.5, batch_buckets, interpolate=False),
        "batch_size_p95_at_most": _quantile(0.95, batch_buckets, interpolate=False),
        "server_ack_p95_ms": _ms(_quantile(0.95, ack_buckets)),
        "event_loop_lag_p95_ms": _ms(_quantile(0.95, lag_buckets)),
        "rss_mb": round(after.total("process_resident_memory_bytes") / 2**20, 1),
        "active_sockets": int(after.total("chat_active_sockets")),
    }


class ProcessTree:
    """CPU time of a local process and all its descendants, from ``/proc``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> dict[str, float]:
        """Return user+system CPU seconds by process name (``comm``)."""
        stats = _read_stats()
        tree = {self.pid}
        grew = True
        while grew:
            children = {pid for pid, (_, ppid, _) in stats.items() if ppid in tree}
            grew = not children <= tree
            tree |= children
        usage: dict[str, float] = {}
        for pid in tree:
            if pid in stats:
                name, _, ticks = stats[pid]
                usage[name] = usage.get(name, 0.0) + ticks / _CLOCK_TICKS
        return usage


def _read_stats() -> dict[int, tuple[str, int, int]]:
    """Return (comm, ppid, utime+stime ticks) of every readable process."""
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # comm is in brackets and may contain spaces; the fields follow it.
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (
            name,
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
        )
    return stats
