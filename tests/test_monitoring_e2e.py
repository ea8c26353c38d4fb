"""The monitoring assets against the real tools, end to end.

One scenario serves every test of this module. A ``chat-gateway serve``
process takes a short load from Socket.IO clients and sends its spans to an
OTLP sink in this test. A real Prometheus (Debian's 2.42) scrapes it every
second with exemplar storage on and evaluates a copy of
alerts/chat-gateway.rules.yml. A real Alertmanager (0.25) runs a copy of
alerts/alertmanager.yml whose webhooks point at a receiver in this test.

The copies change only what a short run needs: every ``for`` becomes
TEST_FOR (20 s for ChatGatewayDown), ChatMessageRateHigh fires above
TEST_RATE_LIMIT instead of 80, group_wait and group_interval become 1 s, and
every webhook URL points at the test receiver. Expressions, labels,
annotations, routes and inhibit rules are the real ones.

Without prometheus or prometheus-alertmanager the scenario's tests are
skipped, except under CI (the CI environment variable set), where they fail.

To regenerate docs/dashboard.png from a 60 s load, run from the repository
root:

    RENDER_DASHBOARD=docs/dashboard.png pytest tests/test_monitoring_e2e.py
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from matplotlib.image import imread
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from prometheus_client.parser import text_string_to_metric_families

from dashboards.build import MESSAGE_RATE_LIMIT, PANELS, panel_queries
from dashboards.render import render
from service.auth import issue_token
from service.embedded import EmbeddedMongo, free_port
from tests.conftest import SECRET, Client, GatewayProcess, wait_ready
from tests.test_alert_rules import _runbook_queries

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "alerts" / "chat-gateway.rules.yml"
ALERTMANAGER = REPO / "alerts" / "alertmanager.yml"
RUNBOOKS = REPO / "docs" / "runbooks"

RENDER_TARGET = os.environ.get("RENDER_DASHBOARD")

# The test copy of the rules: short `for` durations, and a message-rate limit
# that the load below crosses by a wide margin.
TEST_FOR = "5s"
# Prometheus sends a new target to its scrapers at most every 5 s (updatert in
# its discovery/manager.go), and 2.42 scraped its first target 5.9 s after
# start in one measurement. Until then absent(up{job="chat-gateway"}) is true,
# so a 5 s `for` would page at every start.
TEST_FOR_BY_ALERT = {"ChatGatewayDown": "20s"}
TEST_RATE_LIMIT = 2.0
TEST_RATE_INTERVAL = "10s"  # replaces $__rate_interval: ten 1 s scrapes

# Each client sends one message every LOAD_INTERVAL_SECONDS, so the load peaks
# at 16 messages/s once every client has joined. Clients join one by one over
# the first half of the load, which draws a ramp on the rendered dashboard.
LOAD_CLIENTS = 4
LOAD_INTERVAL_SECONDS = 0.25
LOAD_SECONDS = 60.0 if RENDER_TARGET else 15.0
PEAK_RATE = LOAD_CLIENTS / LOAD_INTERVAL_SECONDS
# Client 0 sends every 10th message over CHAT_MAX_TEXT_CHARS, so that the
# "Rejections by code" panel shows a text_too_long rate.
MAX_TEXT_CHARS = 200
TOO_LONG_EVERY = 10

ALERT_WAIT_SECONDS = 30.0

# Metric names that the queries use but the gateway does not export.
SYNTHETIC_METRICS = {
    "up": "Prometheus writes it for every scrape target, 1 after a good scrape",
    "scrape_duration_seconds": "Prometheus writes it for every scrape target",
}

# Alerts that this run does not make fire, with the reason their expression
# usually returns nothing here. Each expression must still parse, and its
# `bool` form (see _without_filters) must return a series, which proves that
# every selector in it matches live data.
QUIET_ALERTS = {
    "ChatGatewayDown": "the gateway is scraped, so up is 1 and absent() is empty",
    "ChatMongoWriteErrors": "SecantusDB accepts every write",
    "ChatMongoWriteLatencyHigh": "SecantusDB's write p95 is near 30 ms on a busy box",
    "ChatEventLoopLagHigh": "the lag p95 stays near 10 ms, far below 50 ms",
    "ChatMessagesRejected": "a few messages wait in the writer queue, not 5000",
    "ChatMemoryNearLimit": "the gateway uses far less than its memory limit",
    "ChatIndexBacklogGrowing": "the backlog stays below ten messages, not 1000",
    "ChatIndexErrors": "the local embedder and Qdrant do not fail",
    "ChatTraceSpansDropped": "the OTLP recorder accepts every export",
}
FIRING_ALERT = "ChatMessageRateHigh"

# Runbook queries, keyed as _runbook_queries() names them, that return nothing
# in this run, and why.
RUNBOOK_QUERIES_WITHOUT_DATA = {
    'ChatGatewayDown.md: absent(up{job="chat-gateway"})': (
        "absent() returns a series only while the job has no target"
    ),
    "ChatMemoryNearLimit.md: deriv(sum by (instance) "
    '(chat_heap_bytes{job="chat-gateway"})[1h:1m]) * 3600': (
        "the 1m subquery needs two points, two minute boundaries into the run"
    ),
}

# Latency histograms whose observations carry a trace_id exemplar.
# NOTE: the dashboard requests exemplars on every latency panel, but the
# gateway observes the event-loop lag outside any span and the embedder and
# Qdrant durations without an exemplar, so those three panels show none.
EXEMPLAR_METRICS = (
    "chat_mongo_write_duration_seconds_bucket",
    "chat_message_ack_duration_seconds_bucket",
    "chat_fanout_duration_seconds_bucket",
    "chat_index_lag_seconds_bucket",
)


# -- metric names in PromQL ---------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|[^{}"'`])*\})
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*["'`]([^"'`]+)""")


