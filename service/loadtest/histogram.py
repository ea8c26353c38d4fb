"""A mergeable latency histogram with log-linear buckets, in the HDR style.

Values are whole microseconds. Below 128 µs every value has its own bucket.
Above, each power of two is split into 64 buckets, so a bucket is at most
1/64 (1.6%) wider than its lower edge. Buckets are kept sparsely in a dict, so
a histogram is cheap to pickle through a multiprocessing pipe and to merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["LatencyHistogram"]

_LINEAR_LIMIT = 128  # values below this are stored exactly
_SUB_BUCKETS = 64  # buckets per power of two above the linear range
_SUB_BITS = 6  # log2(_SUB_BUCKETS)


def _bucket_of(micros: int) -> int:
    if micros < _LINEAR_LIMIT:
        return micros
    shift = micros.bit_length() - _SUB_BITS - 1
    return _LINEAR_LIMIT + (shift - 1) * _SUB_BUCKETS + (micros >> shift) - _SUB_BUCKETS


def _upper_edge(bucket: int) -> int:
    """Return the largest value that falls in ``bucket``."""
    if bucket < _LINEAR_LIMIT:
        return bucket
    shift, offset = divmod(bucket - _LINEAR_LIMIT, _SUB_BUCKETS)
    shift += 1
    return ((offset + _SUB_BUCKETS + 1) << shift) - 1


@dataclass(slots=True)
class LatencyHistogram:
    """Counts of latencies; percentiles are read at each bucket's upper edge."""

    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    max_micros: int = 0
    sum_micros: int = 0

    def record(self, seconds: float) -> None:
        micros = max(0, round(seconds * 1_000_000))
        bucket = _bucket_of(micros)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1
        self.sum_micros += micros
        self.max_micros = max(micros, self.max_micros)

    def merge(self, other: LatencyHistogram) -> None:
        """Add every count of ``other`` to this histogram."""
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += other.total
        self.sum_micros += other.sum_micros
        self.max_micros = max(self.max_micros, other.max_micros)

    def percentile(self, fraction: float) -> float | None:
        """Return the ``fraction`` quantile in seconds, or None when empty.

        The result is the upper edge of the bucket holding the quantile, capped
        at the exact maximum, so it never understates a latency.
        """
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be within [0, 1], not {fraction!r}")
        if self.total == 0:
            return None
        # Nearest-rank method; the epsilon keeps 0.95 * 20 from rounding up to 20.
        rank = max(1, math.ceil(fraction * self.total - 1e-9))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(_upper_edge(bucket), self.max_micros) / 1_000_000
        return self.max_micros / 1_000_000

    @property
    def mean(self) -> float | None:
        """Return the mean in seconds, or None when empty."""
        return self.sum_micros / self.total / 1_000_000 if self.total else None

    @property
    def max(self) -> float | None:
        """Return the largest recorded value in seconds, or None when empty."""
        return self.max_micros / 1_000_000 if self.total else None
