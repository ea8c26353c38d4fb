"""Render the dashboard's panels to a PNG from a live Prometheus.

Each panel of dashboards/build.py becomes one matplotlib plot, in the
dashboard's rows and order, drawn from /api/v1/query_range with the panel's
own PromQL, legends and threshold line, so readers without a Grafana see
what the dashboard shows for a time range. Each y-axis reaches up to the
panel's threshold line, which shows how far the series stay below it. For
the last 15 minutes of one gateway:

    python -m dashboards.render --prometheus http://127.0.0.1:9090 \\
        --instance 127.0.0.1:8000 --minutes 15 --out docs/dashboard.png

Run it from the repository root, so that ``dashboards.build`` is importable.
tests/test_monitoring_e2e.py renders its live run with it, and also writes
the PNG to the path in RENDER_DASHBOARD when that variable is set.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dashboards.build import PANELS, ROWS, Panel, panel_queries

__all__ = ["RenderError", "Series", "query_range", "render"]

# Panel unit -> (factor applied to every value, y-axis label). The factors
# match the units Grafana picks for these panels: milliseconds for latencies
# and MiB for memory.
_UNITS: dict[str, tuple[float, str]] = {
    "s": (1000.0, "ms"),
    "bytes": (1.0 / 2**20, "MiB"),
    "mps": (1.0, "messages/s"),
    "short": (1.0, ""),
}
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_THRESHOLD_COLOR = "#d62728"
_DPI = 100


class RenderError(RuntimeError):
    """Prometheus rejected a query or could not be reached."""


@dataclass(frozen=True)
class Series:
    """One series of a query_range result: its labels and its points."""

    labels: Mapping[str, str]
    timestamps: Sequence[float]
    values: Sequence[float]

    def has_data(self) -> bool:
        return any(math.isfinite(value) for value in self.values)


def _get(client: httpx.Client, path: str, params: dict[str, Any]) -> Any:
    """Call the Prometheus HTTP API and return ``data``.

    Raises RenderError when the response is not a success.
    """
    response = client.get(path, params=params)
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    if response.status_code != 200 or body.get("status") != "success":
        raise RenderError(
            f"{path} failed with HTTP {response.status_code} "
            f"({body.get('errorType')}: {body.get('error')}) for {params}"
        )
    return body["data"]


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step: float
) -> list[Series]:
    """Run ``expr`` through /api/v1/query_range and return its series."""
    params = {"query": expr, "start": start, "end": end, "step": step}
    data = _get(client, "/api/v1/query_range", params)
    return [
        Series(
            labels=result["metric"],
            timestamps=[float(point[0]) for point in result["values"]],
            values=[float(point[1]) for point in result["values"]],
        )
        for result in data["result"]
    ]


def _gateway_instances(client: httpx.Client, start: float, end: float) -> list[str]:
    """Return the instances that have chat_active_sockets, as the dashboard's All.

    Raises RenderError when there are none.
    """
    params = {"match[]": "chat_active_sockets", "start": start, "end": end}
    instances = sorted(_get(client, "/api/v1/label/instance/values", params))
    if not instances:
        raise RenderError(
            "no chat_active_sockets series in the time range: check that "
            "Prometheus scrapes the gateway, or pass an instance"
        )
    return instances


def _instance_regex(instances: list[str]) -> str:
    """Return a PromQL regex that matches exactly these instance values."""
    # re.escape's escapes are valid in RE2 too. Each backslash is doubled
    # because the regex sits inside a double-quoted PromQL string.
    escaped = [re.escape(value).replace("\\", "\\\\") for value in instances]
    return "|".join(escaped)


def _legend(template: str, labels: Mapping[str, str]) -> str:
    """Fill a Grafana legend format such as ``p95 {{instance}}``."""
    text = _LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), template)
    return text.strip() or "value"


def _draw_panel(axes: Axes, panel: Panel, results: list[list[Series]]) -> int:
    """Plot one panel's series and threshold line, and return the series drawn."""
    factor, unit_label = _UNITS.get(panel.unit, (1.0, panel.unit))
    drawn = 0
    for target, series_list in zip(panel.targets, results, strict=True):
        for series in series_list:
            if not series.has_data():
                continue
            times = [datetime.fromtimestamp(t, UTC) for t in series.timestamps]
            values = [value * factor for value in series.values]
            axes.plot(
                times,
                values,
                linewidth=1.3,
                label=_legend(target.legend, series.labels),
            )
            drawn += 1

    if panel.threshold is not None:
        axes.axhline(
            panel.threshold * factor,
            color=_THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1,
            label="alert threshold",
        )
    if drawn == 0:
        axes.text(
            0.5, 0.5, "No data", ha="center", va="center", transform=axes.transAxes
        )

    axes.set_title(panel.title, fontsize=11, loc="left")
    axes.set_ylabel(panel.axis_label or unit_label, fontsize=9)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.tick_params(labelsize=8)
    axes.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=5))
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    if drawn or panel.threshold is not None:
        # Below the plot, as the dashboard places its legends.
        axes.legend(
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(0, -0.1),
            ncols=3,
            frameon=False,
        )
    return drawn


