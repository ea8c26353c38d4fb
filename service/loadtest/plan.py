"""The load a test offers: its steps, each user's send times, the pass rule.

A step offers a total rate (messages/s) for a fixed time. Users come in pairs,
one operator and one manager per task. Each active user sends at ``user_rate``
until every task is active. Beyond that, the per-user rate grows instead, so
``--tasks`` caps the sockets and ``--rate`` sets the rate that fills them.

The schedule is open-loop: every send time is fixed before the step starts
(evenly spaced per user, with a random phase), so a slow gateway cannot slow
the sender down and hide its own latency.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = [
    "BreakingRule",
    "StepSpec",
    "plan_ramp",
    "plan_single",
    "send_offsets",
]

USERS_PER_TASK = 2  # an operator and a manager


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step of a load test: its offered rate and how it is spread."""

    index: int
    offered: float  # messages/s over all users
    active_tasks: int
    user_rate: float  # messages/s per active user
    duration: float  # seconds

    @property
    def active_users(self) -> int:
        return self.active_tasks * USERS_PER_TASK


@dataclass(frozen=True, slots=True)
class BreakingRule:
    """The limits a step must stay within to count as sustained."""

    max_p95_seconds: float = 0.150
    max_error_fraction: float = 0.001
    max_shortfall: float = 0.05  # achieved may fall this fraction below offered

    def failures(
        self,
        *,
        offered: float,
        achieved: float,
        p95: float | None,
        errors: int,
        sent: int,
    ) -> list[str]:
        """Return why a step broke the rule; empty when it passed."""
        reasons = []
        if p95 is None or p95 > self.max_p95_seconds:
            p95_text = "no acks" if p95 is None else f"{p95 * 1000:.1f} ms"
            reasons.append(
                f"p95 ack latency {p95_text} > {self.max_p95_seconds * 1000:g} ms"
            )
        if sent == 0 or errors / sent >= self.max_error_fraction:
            fraction = errors / sent if sent else 1.0
            reasons.append(
                f"errors {fraction:.2%} >= {self.max_error_fraction:.1%} of messages"
            )
        if achieved < offered * (1 - self.max_shortfall):
            reasons.append(
                f"achieved {achieved:.1f}/s is more than {self.max_shortfall:.0%} "
                f"below offered {offered:.1f}/s"
            )
        return reasons


def _spread(
    index: int, offered: float, tasks: int, rate: float, duration: float
) -> StepSpec:
    needed = math.ceil(offered / (rate * USERS_PER_TASK) - 1e-9)
    active = max(1, min(tasks, needed))
    user_rate = offered / (active * USERS_PER_TASK)
    return StepSpec(index, offered, active, user_rate, duration)


def plan_single(tasks: int, rate: float, duration: float) -> list[StepSpec]:
    """Return one step in which every user of every task sends at ``rate``."""
    return [StepSpec(0, tasks * USERS_PER_TASK * rate, tasks, rate, duration)]


def plan_ramp(
    *,
    tasks: int,
    rate: float,
    duration: float,
    start: float,
    step: float | None,
    factor: float | None,
    steps: int,
) -> list[StepSpec]:
    """Return ``steps`` steps from ``start`` messages/s, adding ``step`` or
    multiplying by ``factor`` each time."""
    if (step is None) == (factor is None):
        raise ValueError("give exactly one of step and factor")
    plan = []
    offered = start
    for index in range(steps):
        # Rounded so that reports show 815.7/s, not 815.7307210000001/s.
        plan.append(_spread(index, round(offered, 1), tasks, rate, duration))
        offered = offered + step if step is not None else offered * (factor or 1)
    return plan


def send_offsets(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Return one user's send times in seconds from the step start.

    Sends are ``1 / rate`` apart, starting at a random phase within the first
    interval so that users do not send in lockstep.
    """
    interval = 1 / rate
    first = rng.random() * interval
    count = max(0, math.ceil((duration - first) / interval - 1e-9))
    return [first + n * interval for n in range(count)]
