"""Checks of the monitoring assets: alert rules, Alertmanager, runbooks, dashboard.

promtool and amtool (Debian packages prometheus and prometheus-alertmanager)
check the files they own. The other tests check that the pieces agree with
each other: the thresholds table with the rules, every alert with its
promtool cases and runbook, the dashboard with its generator and with the
alert thresholds. Without promtool or amtool their tests are skipped, except
under CI (the CI environment variable set), where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "alerts" / "chat-gateway.rules.yml"
RULE_TESTS = REPO / "alerts" / "chat-gateway.rules.test.yml"
ALERTMANAGER = REPO / "alerts" / "alertmanager.yml"
RUNBOOKS = REPO / "docs" / "runbooks"
ALERTS_DOC = REPO / "docs" / "alerts.md"
DASHBOARD = REPO / "dashboards" / "chat-gateway.json"
BUILD_SCRIPT = REPO / "dashboards" / "build.py"
PROVISIONING = REPO / "dashboards" / "provisioning"

SEVERITIES = {"critical", "warning", "info"}
RUNBOOK_SECTIONS = ("## Meaning", "## Impact", "## Dashboard", "## Queries", "## Logs")
MITIGATION_TERMS = ("Short term", "Medium term", "Long term")
DATASOURCE_REF = "${datasource}"

# Panels the runbooks and docs/alerts.md refer to by title.
DOCUMENTED_PANELS = (
    "Messages per second",
    "Active sockets",
    "MongoDB write latency",
    "Ack latency p95",
    "Event-loop lag p95",
    "Memory (RSS and heap)",
    "Indexing queue depth and backlog",
    "Indexing lag",
    "Rejections by code",
    "MongoDB write errors",
)

# Panel title -> (alert whose threshold the panel draws, build.py constant).
THRESHOLD_PANELS = {
    "Messages per second": ("ChatMessageRateHigh", "MESSAGE_RATE_LIMIT"),
    "MongoDB write latency": ("ChatMongoWriteLatencyHigh", "MONGO_WRITE_P95_LIMIT"),
    "Event-loop lag p95": ("ChatEventLoopLagHigh", "EVENT_LOOP_LAG_P95_LIMIT"),
}


def _load_alerts() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        rule["alert"]: rule
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    }


ALERTS = _load_alerts()
ALERT_NAMES = sorted(ALERTS)


def _threshold_table() -> dict[str, tuple[str, str, str]]:
    """Parse the rules file's header table: alert -> (threshold, for, severity)."""
    table: dict[str, tuple[str, str, str]] = {}
    for line in RULES.read_text().splitlines():
        match = re.match(r"#\s+(Chat\w+)\s{2,}(.+?)\s{2,}(\d+[smh])\s+(\w+)\s*$", line)
        if match:
            name, threshold, duration, severity = match.groups()
            table[name] = (threshold, duration, severity)
    return table


def _comparisons(text: str) -> list[tuple[str, float]]:
    """Return the (operator, number) pairs of comparisons such as '> 0.030'."""
    return [
        (operator, float(number))
        for operator, number in re.findall(r"(==|>=|<=|>|<)\s*(\d+(?:\.\d+)?)\b", text)
    ]


def _find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not on PATH: install the Debian package {package}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}. CI must run this check, so it fails here.")
    pytest.skip(message)


@pytest.fixture(scope="session")
def promtool() -> str:
    return _find_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def amtool() -> str:
    return _find_tool("amtool", "prometheus-alertmanager")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


def _check_promql(promtool: str, queries: dict[str, str], directory: Path) -> None:
    """Parse each query with promtool by writing it as a recording rule."""
    rules = [
        {"record": f"check:query_{index}", "expr": query}
        for index, query in enumerate(queries.values())
    ]
    path = directory / "queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    names = "\n".join(queries)
    assert result.returncode == 0, f"{names}\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="session")