def render(
    prometheus: str,
    out: Path,
    *,
    start: float,
    end: float,
    step: float = 5.0,
    instance: str | None = None,
    rate_interval: str = "1m",
) -> dict[str, int]:
    """Render every panel between ``start`` and ``end`` (Unix seconds) to ``out``.

    ``instance`` is a regex that replaces the dashboard's ``$instance``. None
    picks every instance that has chat_active_sockets, as the dashboard's
    "All" does, because a regex such as ``.+`` would also match the
    process_* series of other jobs. ``rate_interval`` replaces
    ``$__rate_interval``. Returns the number of series with data drawn in
    each panel, by panel title.
    """
    results: dict[int, list[list[Series]]] = {}
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        if instance is None:
            instances = _gateway_instances(client, start, end)
            instance = _instance_regex(instances)
            instance_title = ", ".join(instances)
        else:
            instance_title = instance
        queries = panel_queries(instance=instance, rate_interval=rate_interval)
        for panel in PANELS.values():
            results[panel.id] = [
                query_range(client, expr, start, end, step)
                for expr in queries[panel.title]
            ]

    # A bare Figure renders with Agg and leaves pyplot's global state alone.
    figure = Figure(figsize=(22, 4.2 * len(ROWS)), layout="constrained")
    span = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S")
    figure.suptitle(
        f"Chat gateway: instance {instance_title}, "
        f"{end - start:.0f} s from {span} UTC, step {step:g} s",
        fontsize=14,
    )
    drawn: dict[str, int] = {}
    row_figures = figure.subfigures(len(ROWS), 1)
    for row_figure, (_row_id, row_title, panel_ids) in zip(
        row_figures, ROWS, strict=True
    ):
        row_figure.suptitle(row_title, fontsize=12, x=0.01, ha="left", weight="bold")
        # Panels of a row share its width equally, as build.py lays them out.
        axes_list = row_figure.subplots(1, len(panel_ids), squeeze=False)[0]
        for axes, panel_id in zip(axes_list, panel_ids, strict=True):
            panel = PANELS[panel_id]
            drawn[panel.title] = _draw_panel(axes, panel, results[panel_id])

    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=_DPI)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render the chat gateway dashboard's panels to a PNG."
    )
    parser.add_argument(
        "--prometheus", required=True, help="base URL of the Prometheus HTTP API"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--instance",
        help=(
            "regular expression for the instance label (default: every "
            "instance that has chat_active_sockets)"
        ),
    )
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="time range ending now, in minutes"
    )
    parser.add_argument(
        "--step", type=float, default=5.0, help="query_range resolution in seconds"
    )
    parser.add_argument(
        "--rate-interval",
        default="1m",
        help="PromQL duration that replaces $__rate_interval (default 1m)",
    )
    args = parser.parse_args(argv)

    end = time.time()
    try:
        drawn = render(
            args.prometheus,
            args.out,
            start=end - args.minutes * 60,
            end=end,
            step=args.step,
            instance=args.instance,
            rate_interval=args.rate_interval,
        )
    except (RenderError, httpx.HTTPError) as error:
        print(f"render failed: {error}", file=sys.stderr)
        return 1

    empty = sorted(title for title, count in drawn.items() if count == 0)
    print(f"wrote {args.out}: {len(drawn)} panels, {len(empty)} without data")
    for title in empty:
        print(f"  no data: {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
