"""Background monitors: event-loop lag, memory, and the runtime KPI line."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from service.logs import log_kpi
from service.metrics import Metrics, heap_bytes, resident_memory_bytes

__all__ = ["Monitors"]

# Short enough that a stall of N ms shows as N - 20 ms or more of lag.
_LAG_INTERVAL = 0.02
_LAG_LOG_INTERVAL = 1.0
_MIB = 1024 * 1024


class Monitors:
    """Runs the lag probe, the memory sampler and the 5-second runtime line."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        runtime_interval: float,
        memory_limit: int | None,
        accepted: Callable[[], int],
        active_sockets: Callable[[], int],
    ) -> None:
        self._metrics = metrics
        self._runtime_interval = runtime_interval
        self._memory_limit = memory_limit
        self._accepted = accepted
        self._active_sockets = active_sockets
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._probe_lag(), name="loop-lag"),
            asyncio.create_task(self._report_runtime(), name="runtime-report"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe_lag(self) -> None:
        """Sleep 20 ms at a time and record how late each wake-up is.

        A callback that blocks the loop for 200 ms makes one wake-up 180 to 200 ms
        late, which the histogram records. The once-a-second log line reports the
        worst wake-up of that second.
        """
        worst = 0.0
        last_log = time.monotonic()
        while True:
            expected = time.monotonic() + _LAG_INTERVAL
            await asyncio.sleep(_LAG_INTERVAL)
            now = time.monotonic()
            lag = max(0.0, now - expected)
            self._metrics.loop_lag.observe(lag)
            worst = max(worst, lag)
            if now - last_log >= _LAG_LOG_INTERVAL:
                log_kpi("event_loop_lag_ms", value=round(worst * 1000, 2))
                worst = 0.0
                last_log = now

    async def _report_runtime(self) -> None:
        previous = self._accepted()
        stamp = time.monotonic()
        while True:
            # Reading /proc/self/smaps_rollup took 5 to 50 ms in a running gateway
            # (the kernel walks every mapping), so it runs off the event loop.
            await asyncio.to_thread(self._metrics.sample_memory, self._memory_limit)
            await asyncio.sleep(self._runtime_interval)
            now = time.monotonic()
            count = self._accepted()
            rate = (count - previous) / (now - stamp)
            previous, stamp = count, now
            log_kpi(
                "runtime",
                messages_per_sec=round(rate, 2),
                active_sockets=self._active_sockets(),
                rss_mb=round(resident_memory_bytes() / _MIB, 1),
                heap_used_mb=round(await asyncio.to_thread(heap_bytes) / _MIB, 1),
            )
