"""The load generator behind ``chat-gateway loadtest`` and the benchmarks.

Modules:

* ``plan``: steps, open-loop send times, the breaking-point rule;
* ``worker``: one generator process and its sockets;
* ``runner``: the parent that starts workers and adds up their results;
* ``histogram``: mergeable latency histograms;
* ``server_side``: the gateway's /metrics and /proc CPU per step;
* ``report``: JSON, Markdown and PNG;
* ``cli``: the ``chat-gateway loadtest`` subcommand.
"""

from service.loadtest.plan import BreakingRule, StepSpec, plan_ramp, plan_single
from service.loadtest.runner import (
    LoadTestError,
    LoadTestOptions,
    RunOutcome,
    StepResult,
    default_processes,
    run_load_test,
)

__all__ = [
    "BreakingRule",
    "LoadTestError",
    "LoadTestOptions",
    "RunOutcome",
    "StepResult",
    "StepSpec",
    "default_processes",
    "plan_ramp",
    "plan_single",
    "run_load_test",
]