def _is_call(following: str) -> bool:
    """Tell whether the token after a name makes it a function or aggregation."""
    return following == "(" or following.lower() in ("by", "without")


def metric_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression selects.

    A name is a metric unless it is a keyword or a call: followed by ``(``,
    or by ``by``/``without`` as in ``sum by (le) (...)``. Label names inside
    ``{...}`` and inside ``by (...)`` and the other grouping clauses, strings
    and durations are skipped, and ``{__name__="x"}`` counts as metric x.
    """
    tokens = [
        (match.lastgroup, match.group())
        for match in _TOKEN.finditer(expr)
        if match.lastgroup != "space"
    ]
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        keyword = kind == "name" and text.lower() in _KEYWORDS
        if kind == "matchers":
            names.update(_NAME_MATCHER.findall(text))
        elif keyword and text.lower() in _GROUPING and following == "(":
            # Skip the label names up to ")": grouping lists never nest.
            index = tokens.index(("other", ")"), index)
        elif kind == "name" and not keyword and not _is_call(following):
            names.add(text)
        index += 1
    return names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('up{job="chat-gateway"} == 0', {"up"}),
        ("rate(a_total[5m]) / b", {"a_total", "b"}),
        (
            "histogram_quantile(0.95, sum by (le, instance) (rate(x_bucket[5m])))",
            {"x_bucket"},
        ),
        ('sum(rate(a{code=~"x|y", le="1e3"}[1m])) without (code)', {"a"}),
        ("a / on (instance) group_left (code) b > bool 1e3", {"a", "b"}),
        ('{__name__="c_total", job="j"} offset 5m', {"c_total"}),
        ("max without (instance) (deriv(g[10m])) > 0 and g > Inf", {"g"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ("recorded:rate5m unless on (pod) other", {"recorded:rate5m", "other"}),
    ],
)
def test_metric_names_extracted(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


# -- the scenario ---------------------------------------------------------------


class _PostHandler(BaseHTTPRequestHandler):
    server: _PostRecorder

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.record(self.path, self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _PostRecorder(ThreadingHTTPServer):
    """An HTTP server on a free loopback port that stores every POST body."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PostHandler)
        self._bodies: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def record(self, path: str, body: bytes) -> None:
        with self._lock:
            self._bodies.append((path, body))

    def received(self) -> list[tuple[str, bytes]]:
        """Return the (path, body) of every POST so far."""
        with self._lock:
            return list(self._bodies)


@dataclass
class LoadResult:
    accepted: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Scenario:
    gateway: GatewayProcess
    instance: str
    prometheus: str
    alertmanager: str
    webhook: _PostRecorder
    otlp: _PostRecorder
    load: LoadResult
    load_start: float
    load_end: float
    end: float

    def notifications(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.webhook.received()]

    def alerts(self, name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Return (notification, alert) pairs of the alerts named ``name``."""
        return [
            (payload, alert)
            for payload in self.notifications()
            for alert in payload["alerts"]
            if alert["labels"]["alertname"] == name
        ]

    def exported_trace_ids(self) -> set[str]:
        trace_ids: set[str] = set()
        for path, body in self.otlp.received():
            if path != "/v1/traces":
                continue
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    trace_ids.update(span.trace_id.hex() for span in scope_spans.spans)
        return trace_ids


def _tool(package: str, *names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    message = (
        f"{' or '.join(names)} is not on PATH: install the Debian package {package}"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI must run the end-to-end monitoring test.")
    pytest.skip(message)


def _start(
    stack: ExitStack, command: list[str], log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    return process


def _wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until ``url`` returns HTTP 200, or raise with the process's log."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    log = log_path.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{url} did not return HTTP 200 within 30 s. Log:\n{log}")


def _test_rules() -> dict[str, Any]:
    """Return the rules with TEST_FOR and TEST_RATE_LIMIT in place."""
    document: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR_BY_ALERT.get(rule["alert"], TEST_FOR)
            if rule.get("alert") == FIRING_ALERT:
                rule["expr"], count = re.subn(
                    rf">\s*{MESSAGE_RATE_LIMIT:g}\s*$",
                    f"> {TEST_RATE_LIMIT:g}",
                    rule["expr"].rstrip(),
                )
                assert count == 1, f"no '> {MESSAGE_RATE_LIMIT:g}' in {rule['expr']}"
    return document


def _test_alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """Return alertmanager.yml with 1 s waits and every webhook at ``webhook_url``."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER.read_text())
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        routes.extend(route.get("routes", []))

    webhooks = [
        webhook
        for receiver in config["receivers"]
        for webhook in receiver.get("webhook_configs", [])
    ]
    assert webhooks, "alertmanager.yml has no webhook receiver to point at the test"
    for webhook in webhooks:
        webhook["url"] = webhook_url
    return config


def _spawn_gateway(
    stack: ExitStack, secantus: EmbeddedMongo, directory: Path, otlp_url: str
) -> GatewayProcess:
    port = free_port()
    env = {
        "MONGODB_URI": secantus.uri,
        "CHAT_MONGODB_DATABASE": f"chat_e2e_{os.getpid()}",
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_MAX_TEXT_CHARS": str(MAX_TEXT_CHARS),
        "CHAT_RECONCILE_INTERVAL_SECONDS": "1",
        "CHAT_RUNTIME_LOG_INTERVAL_SECONDS": "1",
        # Tracing is on only with an OTLP endpoint, and exemplars need traces.
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "CHAT_"))
    }
    full_env.update(env)
    log_path = directory / "gateway.log"
    command = [
        str(Path(sys.executable).with_name("chat-gateway")), "serve",
        "--port", str(port), "--data-dir", str(directory / "gateway"),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", port, log_path, env)
    stack.callback(gateway.stop)
    wait_ready(gateway.url, process=process)
    return gateway


def _start_alertmanager(
    stack: ExitStack, binary: str, directory: Path, webhook_url: str
) -> str:
    config = directory / "alertmanager.yml"
    config.write_text(yaml.safe_dump(_test_alertmanager_config(webhook_url)))
    address = f"127.0.0.1:{free_port()}"
    log_path = directory / "alertmanager.log"
    process = _start(
        stack,
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={directory / 'alertmanager-data'}",
            f"--web.listen-address={address}",
            f"--web.external-url=http://{address}",
            "--cluster.listen-address=",
        ],
        log_path,
    )
    _wait_http(f"http://{address}/-/ready", process, log_path)
    return f"http://{address}"