def build() -> ModuleType:
    """Import dashboards/build.py, which is a script and not a package module."""
    spec = importlib.util.spec_from_file_location("dashboard_build", BUILD_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves the module's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    matches = [panel for panel in _panels(dashboard) if panel["title"] == title]
    assert len(matches) == 1, (
        f"expected one panel titled {title!r}, found {len(matches)}"
    )
    return matches[0]


# -- promtool and amtool -------------------------------------------------------


def test_rules_pass_promtool_check(promtool: str) -> None:
    result = _run(promtool, "check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool_unit_tests(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_passes_amtool(amtool: str) -> None:
    result = _run(amtool, "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_receivers_pass_amtool(amtool: str, tmp_path: Path) -> None:
    """The commented example receivers stay valid once uncommented."""
    text = ALERTMANAGER.read_text()
    head, marker, examples = text.partition("  # Example receivers.")
    assert marker, "alertmanager.yml has no '# Example receivers.' section"
    uncommented = [
        line.replace("  # ", "  ", 1)
        for line in examples.splitlines()
        if re.match(r"  # [ -]", line)
    ]
    config = tmp_path / "alertmanager.yml"
    config.write_text(head + "\n".join(uncommented) + "\n")

    receivers = {r["name"] for r in yaml.safe_load(config.read_text())["receivers"]}
    assert {"pagerduty", "chat"} <= receivers
    result = _run(amtool, "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("severity", "receiver"),
    [
        ("critical", "page"),
        ("warning", "work-queue"),
        ("info", "context"),
        ("unknown", "page"),
    ],
)
def test_alertmanager_routes_by_severity(
    amtool: str, severity: str, receiver: str
) -> None:
    result = _run(
        amtool,
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        "alertname=ChatTest",
        f"severity={severity}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_groups_and_inhibits() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    assert config["route"]["group_by"] == ["alertname", "instance"]

    down_rules = [
        rule
        for rule in config["inhibit_rules"]
        if rule["source_matchers"] == ['alertname="ChatGatewayDown"']
    ]
    assert len(down_rules) == 1
    assert down_rules[0]["equal"] == ["instance"]
    assert 'alertname!="ChatGatewayDown"' in down_rules[0]["target_matchers"]


# -- rules against their table, tests, runbooks and docs -------------------------


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_has_labels_and_annotations(name: str) -> None:
    rule = ALERTS[name]
    annotations = rule.get("annotations", {})
    assert rule.get("labels", {}).get("severity") in SEVERITIES
    assert annotations.get("summary")
    description = annotations.get("description", "")
    assert "$labels" in description or "$value" in description, description
    assert annotations.get("runbook_url", "").endswith(f"/docs/runbooks/{name}.md")


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_runbook_complete(name: str) -> None:
    runbook = RUNBOOKS / f"{name}.md"
    assert runbook.is_file(), f"{runbook} is missing"
    text = runbook.read_text()
    assert text.startswith(f"# {name}\n")
    for section in RUNBOOK_SECTIONS:
        assert f"\n{section}\n" in text, f"{runbook.name} lacks {section}"
    mitigation = text.partition("\n## Mitigation\n")[2]
    for term in MITIGATION_TERMS:
        assert f"\n{term}:\n" in mitigation, f"{runbook.name} lacks {term} mitigations"


def test_runbooks_only_for_alerts() -> None:
    runbooks = {path.stem for path in RUNBOOKS.glob("*.md")}
    assert runbooks == set(ALERT_NAMES)


def test_every_alert_has_promtool_cases() -> None:
    """Each alert has a case where it fires and one where it stays silent."""
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])

    assert firing | silent <= set(ALERT_NAMES), "promtool cases name unknown alerts"
    assert sorted(firing) == ALERT_NAMES
    assert sorted(silent) == ALERT_NAMES


def test_threshold_table_lists_every_alert() -> None:
    assert sorted(_threshold_table()) == ALERT_NAMES


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_threshold_table_matches_rule(name: str) -> None:
    threshold, duration, severity = _threshold_table()[name]
    rule = ALERTS[name]
    assert rule["for"] == duration
    assert rule["labels"]["severity"] == severity

    expression = _comparisons(rule["expr"])
    for comparison in _comparisons(threshold):
        assert comparison in expression, f"{comparison} not in {rule['expr']}"


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alerts_doc_lists_alert(name: str) -> None:
    rule = ALERTS[name]
    rows = [
        line
        for line in ALERTS_DOC.read_text().splitlines()
        if line.startswith(f"| [{name}](runbooks/{name}.md) |")
    ]
    assert len(rows) == 1, f"docs/alerts.md has {len(rows)} table rows for {name}"
    assert rows[0].endswith(f"| {rule['for']} | {rule['labels']['severity']} |")


def _runbook_texts() -> Iterator[tuple[str, str]]:
    for path in sorted(RUNBOOKS.glob("*.md")):
        yield path.name, path.read_text()
    yield ALERTS_DOC.name, ALERTS_DOC.read_text()


def _runbook_queries() -> dict[str, str]:
    """Collect the PromQL of the runbooks' promql blocks.

    A query starts on an unindented line and continues on indented ones.
    """
    queries: dict[str, str] = {}
    for name, text in _runbook_texts():
        for block in re.findall(r"```promql\n(.*?)```", text, flags=re.DOTALL):
            lines: list[str] = []
            for line in [*block.splitlines(), ""]:
                if lines and not line.startswith(" "):
                    queries[f"{name}: {lines[0]}"] = "\n".join(lines)
                    lines = []
                if line.strip() and not line.startswith("#"):
                    lines.append(line)
    return queries


def test_runbook_queries_parse(promtool: str, tmp_path: Path) -> None:
    queries = _runbook_queries()
    assert len(queries) >= 2 * len(ALERT_NAMES)
    _check_promql(promtool, queries, tmp_path)


def test_runbook_settings_exist() -> None:
    """Every CHAT_* variable the docs name is a field of the gateway's Settings."""
    fields = set(Settings.model_fields)
    for name, text in _runbook_texts():
        for variable in sorted(set(re.findall(r"\bCHAT_[A-Z_]+\b", text))):
            field = variable.removeprefix("CHAT_").lower()
            assert field in fields, f"{name} names {variable}, which Settings lacks"


def test_runbook_panels_exist(dashboard: dict[str, Any]) -> None:
    titles = {panel["title"] for panel in _panels(dashboard)}
    for name, text in _runbook_texts():
        section = text.partition("\n## Dashboard\n")[2].partition("\n## ")[0]
        for title in re.findall(r"\*\*(.+?)\*\*", section):
            if title != "Chat gateway":
                assert title in titles, f"{name} names panel {title!r}"


# -- dashboard -----------------------------------------------------------------


def test_dashboard_matches_build(build: ModuleType) -> None:
    assert DASHBOARD.read_text() == build.render_dashboard(), (
        "dashboards/chat-gateway.json is stale: run `python dashboards/build.py`"
    )


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "chat-gateway"
    assert dashboard["tags"] == ["chat-gateway"]
    assert dashboard["refresh"] == "10s"
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["id"] is None


def test_dashboard_declares_prometheus_input(dashboard: dict[str, Any]) -> None:
    inputs = dashboard["__inputs"]
    assert [entry["pluginId"] for entry in inputs] == ["prometheus"]
    assert inputs[0]["type"] == "datasource"


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {
        variable["name"]: variable for variable in dashboard["templating"]["list"]
    }
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"

    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["query"] == "label_values(chat_active_sockets, instance)"
    assert instance["datasource"]["uid"] == DATASOURCE_REF
    assert instance["multi"] is True
    assert instance["includeAll"] is True


def _datasource_refs(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            yield from _datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _datasource_refs(item, f"{path}[{index}]")


def test_dashboard_has_no_fixed_datasource(dashboard: dict[str, Any]) -> None:
    refs = list(_datasource_refs(dashboard))
    assert refs
    for path, ref in refs:
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        assert uid == DATASOURCE_REF, f"{path} is {ref!r}, expected {DATASOURCE_REF}"


def test_dashboard_panels_titled_and_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel.get("title"), f"panel {panel['id']} has no title"
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == DATASOURCE_REF
        assert panel["targets"], f"panel {panel['title']!r} has no query"


@pytest.mark.parametrize("title", DOCUMENTED_PANELS)
def test_dashboard_has_documented_panel(dashboard: dict[str, Any], title: str) -> None:
    _panel(dashboard, title)


@pytest.mark.parametrize("title", sorted(THRESHOLD_PANELS))
def test_kpi_panel_draws_alert_threshold(
    dashboard: dict[str, Any], build: ModuleType, title: str
) -> None:
    alert, constant = THRESHOLD_PANELS[title]
    defaults = _panel(dashboard, title)["fieldConfig"]["defaults"]
    steps = defaults["thresholds"]["steps"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"
    assert steps[-1]["value"] == getattr(build, constant)

    # The first comparison of the alert's table row is its main threshold.
    _operator, limit = _comparisons(_threshold_table()[alert][0])[0]
    assert steps[-1]["value"] == limit


def test_latency_panels_request_exemplars(dashboard: dict[str, Any]) -> None:
    latency_targets = [
        (panel["title"], target)
        for panel in _panels(dashboard)
        for target in panel["targets"]
        if "_seconds_bucket" in target["expr"]
    ]
    assert len(latency_targets) >= 5
    for title, target in latency_targets:
        assert target["exemplar"] is True, f"{title}: {target['expr']}"


def test_quantiles_rate_buckets_and_keep_le(build: ModuleType) -> None:
    quantile = re.compile(
        r"histogram_quantile\(0\.\d+, sum by \(le(, \w+)*\) \(rate\(\w+_bucket\{"
    )
    expressions = [expr for exprs in build.panel_queries().values() for expr in exprs]
    quantiles = [expr for expr in expressions if "histogram_quantile" in expr]
    assert quantiles
    for expr in quantiles:
        assert quantile.match(expr), expr


def test_panel_queries_fill_variables(build: ModuleType) -> None:
    queries = build.panel_queries(instance="gateway:8000", rate_interval="2m")
    assert set(queries) == {panel.title for panel in build.PANELS.values()}
    for title, expressions in queries.items():
        for expr in expressions:
            assert "$" not in expr, f"{title}: {expr}"


def test_panel_queries_parse(build: ModuleType, promtool: str, tmp_path: Path) -> None:
    queries = {
        f"{title} #{index}": expr
        for title, exprs in build.panel_queries().items()
        for index, expr in enumerate(exprs)
    }
    _check_promql(promtool, queries, tmp_path)


def test_build_check_mode_passes() -> None:
    result = _run(sys.executable, str(BUILD_SCRIPT), "--check")
    assert result.returncode == 0, result.stderr


# -- Grafana provisioning -------------------------------------------------------


def test_datasources_link_exemplars_to_jaeger() -> None:
    path = PROVISIONING / "datasources" / "datasources.yaml"
    datasources = {
        ds["uid"]: ds for ds in yaml.safe_load(path.read_text())["datasources"]
    }

    prometheus = datasources["prometheus"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations == [{"name": "trace_id", "datasourceUid": "jaeger"}]

    jaeger = datasources["jaeger"]
    assert jaeger["type"] == "jaeger"
    assert jaeger["url"] == "http://jaeger:16686"


def test_dashboard_provider_reads_mounted_folder() -> None:
    path = PROVISIONING / "dashboards" / "dashboards.yaml"
    providers = yaml.safe_load(path.read_text())["providers"]
    assert len(providers) == 1
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
