"""`chat-gateway loadtest` against a real gateway: counts, reports, bad input."""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.embedded import free_port
from service.loadtest.histogram import LatencyHistogram
from service.loadtest.plan import BreakingRule, plan_ramp, send_offsets
from tests.conftest import SECRET, GatewayFactory, RunningGateway


def _run(argv: list[str]) -> int:
    """Run the CLI and return its exit code, whether it returns or exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _loadtest(gateway: RunningGateway, out: Path, *extra: str) -> int:
    return _run(
        [
            "loadtest",
            "--url", gateway.url,
            "--secret", SECRET,
            "--out", str(out),
            "--processes", "1",
            "--quiet",
            *extra,
        ]
    )  # fmt: skip


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    """A gateway without semantic indexing, which would only add CPU noise here."""
    return gateway_factory(indexing_enabled=False)


def test_run_acks_and_delivers_every_message(
    gateway: RunningGateway, tmp_path: Path, mongo: Any
) -> None:
    """5 tasks x 2 users x 2 msg/s for 3 s: 60 messages, all acked and delivered."""
    code = _loadtest(
        gateway, tmp_path, "--tasks", "5", "--rate", "2", "--duration", "3"
    )

    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["steps"]) == 1
    step = report["steps"][0]
    assert step["offered_per_second"] == 20
    assert step["scheduled"] == 60
    assert step["sent"] == 60
    assert step["acked"] == step["sent"]
    assert step["delivered"] == step["acked"]
    assert step["errors"] == {}
    assert step["passed"] is True
    assert abs(step["achieved_per_second"] - 20) <= 2

    for kind in ("ack_latency", "delivery_latency"):
        latency = step[kind]
        assert latency["count"] == 60
        assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
        assert latency["p99_ms"] <= latency["max_ms"]

    server = step["server"]
    assert server["accepted"] == 60
    assert server["mongo_writes"] >= 1
    assert server["cpu_ms_per_message"] > 0
    stored = mongo[gateway.database].messages.count_documents({})
    assert stored == 60


def test_run_writes_markdown_and_png(gateway: RunningGateway, tmp_path: Path) -> None:
    """The Markdown table and the plot are written beside the JSON."""
    code = _loadtest(
        gateway, tmp_path, "--tasks", "2", "--rate", "2", "--duration", "2"
    )

    assert code == 0
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith(f"# Load test of {gateway.url}")
    assert "| 1 | 8 | 4 |" in markdown
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ramp_reports_breaking_point(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short ramp finds a breaking point or reports that none was reached."""
    code = _loadtest(
        gateway,
        tmp_path,
        "--tasks", "4",
        "--duration", "2",
        "--ramp",
        "--ramp-start", "8",
        "--ramp-step", "8",
        "--ramp-steps", "2",
        "--ramp-retries", "0",
    )  # fmt: skip

    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    offered = [step["offered_per_second"] for step in report["steps"]]
    assert offered in ([8], [8, 16])
    point = report["breaking_point_per_second"]
    passed = [s["offered_per_second"] for s in report["steps"] if s["passed"]]
    assert point == (max(passed) if passed else None)
    output = capsys.readouterr().out
    if point is None:
        assert "No step passed" in output
    else:
        assert f"80% of the breaking point {point:.0f} messages/s" in output
        assert "ChatMessageRateHigh" in output
    assert "Breaking point" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "0"], "argument --tasks: must be a positive integer, not '0'"),
        (["--rate", "-1"], "argument --rate: must be a positive number, not '-1'"),
        (["--duration", "abc"], "must be a positive number, not 'abc'"),
        (["--ramp-factor", "2"], "--ramp-factor only apply with --ramp"),
        (["--ramp", "--ramp-factor", "0.5"], "must be greater than 1, not '0.5'"),
    ],
)
def test_bad_option_exits_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid numbers and misplaced ramp options are rejected before any load."""
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["loadtest", "--url", url, "--secret", SECRET, "--out", str(tmp_path)]
    code = _run([*argv, *flags])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_unreachable_url_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL where nothing listens is reported as unreachable."""
    url = f"http://127.0.0.1:{free_port()}"
    code = _run(["loadtest", "--url", url, "--secret", SECRET, "--out", str(tmp_path)])

    assert code == 2
    assert f"cannot reach the gateway at {url}" in capsys.readouterr().err