def _start_prometheus(
    stack: ExitStack,
    binary: str,
    directory: Path,
    gateway: GatewayProcess,
    alertmanager: str,
) -> str:
    rules = directory / "chat-gateway.rules.yml"
    rules.write_text(yaml.safe_dump(_test_rules()))
    config = {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(rules)],
        "alerting": {
            "alertmanagers": [
                {
                    "static_configs": [
                        {"targets": [alertmanager.removeprefix("http://")]}
                    ]
                }
            ]
        },
        "scrape_configs": [
            {
                "job_name": "chat-gateway",
                "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"]}],
            }
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log_path = directory / "prometheus.log"
    process = _start(
        stack,
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={directory / 'prometheus-data'}",
            f"--web.listen-address={address}",
            # The generatorURL of each alert starts with the external URL,
            # which defaults to the machine's hostname.
            f"--web.external-url=http://{address}",
            # With exemplar storage on, Prometheus 2.42 keeps the exemplars of
            # its scrapes, which request OpenMetrics in the Accept header.
            "--enable-feature=exemplar-storage",
        ],
        log_path,
    )
    _wait_http(f"http://{address}/-/ready", process, log_path)
    return f"http://{address}"


def _wait_scraped(prometheus: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = _query(prometheus, 'up{job="chat-gateway"}')
        if result and result[0]["value"][1] == "1":
            return
        time.sleep(0.2)
    raise RuntimeError("Prometheus did not scrape the gateway within 20 s")


async def _send_load(url: str) -> LoadResult:
    """Send messages from LOAD_CLIENTS clients for LOAD_SECONDS."""
    result = LoadResult()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    join_every = LOAD_SECONDS / (2 * LOAD_CLIENTS)

    async def run_client(number: int) -> None:
        await asyncio.sleep(number * join_every)
        token = issue_token(
            SECRET, user=f"load-{number}", task="e2e", role="operator", ttl=600
        )
        client = await Client(url, token).connect()
        try:
            sent = 0
            next_send = loop.time()
            while loop.time() < deadline:
                too_long = number == 0 and sent % TOO_LONG_EVERY == TOO_LONG_EVERY - 1
                text = "x" * (MAX_TEXT_CHARS + 1) if too_long else f"load {sent}"
                ack = await client.send(text, f"e2e-{number}-{sent}")
                if ack.get("ok"):
                    result.accepted += 1
                else:
                    result.rejected[ack["error"]["code"]] += 1
                sent += 1
                next_send += LOAD_INTERVAL_SECONDS
                await asyncio.sleep(max(0.0, next_send - loop.time()))
        finally:
            await client.close()

    await asyncio.gather(*(run_client(number) for number in range(LOAD_CLIENTS)))
    return result


def _wait_for_alert(webhook: _PostRecorder, name: str) -> None:
    deadline = time.monotonic() + ALERT_WAIT_SECONDS
    while time.monotonic() < deadline:
        for _, body in webhook.received():
            alerts = json.loads(body)["alerts"]
            if any(alert["labels"]["alertname"] == name for alert in alerts):
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scenario(
    secantus: EmbeddedMongo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """Run the gateway under load with Prometheus and Alertmanager watching it."""
    prometheus_binary = _tool("prometheus", "prometheus")
    alertmanager_binary = _tool(
        "prometheus-alertmanager", "prometheus-alertmanager", "alertmanager"
    )
    directory = tmp_path_factory.mktemp("monitoring")
    with ExitStack() as stack:
        webhook = _PostRecorder()
        stack.callback(webhook.shutdown)
        otlp = _PostRecorder()
        stack.callback(otlp.shutdown)

        alertmanager = _start_alertmanager(
            stack, alertmanager_binary, directory, f"{webhook.url}/alerts"
        )
        gateway = _spawn_gateway(stack, secantus, directory, otlp.url)
        prometheus = _start_prometheus(
            stack, prometheus_binary, directory, gateway, alertmanager
        )
        _wait_scraped(prometheus)

        load_start = time.time()
        load = asyncio.run(_send_load(gateway.url))
        load_end = time.time()
        _wait_for_alert(webhook, FIRING_ALERT)
        # Wait for one more scrape and rule evaluation after the last message.
        time.sleep(2)

        yield Scenario(
            gateway=gateway,
            instance=f"127.0.0.1:{gateway.port}",
            prometheus=prometheus,
            alertmanager=alertmanager,
            webhook=webhook,
            otlp=otlp,
            load=load,
            load_start=load_start,
            load_end=load_end,
            end=time.time(),
        )


# -- Prometheus HTTP API -------------------------------------------------------


def _api(prometheus: str, path: str, **params: Any) -> Any:
    """Call the Prometheus HTTP API and return ``data``, failing on any error."""
    response = httpx.get(f"{prometheus}{path}", params=params, timeout=30)
    body = response.json()
    assert body.get("status") == "success", (
        f"{path} {params}: HTTP {response.status_code}, "
        f"{body.get('errorType')}: {body.get('error')}"
    )
    return body["data"]


def _query(prometheus: str, expr: str, at: float | None = None) -> list[Any]:
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    result: list[Any] = _api(prometheus, "/api/v1/query", **params)["result"]
    return result


def _query_range(scenario: Scenario, expr: str) -> list[Any]:
    data = _api(
        scenario.prometheus,
        "/api/v1/query_range",
        query=expr,
        start=scenario.load_start,
        end=scenario.end,
        step=1,
    )
    result: list[Any] = data["result"]
    return result


def _has_finite_point(series: list[Any]) -> bool:
    return any(
        math.isfinite(float(value)) for entry in series for _, value in entry["values"]
    )


def _alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def _without_filters(expr: str) -> str:
    """Turn every comparison with a number into a `bool` comparison.

    ``x > 80`` drops the series at or below 80, while ``x > bool 80`` keeps
    every series with the value 0 or 1, so the result shows which series the
    selectors matched however far from its threshold each one is.
    """
    return re.sub(
        r"(==|!=|>=|<=|>|<)\s*(?=[-+]?(?:\d|\.\d|Inf|NaN))", r"\1 bool ", expr
    )


def _panel_expressions(instance: str) -> list[tuple[str, str]]:
    return [
        (title, expr)
        for title, exprs in panel_queries(instance, TEST_RATE_INTERVAL).items()
        for expr in exprs
    ]


# -- tests of the scenario ----------------------------------------------------------


def test_load_accepted_and_rejected(scenario: Scenario) -> None:
    """The load was served at its pace, and only the oversized messages rejected."""
    join_every = LOAD_SECONDS / (2 * LOAD_CLIENTS)
    client_seconds = sum(
        LOAD_SECONDS - number * join_every for number in range(LOAD_CLIENTS)
    )
    planned = client_seconds / LOAD_INTERVAL_SECONDS
    sent = scenario.load.accepted + sum(scenario.load.rejected.values())
    assert sent >= 0.7 * planned, f"sent {sent} of {planned:.0f} planned messages"
    assert set(scenario.load.rejected) == {"text_too_long"}


def test_gateway_target_healthy(scenario: Scenario) -> None:
    targets = _api(scenario.prometheus, "/api/v1/targets")["activeTargets"]
    assert len(targets) == 1
    target = targets[0]
    assert target["labels"] == {"instance": scenario.instance, "job": "chat-gateway"}
    assert target["health"] == "up", target["lastError"]
    assert target["lastError"] == ""

    # Every scrape since the load started succeeded, not only the last one.
    window = math.ceil(scenario.end - scenario.load_start)
    lowest = _query(
        scenario.prometheus,
        f'min_over_time(up{{job="chat-gateway"}}[{window}s])',
        at=scenario.end,
    )
    assert [sample["value"][1] for sample in lowest] == ["1"]


def test_rules_evaluate_without_error(scenario: Scenario) -> None:
    groups = _api(scenario.prometheus, "/api/v1/rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert sorted(rules) == sorted(_alert_rules())
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    assert rules[FIRING_ALERT]["state"] == "firing"


def test_rate_alert_reaches_webhook(scenario: Scenario) -> None:
    """ChatMessageRateHigh goes through Alertmanager to the work-queue webhook."""
    pairs = [
        (payload, alert)
        for payload, alert in scenario.alerts(FIRING_ALERT)
        if alert["status"] == "firing"
    ]
    assert pairs, f"no firing {FIRING_ALERT} within {ALERT_WAIT_SECONDS} s"
    payload, alert = pairs[0]
    rule = _alert_rules()[FIRING_ALERT]

    assert payload["receiver"] == "work-queue"
    assert payload["externalURL"] == scenario.alertmanager
    assert alert["generatorURL"].startswith(f"{scenario.prometheus}/graph?")
    assert payload["groupLabels"] == {
        "alertname": FIRING_ALERT,
        "instance": scenario.instance,
    }
    # The rule aggregates by instance, so the job label does not survive it.
    assert alert["labels"] == {
        "alertname": FIRING_ALERT,
        "instance": scenario.instance,
        "severity": "warning",
    }
    annotations = alert["annotations"]
    assert annotations["summary"] == rule["annotations"]["summary"]
    assert annotations["runbook_url"] == rule["annotations"]["runbook_url"]
    assert (RUNBOOKS / f"{FIRING_ALERT}.md").is_file()

    description = annotations["description"]
    assert scenario.instance in description
    match = re.search(r"has accepted ([0-9.]+) messages per second", description)
    assert match, description
    assert TEST_RATE_LIMIT < float(match.group(1)) <= PEAK_RATE * 1.25, description
    assert "{{" not in description


def test_rate_alert_active_in_alertmanager(scenario: Scenario) -> None:
    response = httpx.get(
        f"{scenario.alertmanager}/api/v2/alerts",
        params={"filter": f'alertname="{FIRING_ALERT}"'},
        timeout=10,
    )
    assert response.status_code == 200
    alerts = response.json()
    assert len(alerts) == 1
    assert alerts[0]["status"]["state"] == "active"
    assert [receiver["name"] for receiver in alerts[0]["receivers"]] == ["work-queue"]


def test_no_page_in_healthy_run(scenario: Scenario) -> None:
    """A healthy gateway under load sends no critical alert."""
    critical = [
        alert["labels"]["alertname"]
        for payload in scenario.notifications()
        for alert in payload["alerts"]
        if alert["labels"].get("severity") == "critical"
    ]
    assert critical == []


def test_panel_queries_return_data(scenario: Scenario) -> None:
    """Every panel query parses and returns data, instant and over the load."""
    for title, expr in _panel_expressions(scenario.instance):
        instant = _query(scenario.prometheus, expr, at=scenario.load_end)
        assert instant, f"{title}: no series at the end of the load for {expr}"

        series = _query_range(scenario, expr)
        assert _has_finite_point(series), f"{title}: only NaN or no data for {expr}"


def test_alert_expressions_match_live_series(scenario: Scenario) -> None:
    test_rules = {
        rule["alert"]: rule
        for group in _test_rules()["groups"]
        for rule in group["rules"]
    }
    assert set(QUIET_ALERTS) | {FIRING_ALERT} == set(test_rules)

    for name, rule in _alert_rules().items():
        _query(scenario.prometheus, rule["expr"])
        _query_range(scenario, rule["expr"])
        unfiltered = _without_filters(rule["expr"])
        assert unfiltered != rule["expr"], f"{name}: no comparison in {rule['expr']}"
        assert _query(scenario.prometheus, unfiltered), (
            f"{name}: no series for {unfiltered}"
        )
        assert _has_finite_point(_query_range(scenario, unfiltered)), unfiltered

    firing = test_rules[FIRING_ALERT]["expr"]
    assert _query(scenario.prometheus, firing, at=scenario.load_end), firing


def test_runbook_queries_return_data(scenario: Scenario) -> None:
    """The PromQL that the runbooks tell an operator to run finds live data."""
    queries = _runbook_queries()
    assert set(RUNBOOK_QUERIES_WITHOUT_DATA) <= set(queries)
    for name, expr in queries.items():
        instant = _query(scenario.prometheus, expr, at=scenario.end)
        series = _query_range(scenario, expr)
        if name in RUNBOOK_QUERIES_WITHOUT_DATA:
            continue
        assert instant, f"{name}: no series at the end of the run"
        assert _has_finite_point(series), f"{name}: only NaN or no data"


def test_query_metric_names_exist(scenario: Scenario) -> None:
    """Every metric that a panel, alert or runbook query selects exists."""
    text = httpx.get(f"{scenario.gateway.url}/metrics", timeout=10).text
    exported = {
        sample.name: family.type
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    stored = set(_api(scenario.prometheus, "/api/v1/label/__name__/values"))

    expressions = [expr for _, expr in _panel_expressions(scenario.instance)]
    expressions += [rule["expr"] for rule in _alert_rules().values()]
    expressions += list(_runbook_queries().values())
    names = set().union(*(metric_names(expr) for expr in expressions))
    assert len(names) >= 20, names

    for name in sorted(names):
        assert name in stored, f"Prometheus stored no series named {name}"
        if name in SYNTHETIC_METRICS:
            continue
        assert name in exported, f"the gateway's /metrics has no {name}"
        if name.endswith(("_bucket", "_sum", "_count")):
            assert exported[name] == "histogram", f"{name} is a {exported[name]}"


def test_exemplars_link_to_exported_traces(scenario: Scenario) -> None:
    """Latency exemplars are stored, and each trace_id names an exported trace."""
    exported = scenario.exported_trace_ids()
    assert exported, "the gateway exported no spans to the OTLP sink"

    for metric in EXEMPLAR_METRICS:
        data = _api(
            scenario.prometheus,
            "/api/v1/query_exemplars",
            query=f'{metric}{{instance="{scenario.instance}"}}',
            start=scenario.load_start,
            end=scenario.end,
        )
        exemplars = [exemplar for series in data for exemplar in series["exemplars"]]
        assert exemplars, f"Prometheus stored no exemplars of {metric}"
        for exemplar in exemplars:
            trace_id = exemplar["labels"]["trace_id"]
            assert re.fullmatch(r"[0-9a-f]{32}", trace_id), trace_id
            assert trace_id in exported, f"{metric}: trace {trace_id} was not exported"


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 50_000
    pixels = imread(path)
    assert pixels.shape[0] > 1000
    assert pixels.shape[1] > 1000
    colors = {tuple(pixel) for pixel in pixels[::7, ::7].reshape(-1, pixels.shape[2])}
    assert len(colors) > 100, "the PNG is nearly blank"


def test_render_draws_every_panel(scenario: Scenario, tmp_path: Path) -> None:
    out = tmp_path / "dashboard.png"
    drawn = render(
        scenario.prometheus,
        out,
        start=scenario.load_start - 5,
        end=scenario.end,
        step=1,
        instance=scenario.instance,
        rate_interval=TEST_RATE_INTERVAL,
    )
    assert set(drawn) == {panel.title for panel in PANELS.values()}
    empty = [title for title, count in drawn.items() if count == 0]
    assert empty == []
    _check_png(out)

    if RENDER_TARGET:
        target = REPO / RENDER_TARGET
        target.write_bytes(out.read_bytes())


def test_render_command_writes_png(scenario: Scenario, tmp_path: Path) -> None:
    """The command line picks the gateway's instances itself, as "All" does."""
    out = tmp_path / "cli.png"
    minutes = (scenario.end - scenario.load_start) / 60 + 0.1
    command = [
        sys.executable, "-m", "dashboards.render",
        "--prometheus", scenario.prometheus,
        "--out", str(out),
        "--minutes", f"{minutes:.2f}",
        "--step", "1",
        "--rate-interval", TEST_RATE_INTERVAL,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "0 without data" in result.stdout, result.stdout
    _check_png(out)
