"""Per-message telemetry work gathered on the event loop and done in a row.

Between two messages the event loop runs a long path of Socket.IO, uvicorn
and PyMongo code, which pushes the telemetry code and its data out of the
CPU's caches. So a step run once per message, such as encoding a span or
writing a KPI line, costs several times more there than in a loop that
repeats it. ``Deferred`` keeps such items for a short delay, then handles
all of them one after another: the first pays for the cold caches, the rest
find them warm. docs/performance.md has the measurements.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Deferred"]

logger = logging.getLogger("chat.telemetry")

T = TypeVar("T")


class Deferred(Generic[T]):
    """Items handled together, ``delay_seconds`` after the first of them.

    Only items added on a thread that runs an event loop wait, and a timer
    on that loop handles them. An item added on any other thread is handled
    at once. With ``max_items``, a group is handled as soon as it has that
    many items. ``flush`` handles the waiting items from any thread, for
    example before shutting down. Items that wait on a loop closed before
    its timer fired are handled by the next flush. A delay of 0 handles
    every item at once.
    """

    def __init__(
        self,
        handle: Callable[[T], object],
        delay_seconds: float,
        max_items: int | None = None,
    ) -> None:
        if delay_seconds < 0:
            raise ValueError(f"delay_seconds must be 0 or more, not {delay_seconds}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be 1 or more, not {max_items}")
        self._handle = handle
        self._delay = delay_seconds
        self._max_items = max_items
        self._items: deque[T] = deque()  # append and popleft are thread-safe
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Handle ``item`` with the others added within the delay, or now."""
        if self._delay:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop's thread
                pass
            else:
                items = self._items
                items.append(item)
                if self._max_items is not None and len(items) >= self._max_items:
                    timer = self._timer
                    if timer is not None and self._timer_loop is loop:
                        timer.cancel()  # else it would cut the next group short
                    self.flush()
                elif self._timer_loop is not loop:  # no timer on this loop yet
                    self._timer_loop = loop
                    self._timer = loop.call_later(self._delay, self.flush)
                return
        self._handle(item)

    def flush(self) -> None:
        """Handle every item waiting now, in the order they were added."""
        self._timer_loop = self._timer = None
        items = self._items
        while True:
            try:
                item = items.popleft()
            except IndexError:
                return
            try:
                self._handle(item)
            except Exception:  # one bad item must not hold back the rest
                logger.exception("deferred telemetry item %r failed", item)