def test_non_gateway_url_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An HTTP server that does not speak Socket.IO is named as the wrong URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        code = _run(
            ["loadtest", "--url", url, "--secret", SECRET, "--out", str(tmp_path)]
        )
    finally:
        server.shutdown()
        server.server_close()

    assert code == 2
    error = capsys.readouterr().err
    assert f"could not open a Socket.IO websocket at {url}" in error
    assert "check that --url points at a chat gateway" in error


def test_short_secret_exits_2(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret too short for HS256 is rejected with the length rule."""
    code = _run(
        ["loadtest", "--url", gateway.url, "--secret", "short", "--out", str(tmp_path)]
    )

    assert code == 2
    assert "HS256 needs at least 32" in capsys.readouterr().err


def test_wrong_secret_exits_2(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret the gateway does not share gets its refusal, not a crash."""
    wrong = "w" * 48
    code = _run(
        ["loadtest", "--url", gateway.url, "--secret", wrong, "--out", str(tmp_path)]
    )

    assert code == 2
    error = capsys.readouterr().err
    assert "rejected the load test's socket" in error
    assert "invalid access token" in error


def test_missing_secret_file_exits_2(
    gateway: RunningGateway,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a secret or a secret file, the error names both ways to give one."""
    monkeypatch.delenv("CHAT_JWT_SECRET", raising=False)
    argv = ["loadtest", "--url", gateway.url, "--data-dir", str(tmp_path / "none")]
    code = _run(argv)

    assert code == 2
    assert "no JWT secret" in capsys.readouterr().err


class TestParts:
    """The pure parts: schedule, histogram, pass rule, ramp plan."""

    def test_send_offsets_evenly_spaced(self) -> None:
        """Sends are 1/rate apart, start within the first interval, end in time."""
        import random

        offsets = send_offsets(4.0, 3.0, random.Random(7))

        assert len(offsets) == 12
        assert 0 <= offsets[0] < 0.25
        assert offsets[-1] < 3.0
        gaps = {round(b - a, 9) for a, b in itertools.pairwise(offsets)}
        assert gaps == {0.25}

    def test_histogram_percentiles_within_two_percent(self) -> None:
        """Percentiles of 1..10000 µs land within 1/64 of the exact value."""
        histogram = LatencyHistogram()
        for micros in range(1, 10001):
            histogram.record(micros / 1_000_000)

        for fraction in (0.5, 0.95, 0.99):
            exact = fraction * 10000 / 1_000_000
            value = histogram.percentile(fraction)
            assert value is not None
            assert exact <= value <= exact * (1 + 1 / 64)
        assert histogram.max == 0.01

    def test_histogram_merge_adds_counts(self) -> None:
        """Merging two histograms equals recording everything in one."""
        first, second, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
        for value in (0.001, 0.002, 0.5):
            first.record(value)
            both.record(value)
        for value in (0.003, 0.2):
            second.record(value)
            both.record(value)

        first.merge(second)

        assert first.counts == both.counts
        assert first.total == 5
        assert first.max == 0.5

    def test_rule_names_each_failure(self) -> None:
        """Latency, errors and shortfall each produce their own reason."""
        rule = BreakingRule()

        passed = rule.failures(offered=100, achieved=96, p95=0.15, errors=0, sent=1000)
        failed = rule.failures(offered=100, achieved=90, p95=0.2, errors=1, sent=1000)

        assert passed == []
        assert len(failed) == 3
        assert failed[0].startswith("p95 ack latency 200.0 ms > 150 ms")
        assert failed[1].startswith("errors 0.10% >= 0.1%")
        assert failed[2].startswith("achieved 90.0/s")

    def test_ramp_fills_users_then_raises_their_rate(self) -> None:
        """Users grow at the per-user rate until every task is active."""
        steps = plan_ramp(
            tasks=10, rate=1.0, duration=5, start=4, step=None, factor=2.0, steps=4
        )

        assert [s.offered for s in steps] == [4, 8, 16, 32]
        assert [s.active_users for s in steps] == [4, 8, 16, 20]
        assert [s.user_rate for s in steps] == [1.0, 1.0, 1.0, 1.6]
