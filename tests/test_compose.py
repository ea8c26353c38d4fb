"""Check the compose stack's files against each other, without a Docker engine.

No test here starts a container, so they check what the files alone can
prove. compose.yaml and compose.scale.yaml follow the Compose Specification
schema, and every bind-mounted path exists. Each host:port that one component
sends to is one that the named service listens on. Images are pinned, and the
gateway runs as a non-root user behind a /readyz healthcheck. Files another change
provides (dashboards/, alerts/) are checked when present and skipped, with
the reason, when absent.

HAProxy's configuration is also run for real when an `haproxy` binary is on
PATH: two stand-in replicas on 127.0.0.1 check stickiness, readiness gating
and the WebSocket tunnel.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "tests" / "compose-spec" / "compose-spec.json"

# Environment used to interpolate the compose files, as a `.env` would.
TEST_ENV = {"CHAT_JWT_SECRET": "x" * 64}

MODELS = {
    "single": ("compose.yaml",),
    "scale": ("compose.yaml", "compose.scale.yaml"),
}

# Folders written outside this change. A check that needs one of them is
# skipped, not failed, while the folder is absent.
EXTERNAL_DIRS = ("dashboards", "alerts")

# Services without a compose healthcheck, and why.
NO_HEALTHCHECK = {
    "otel-collector": "the image has no shell or HTTP client to run a probe",
}

# Grafana datasource uids that dashboards may name besides the provisioned ones.
GRAFANA_BUILTIN_UIDS = {"grafana", "-- Grafana --", "-- Mixed --", "-- Dashboard --"}

GATEWAY_CMD = [
    "chat-gateway",
    "serve",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--data-dir",
    "/data",
]


# ---------------------------------------------------------------------------
# Loading: YAML, Compose variable interpolation, and Compose file merging
# ---------------------------------------------------------------------------


class InterpolationError(ValueError):
    """A `${VAR:?message}` variable was unset or empty, or a `${...}` was invalid."""


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
_BRACED = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S
)


def interpolate_text(text: str, env: dict[str, str]) -> str:
    """Expand Compose variables: `$VAR`, `${VAR}`, `$$` and the `:-`, `-`, `:?`, `?`,
    `:+` and `+` forms of `${VAR<op>arg}`.
    """

    def expand(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")

        expression = match["braced"]
        parts = _BRACED.fullmatch(expression)
        if parts is None:
            raise InterpolationError(f"invalid interpolation: ${{{expression}}}")
        name, op, arg = parts["name"], parts["op"], parts["arg"]
        value = env.get(name)
        if op is None:
            return value or ""

        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else str(value)
        if op.endswith("?"):
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        return "" if missing else arg

    return _VARIABLE.sub(expand, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def as_mapping(value: Any) -> dict[str, Any]:
    """Return a Compose list-or-dict field (environment, depends_on) as a dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    mapping: dict[str, Any] = {}
    for item in value:
        key, _, rest = str(item).partition("=")
        mapping[key] = rest
    return mapping


def volume_target(volume: Any) -> str:
    if isinstance(volume, dict):
        return str(volume["target"])
    parts = str(volume).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge_service(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge two definitions of one service as Compose does for `-f a -f b`.

    Covers the rules these files rely on: mappings merge key by key, volumes
    are unique by container path, command and healthcheck.test are replaced,
    and other sequences are appended.
    """
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if key in ("environment", "depends_on"):
            merged[key] = as_mapping(current) | as_mapping(value)
        elif key == "volumes":
            by_target = {volume_target(v): v for v in current or []}
            by_target.update({volume_target(v): v for v in value})
            merged[key] = list(by_target.values())
        elif key in ("command", "entrypoint", "test"):
            # "test" is healthcheck.test, reached through the recursion below.
            merged[key] = value
        elif isinstance(current, dict) and isinstance(value, dict):
            merged[key] = merge_service(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            merged[key] = current + [item for item in value if item not in current]
        else:
            merged[key] = value
    return merged


def merge_project(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if key == "services":
            merged_services = dict(merged.get("services", {}))
            for name, service in value.items():
                base_service = merged_services.get(name, {})
                merged_services[name] = merge_service(base_service, service or {})
            merged[key] = merged_services
        elif key in ("volumes", "networks") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


@functools.cache
def compose_model(mode: str) -> dict[str, Any]:
    """Return the interpolated, merged Compose model for "single" or "scale"."""
    model: dict[str, Any] = {}
    for name in MODELS[mode]:
        model = merge_project(model, interpolate(load_yaml(ROOT / name), TEST_ENV))
    return model


def services(mode: str) -> dict[str, dict[str, Any]]:
    return compose_model(mode)["services"]


# ---------------------------------------------------------------------------
# Reading services: ports, mounts, and the files they mount
# ---------------------------------------------------------------------------


def container_port(entry: Any) -> int:
    """Return the container-side port of a `ports` or `expose` entry."""
    if isinstance(entry, dict):
        return int(entry["target"])
    text = str(entry).split("/")[0]
    return int(text.rsplit(":", 1)[-1])


def listening_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service's container listens on, from `expose` and `ports`."""
    entries = list(service.get("expose", [])) + list(service.get("ports", []))
    return {container_port(entry) for entry in entries}


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Return (host address, host port, container port) for each `ports` entry."""
    published = []
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) == 3, (
            f"port {entry!r} should be host_ip:host_port:container_port"
        )
        published.append((parts[0], int(parts[1]), int(parts[2])))
    return published


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """Return (host path, container path) for each bind mount of the service."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = str(volume["source"]), str(volume["target"])
        else:
            parts = str(volume).split(":")
            if len(parts) < 2 or not parts[0].startswith((".", "/", "~")):
                continue
            source, target = parts[0], parts[1]
        mounts.append(((ROOT / source).resolve(), target))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Map a path inside the container to the repository file mounted there."""
    best: tuple[Path, str] | None = None
    for source, target in bind_mounts(service):
        inside = container_path == target or container_path.startswith(
            target.rstrip("/") + "/"
        )
        if inside and (best is None or len(target) > len(best[1])):
            best = (source, target)
    assert best is not None, f"{container_path} is not inside any bind mount"
    source, target = best
    return source / container_path[len(target) :].lstrip("/")


def skip_if_external_missing(path: Path) -> None:
    relative = path.relative_to(ROOT)
    if relative.parts[0] in EXTERNAL_DIRS and not path.exists():
        owner = relative.parts[0]
        pytest.skip(f"{relative} does not exist yet; {owner}/ is another change")


def split_host_port(address: str) -> tuple[str, int]:
    if "://" in address:
        parts = urlsplit(address)
        assert parts.hostname is not None, f"no host in {address!r}"
        assert parts.port is not None, f"no port in {address!r}"
        return parts.hostname, parts.port
    host, _, port = address.rpartition(":")
    return host, int(port)


def assert_reaches_service(mode: str, address: str, origin: str) -> None:
    """Assert that `address` names a service of the model and a port it listens on."""
    host, port = split_host_port(address)
    model_services = services(mode)
    assert host in model_services, (
        f"{origin}: {address} names no service of the {mode} stack"
    )
    ports = listening_ports(model_services[host])
    assert port in ports, f"{origin}: {host} listens on {sorted(ports)}, not {port}"


def command_flag(service: dict[str, Any], flag: str) -> str:
    for argument in service.get("command", []):
        if argument.startswith(flag + "="):
            return str(argument.split("=", 1)[1])
    raise AssertionError(f"command has no {flag}=...")


def collector_config() -> dict[str, Any]:
    service = services("single")["otel-collector"]
    # The contrib image's default command reads this path.
    return load_yaml(host_path(service, "/etc/otelcol-contrib/config.yaml"))


def prometheus_config(mode: str = "single") -> dict[str, Any]:
    service = services(mode)["prometheus"]
    return load_yaml(host_path(service, command_flag(service, "--config.file")))


def prometheus_targets(mode: str, job: dict[str, Any]) -> list[str]:
    """Return a scrape job's targets from static_configs and mounted file_sd files."""
    targets = [t for group in job.get("static_configs", []) for t in group["targets"]]
    service = services(mode)["prometheus"]
    for sd_config in job.get("file_sd_configs", []):
        for pattern in sd_config["files"]:
            path = host_path(service, pattern)
            for match in sorted(path.parent.glob(path.name)):
                targets += [t for group in load_yaml(match) for t in group["targets"]]
    return targets


def scrape_job(name: str, mode: str = "single") -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in prometheus_config(mode)["scrape_configs"]}
    assert name in jobs, f"prometheus.yml has no job {name!r}; jobs are {sorted(jobs)}"
    return jobs[name]


# ---------------------------------------------------------------------------
# Compose Specification schema and general service rules
# ---------------------------------------------------------------------------


@functools.cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def schema_errors(document: Any) -> list[str]:
    errors = compose_validator().iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_file_matches_schema(name: str) -> None:
    """Each compose file, interpolated, is valid against the Compose Specification."""
    document = interpolate(load_yaml(ROOT / name), TEST_ENV)
    assert schema_errors(document) == []


def test_merged_scale_model_matches_schema() -> None:
    """compose.yaml merged with compose.scale.yaml is still a valid Compose file."""
    assert schema_errors(compose_model("scale")) == []


def test_schema_rejects_invalid_service() -> None:
    """The vendored schema does catch errors, so the tests above can fail."""
    broken = {"services": {"gateway": {"image": "x:1", "ports": "8000"}}}
    assert schema_errors(broken) != []


def test_jwt_secret_is_required() -> None:
    """An unset or empty CHAT_JWT_SECRET stops compose with the documented message."""
    raw = load_yaml(ROOT / "compose.yaml")
    secret = raw["services"]["gateway"]["environment"]["CHAT_JWT_SECRET"]
    assert secret == "${CHAT_JWT_SECRET:?set CHAT_JWT_SECRET to 32+ random bytes}"
    for env in ({}, {"CHAT_JWT_SECRET": ""}):
        with pytest.raises(InterpolationError, match="set CHAT_JWT_SECRET to 32"):
            interpolate(raw, env)


@pytest.mark.parametrize("mode", MODELS)
def test_bind_mounts_exist(mode: str) -> None:
    """Every bind-mounted path exists, so Docker will not create an empty folder."""
    missing = []
    skipped = []
    for name, service in services(mode).items():
        for source, target in bind_mounts(service):
            relative = source.relative_to(ROOT)
            if source.exists():
                continue
            if relative.parts[0] in EXTERNAL_DIRS:
                skipped.append(f"{name}: {relative}")
            else:
                missing.append(f"{name}: {relative} -> {target}")
    assert missing == []
    if skipped:
        pytest.skip(f"written by another change, not present yet: {skipped}")


@pytest.mark.parametrize("mode", MODELS)
def test_named_volumes_are_declared(mode: str) -> None:
    """Every named volume a service mounts is declared under top-level `volumes`."""
    model = compose_model(mode)
    declared = set(model.get("volumes", {}))
    for name, service in model["services"].items():
        for volume in service.get("volumes", []):
            source = (
                volume.get("source")
                if isinstance(volume, dict)
                else volume.split(":")[0]
            )
            if source and not str(source).startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


@pytest.mark.parametrize("mode", MODELS)
def test_images_are_pinned(mode: str) -> None:
    """Every image names a version tag, never `latest` or no tag at all."""
    for name, service in services(mode).items():
        if "image" not in service:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        image = service["image"].split("@")[0]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: image {image!r} has no tag"
        assert "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d+\.\d+", tag), f"{name}: tag {tag!r} is not a version"


@pytest.mark.parametrize("mode", MODELS)
def test_published_ports_bind_to_loopback(mode: str) -> None:
    """Published ports listen on 127.0.0.1 only, as compose.yaml documents."""
    for name, service in services(mode).items():
        for address, _, _ in published_ports(service):
            assert address == "127.0.0.1", f"{name} publishes on {address}"


@pytest.mark.parametrize("mode", MODELS)
def test_services_have_healthchecks(mode: str) -> None:
    """Every service has a healthcheck, except those listed in NO_HEALTHCHECK."""
    for name, service in services(mode).items():
        if name in NO_HEALTHCHECK:
            assert "healthcheck" not in service
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"


@pytest.mark.parametrize("mode", MODELS)
def test_depends_on_uses_conditions(mode: str) -> None:
    """Each dependency has a condition; service_healthy targets have a healthcheck."""
    model_services = services(mode)
    for name, service in model_services.items():
        for dependency, options in as_mapping(service.get("depends_on")).items():
            assert dependency in model_services, (
                f"{name} depends on unknown {dependency}"
            )
            condition = (options or {}).get("condition")
            assert condition in ("service_started", "service_healthy"), (
                f"{name} -> {dependency}: condition {condition!r}"
            )
            if condition == "service_healthy":
                assert "healthcheck" in model_services[dependency], (
                    f"{name} waits for {dependency} to be healthy, "
                    "but it has no healthcheck"
                )


def test_gateway_waits_for_stores() -> None:
    """The gateway starts only after MongoDB and Qdrant report healthy."""
    depends_on = as_mapping(services("single")["gateway"]["depends_on"])
    assert depends_on["mongo"]["condition"] == "service_healthy"
    assert depends_on["qdrant"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["gateway", "gateway-2"])
def test_gateway_healthcheck_probes_readyz(name: str) -> None:
    """Each replica's compose healthcheck requests /readyz on port 8000."""
    test = " ".join(services("scale")[name]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in test


def test_gateway_settings() -> None:
    """The gateway reaches MongoDB, Qdrant and the collector by service name."""
    env = as_mapping(services("single")["gateway"]["environment"])
    assert env["MONGODB_URI"].startswith("mongodb://mongo:27017/chat?")
    assert_reaches_service("single", env["MONGODB_URI"].split("/")[2], "MONGODB_URI")
    assert_reaches_service("single", env["QDRANT_URL"], "QDRANT_URL")
    assert env["OTEL_SERVICE_NAME"] == "chat-gateway"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert 0.0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1.0
    assert env["CHAT_ALLOW_POLLING"] == "false"


# ---------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    pairs = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_dockerfile_base_images_are_pinned() -> None:
    """Every FROM is pinned to a full version: python:3.11 or node slim images."""
    instructions = dockerfile_instructions()
    args = {}
    for name, arguments in instructions:
        if name == "ARG" and "=" in arguments:
            key, _, value = arguments.partition("=")
            args[key] = value
    images = [a.split()[0] for name, a in instructions if name == "FROM"]
    assert images, "Dockerfile has no FROM"
    for image in images:
        resolved = interpolate_text(image, args)
        pinned = r"(python:3\.11|node:\d+\.\d+)\.\d+-slim(-\w+)?"
        assert re.fullmatch(pinned, resolved), resolved


def test_dockerfile_runs_as_non_root() -> None:
    """The final stage switches to a named, non-root user."""
    users = [arguments for name, arguments in final_stage() if name == "USER"]
    assert users, "the final stage has no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {user}"


def test_dockerfile_healthcheck_probes_readyz() -> None:
    """HEALTHCHECK requests /readyz with Python alone, no curl."""
    checks = [arguments for name, arguments in final_stage() if name == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "http://127.0.0.1:8000/readyz" in checks[0]
    assert "curl" not in checks[0]


def test_dockerfile_exposes_and_serves_8000() -> None:
    """The image exposes 8000 and starts the gateway there with /data as data dir."""
    stage = final_stage()
    assert ("EXPOSE", "8000") in stage
    commands = [json.loads(arguments) for name, arguments in stage if name == "CMD"]
    assert commands == [GATEWAY_CMD]


def test_dockerfile_installs_from_pyproject() -> None:
    """The build installs this project with pip, not a copied environment."""
    runs = " ".join(
        arguments for name, arguments in dockerfile_instructions() if name == "RUN"
    )
    assert "pip install --no-deps ." in runs
    assert "pyproject.toml" in runs


def test_dockerignore_keeps_context_small() -> None:
    """.dockerignore excludes local state and secrets but keeps the package sources."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = {
        line.strip() for line in lines if line.strip() and not line.startswith("#")
    }
    for required in (
        ".venv",
        "data",
        ".git",
        "**/__pycache__",
        ".pytest_cache",
        ".env",
        "node_modules",
    ):
        assert required in patterns, f".dockerignore lacks {required}"
    for needed in ("pyproject.toml", "README.md", "service", "*", "*.md"):
        assert needed not in patterns, (
            f".dockerignore excludes {needed}, which the build needs"
        )


# ---------------------------------------------------------------------------
# OpenTelemetry: gateway -> collector -> Jaeger
# ---------------------------------------------------------------------------


def test_gateway_exports_to_collector_receiver() -> None:
    """The gateway's OTLP endpoint is the collector receiver for its protocol."""
    env = as_mapping(services("single")["gateway"]["environment"])
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
    assert_reaches_service("single", endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT")

    host, port = split_host_port(endpoint)
    assert host == "otel-collector"
    receiver = {"grpc": "grpc", "http/protobuf": "http", "http/json": "http"}[protocol]
    protocols = collector_config()["receivers"]["otlp"]["protocols"]
    listen_host, listen_port = split_host_port(protocols[receiver]["endpoint"])
    assert listen_port == port, (
        f"{protocol} receiver listens on {listen_port}, not {port}"
    )
    assert listen_host == "0.0.0.0", (
        "a receiver on localhost is unreachable from the gateway"
    )


def test_collector_exports_to_jaeger() -> None:
    """Each traces exporter sends OTLP to a port the jaeger service listens on."""
    config = collector_config()
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    assert exporters, "the traces pipeline has no exporter"
    for name in exporters:
        exporter = config["exporters"][name]
        component_type = name.split("/")[0]
        assert component_type in ("otlp_grpc", "otlp"), (
            f"{name} is not an OTLP gRPC exporter"
        )
        host, port = split_host_port(exporter["endpoint"])
        assert host == "jaeger"
        assert port == 4317, "Jaeger receives OTLP gRPC on 4317"
        assert_reaches_service("single", exporter["endpoint"], name)
        assert exporter["tls"]["insecure"] is True


def test_collector_pipelines_name_defined_components() -> None:
    """Pipelines name only receivers, processors and exporters the config defines."""
    config = collector_config()
    used: dict[str, set[str]] = {
        "receivers": set(),
        "processors": set(),
        "exporters": set(),
    }
    for pipeline_name, pipeline in config["service"]["pipelines"].items():
        for kind, names in pipeline.items():
            defined = set(config.get(kind) or {})
            unknown = set(names) - defined
            assert not unknown, (
                f"pipeline {pipeline_name} names undefined {kind}: {unknown}"
            )
            used[kind] |= set(names)
    for kind, names in used.items():
        unused = set(config.get(kind) or {}) - names
        assert not unused, f"{kind} defined but in no pipeline: {unused}"
    defined_extensions = set(config.get("extensions") or {})
    assert set(config["service"].get("extensions", [])) <= defined_extensions


def test_collector_processor_order() -> None:
    """memory_limiter runs first and batch runs after tail_sampling."""
    processors = collector_config()["service"]["pipelines"]["traces"]["processors"]
    assert processors[0] == "memory_limiter"
    assert processors.index("tail_sampling") < processors.index("batch")


def test_collector_memory_limit_fits_container() -> None:
    """memory_limiter's hard limit is below the collector container's memory limit."""
    limiter = collector_config()["processors"]["memory_limiter"]
    assert {"check_interval", "limit_mib", "spike_limit_mib"} <= set(limiter)
    assert 0 < limiter["spike_limit_mib"] < limiter["limit_mib"]
    limit = services("single")["otel-collector"]["deploy"]["resources"]["limits"][
        "memory"
    ]
    size = re.fullmatch(r"(\d+)m", limit.lower())
    assert size is not None, f"collector memory limit {limit!r} is not in MiB"
    container_mib = int(size[1])
    assert limiter["limit_mib"] < container_mib


def test_tail_sampling_policies() -> None:
    """Tail sampling keeps errors, traces of 150 ms or more, and a share of the rest."""
    tail = collector_config()["processors"]["tail_sampling"]
    by_type = {policy["type"]: policy for policy in tail["policies"]}

    assert by_type["status_code"]["status_code"]["status_codes"] == ["ERROR"]
    assert by_type["latency"]["latency"]["threshold_ms"] == 150
    share = by_type["probabilistic"]["probabilistic"]["sampling_percentage"]
    assert 0 < share < 100
    assert tail["decision_wait"].endswith("s")
    assert tail["num_traces"] > 0


def test_collector_metrics_listen_for_prometheus() -> None:
    """The collector's own metrics listen on 0.0.0.0:8888 through a pull reader."""
    metrics = collector_config()["service"]["telemetry"]["metrics"]
    assert "address" not in metrics, "collectors since 0.123.0 ignore `address`"
    readers = [
        reader["pull"]["exporter"]["prometheus"] for reader in metrics["readers"]
    ]
    assert {"host": "0.0.0.0", "port": 8888} in [
        {"host": r["host"], "port": r["port"]} for r in readers
    ]


@pytest.mark.parametrize(("mode", "service"), [("single", "gateway"), ("scale", "lb")])
def test_collector_cors_allows_page_origins(mode: str, service: str) -> None:
    """The OTLP/HTTP receiver accepts every origin that serves the browser page."""
    cors = collector_config()["receivers"]["otlp"]["protocols"]["http"]["cors"]
    for _, host_port, _ in published_ports(services(mode)[service]):
        for host in ("localhost", "127.0.0.1"):
            origin = f"http://{host}:{host_port}"
            assert origin in cors["allowed_origins"], f"CORS lacks {origin}"


# ---------------------------------------------------------------------------
# Prometheus, Alertmanager and Grafana wiring
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODELS)
def test_scrape_targets_are_services(mode: str) -> None:
    """Every scrape target is a service of the stack on a port it listens on."""
    for job in prometheus_config(mode)["scrape_configs"]:
        for target in prometheus_targets(mode, job):
            assert_reaches_service(mode, target, f"job {job['job_name']}")


def test_gateway_scrape_asks_for_openmetrics() -> None:
    """The gateway job requests OpenMetrics first, so exemplars are scraped."""
    job = scrape_job("chat-gateway")
    assert job["scrape_protocols"][0] == "OpenMetricsText1.0.0"
    assert job.get("metrics_path", "/metrics") == "/metrics"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("single", ["gateway:8000"]), ("scale", ["gateway:8000", "gateway-2:8000"])],
)
def test_gateway_scrape_targets(mode: str, expected: list[str]) -> None:
    """Prometheus scrapes the one gateway, or both replicas when scaled out."""
    assert prometheus_targets(mode, scrape_job("chat-gateway", mode)) == expected


def test_collector_scrape_target() -> None:
    """Prometheus scrapes the collector's own metrics on otel-collector:8888."""
    assert prometheus_targets("single", scrape_job("otel-collector")) == [
        "otel-collector:8888"
    ]


def test_haproxy_scraped_only_when_scaled() -> None:
    """The haproxy job has targets only in the scale stack, where lb exists."""
    assert prometheus_targets("single", scrape_job("haproxy")) == []
    assert prometheus_targets("scale", scrape_job("haproxy", "scale")) == ["lb:8405"]


def test_prometheus_alerts_to_alertmanager() -> None:
    """Prometheus sends alerts to the alertmanager service on 9093."""
    managers = prometheus_config()["alerting"]["alertmanagers"]
    targets = [
        t for m in managers for group in m["static_configs"] for t in group["targets"]
    ]
    assert targets == ["alertmanager:9093"]
    assert_reaches_service("single", targets[0], "alertmanagers")


def test_prometheus_enables_exemplar_storage() -> None:
    """Prometheus runs with exemplar storage, and its config file is the mounted one."""
    service = services("single")["prometheus"]
    assert "--enable-feature=exemplar-storage" in service["command"]
    config_path = host_path(service, command_flag(service, "--config.file"))
    assert config_path == ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_rule_files_are_mounted() -> None:
    """rule_files point into a mounted folder that contains a rules file."""
    service = services("single")["prometheus"]
    patterns = prometheus_config()["rule_files"]
    assert patterns
    for pattern in patterns:
        path = host_path(service, pattern)
        skip_if_external_missing(path.parent)
        matches = sorted(path.parent.glob(path.name))
        assert matches, f"{pattern} matches no file in {path.parent.relative_to(ROOT)}"
        for match in matches:
            assert "groups" in load_yaml(match), f"{match.name} is not a rules file"


def test_alertmanager_config_is_mounted() -> None:
    """Alertmanager reads alerts/alertmanager.yml through its bind mount."""
    service = services("single")["alertmanager"]
    path = host_path(service, command_flag(service, "--config.file"))
    assert path == ROOT / "alerts" / "alertmanager.yml"
    skip_if_external_missing(path)
    assert "route" in load_yaml(path)


def grafana_datasources() -> list[dict[str, Any]]:
    service = services("single")["grafana"]
    folder = host_path(service, "/etc/grafana/provisioning/datasources")
    skip_if_external_missing(folder)
    files = sorted(folder.glob("*.y*ml"))
    assert files, f"no datasource file in {folder.relative_to(ROOT)}"
    return [source for path in files for source in load_yaml(path)["datasources"]]


@pytest.mark.parametrize(
    ("kind", "uid", "address"),
    [
        ("prometheus", "prometheus", "prometheus:9090"),
        ("jaeger", "jaeger", "jaeger:16686"),
    ],
)
def test_grafana_datasource_urls(kind: str, uid: str, address: str) -> None:
    """Grafana's provisioned datasources point at the prometheus and jaeger services."""
    matching = [source for source in grafana_datasources() if source["type"] == kind]
    assert len(matching) == 1, f"expected one {kind} datasource"
    source = matching[0]
    assert source["uid"] == uid
    assert split_host_port(source["url"]) == split_host_port(address)
    assert_reaches_service("single", source["url"], f"{kind} datasource")


def test_grafana_exemplars_link_to_jaeger() -> None:
    """Exemplar trace links, when configured, open a provisioned datasource."""
    uids = {source["uid"] for source in grafana_datasources()}
    for source in grafana_datasources():
        for link in source.get("jsonData", {}).get("exemplarTraceIdDestinations", []):
            if "datasourceUid" in link:
                assert link["datasourceUid"] in uids


def test_grafana_dashboard_provider_path_is_mounted() -> None:
    """The dashboard provider reads a folder that compose mounts from dashboards/."""
    service = services("single")["grafana"]
    folder = host_path(service, "/etc/grafana/provisioning/dashboards")
    skip_if_external_missing(folder)
    providers = [
        p
        for path in sorted(folder.glob("*.y*ml"))
        for p in load_yaml(path)["providers"]
    ]
    assert providers
    for provider in providers:
        assert host_path(service, provider["options"]["path"]).is_dir()


def datasource_references(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_dashboard_datasources_resolve() -> None:
    """Dashboard panels name a datasource variable or a provisioned uid."""
    uids = {source["uid"] for source in grafana_datasources()} | GRAFANA_BUILTIN_UIDS
    dashboards = sorted((ROOT / "dashboards").rglob("*.json"))
    if not dashboards:
        pytest.skip("dashboards/ has no dashboard JSON yet")
    for path in dashboards:
        for reference in datasource_references(
            json.loads(path.read_text(encoding="utf-8"))
        ):
            uid = reference.get("uid") if isinstance(reference, dict) else reference
            if uid is None or str(uid).startswith("$"):
                continue
            assert uid in uids, (
                f"{path.relative_to(ROOT)}: datasource {uid!r} is not provisioned"
            )


# ---------------------------------------------------------------------------
# Scale-out: replicas, Redis and HAProxy
# ---------------------------------------------------------------------------


def test_replicas_share_settings() -> None:
    """gateway-2 repeats gateway's settings except its instance id and data volume."""
    gateway = services("scale")["gateway"]
    replica = services("scale")["gateway-2"]

    gateway_env = as_mapping(gateway["environment"])
    replica_env = as_mapping(replica["environment"])
    assert gateway_env.pop("OTEL_RESOURCE_ATTRIBUTES").endswith(
        "service.instance.id=gateway"
    )
    assert replica_env.pop("OTEL_RESOURCE_ATTRIBUTES").endswith(
        "service.instance.id=gateway-2"
    )
    assert replica_env == gateway_env

    for key in ("build", "healthcheck", "deploy", "depends_on", "expose", "restart"):
        assert replica[key] == gateway[key], f"gateway-2 {key} differs from gateway"
    assert [volume_target(v) for v in replica["volumes"]] == ["/data"]
    assert replica["volumes"] != gateway["volumes"], "replicas must not share /data"


def test_replicas_use_redis() -> None:
    """Both replicas publish fan-out through the redis service."""
    for name in ("gateway", "gateway-2"):
        env = as_mapping(services("scale")[name]["environment"])
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert_reaches_service("scale", "redis:6379", f"{name} REDIS_URL")
    assert "REDIS_URL" not in as_mapping(services("single")["gateway"]["environment"])


def haproxy_service() -> dict[str, Any]:
    return services("scale")["lb"]


def haproxy_config_text() -> str:
    path = host_path(haproxy_service(), "/usr/local/etc/haproxy/haproxy.cfg")
    return path.read_text(encoding="utf-8")


def haproxy_sections() -> dict[str, list[str]]:
    """Return each `section name` header with its directive lines, comments removed."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in haproxy_config_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not raw[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line.strip())
    return sections


def test_haproxy_servers_are_replicas() -> None:
    """HAProxy's backend servers are the two gateway services on port 8000."""
    backend = haproxy_sections()["backend gateways"]
    servers = [line.split() for line in backend if line.startswith("server ")]
    assert [server[2] for server in servers] == ["gateway:8000", "gateway-2:8000"]
    for server in servers:
        assert_reaches_service("scale", server[2], f"haproxy server {server[1]}")
        assert "cookie" in server, f"server {server[1]} has no cookie value"


def test_haproxy_sticks_with_cookie() -> None:
    """The backend inserts a cookie and checks /readyz."""
    backend = haproxy_sections()["backend gateways"]
    assert any(line.startswith("cookie ") and " insert" in line for line in backend)
    assert "option httpchk GET /readyz" in backend


def test_haproxy_listens_where_compose_publishes() -> None:
    """HAProxy binds the port lb publishes and the port Prometheus scrapes."""
    sections = haproxy_sections()
    chat_port = int(sections["frontend chat"][0].split(":")[-1])
    monitoring_port = int(sections["frontend monitoring"][0].split(":")[-1])
    assert [p[2] for p in published_ports(haproxy_service())] == [chat_port]
    assert prometheus_targets("scale", scrape_job("haproxy", "scale")) == [
        f"lb:{monitoring_port}"
    ]


# ---------------------------------------------------------------------------
# Optional checks with real tools, skipped when the tool is absent
# ---------------------------------------------------------------------------


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
    )
    return result.returncode == 0


@pytest.mark.skipif(
    not docker_compose_available(), reason="docker compose plugin not installed"
)
@pytest.mark.parametrize("mode", MODELS)
def test_docker_compose_config(mode: str) -> None:
    """`docker compose config` (no engine needed) accepts the files."""
    files = [argument for name in MODELS[mode] for argument in ("-f", str(ROOT / name))]
    result = subprocess.run(
        ["docker", "compose", *files, "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **TEST_ENV},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_config_is_valid() -> None:
    """`haproxy -c` accepts the configuration (replica names need not resolve)."""
    path = host_path(haproxy_service(), "/usr/local/etc/haproxy/haproxy.cfg")
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A threading HTTP server that ignores connections its peer resets.

    HAProxy ends each health check with a TCP reset, which the standard
    server would report as a traceback on stderr.
    """

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def websocket_accept(headers: Any) -> str:
    guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    key = headers["Sec-WebSocket-Key"] + guid
    # SHA-1 is what RFC 6455 prescribes for this handshake value.
    digest = hashlib.sha1(key.encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


class StandInReplica:
    """An HTTP server on 127.0.0.1 that responds like a gateway replica.

    GET /readyz returns 200 while `ready` is true and 503 otherwise. A
    WebSocket upgrade gets 101 and then an echo of raw bytes. Any other
    request returns the replica's name and records the Cookie header it
    received.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.cookies: list[str] = []
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            # HTTP/1.0 has no 101 response, and HAProxy rejects one.
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/readyz":
                    self.send_response(200 if replica.ready else 503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    self.send_response(101)
                    self.send_header("Upgrade", "websocket")
                    self.send_header("Connection", "Upgrade")
                    # HAProxy checks this key (RFC 6455, section 4.2.2).
                    self.send_header(
                        "Sec-WebSocket-Accept", websocket_accept(self.headers)
                    )
                    self.end_headers()
                    self.wfile.flush()
                    self.connection.settimeout(5)
                    self.connection.sendall(self.connection.recv(1024))
                    self.close_connection = True
                    return
                replica.cookies.append(self.headers.get("Cookie", ""))
                body = replica.name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def loopback_haproxy_config(ports: dict[str, int]) -> str:
    """Rewrite the compose HAProxy config for 127.0.0.1 and fast health checks.

    Docker's DNS does not exist here, so the resolvers are dropped and the
    replica names become the stand-ins' loopback addresses.
    """
    text = haproxy_config_text()
    text = re.sub(r"(?m)^resolvers docker\n(?:[ \t]+.*\n)*", "", text)
    text = text.replace(" resolvers docker", "")
    text = text.replace("inter 5s", "inter 100ms")
    text = text.replace("bind :8080", f"bind 127.0.0.1:{ports['chat']}")
    text = text.replace("bind :8405", f"bind 127.0.0.1:{ports['monitoring']}")
    text = text.replace(" gateway:8000 ", f" 127.0.0.1:{ports['gateway']} ")
    text = text.replace(" gateway-2:8000 ", f" 127.0.0.1:{ports['gateway-2']} ")
    assert "gateway:8000" not in text
    assert "resolvers" not in text
    return text


def get(port: int, path: str, cookie: str | None = None) -> tuple[int, str, str]:
    """Send GET to 127.0.0.1:port; return status, body and the Set-Cookie header."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        body = response.read().decode()
        return response.status, body, response.getheader("Set-Cookie") or ""
    finally:
        connection.close()


def wait_until(condition: Any, description: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}")


@pytest.fixture
def haproxy_on_loopback(
    tmp_path: Path,
) -> Iterator[tuple[int, dict[str, StandInReplica]]]:
    """Run the HAProxy config against two stand-in replicas; yield its port and them."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed")
    replicas = {name: StandInReplica(name) for name in ("gateway", "gateway-2")}
    ports = {"chat": free_port(), "monitoring": free_port()}
    ports |= {name: replica.port for name, replica in replicas.items()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(loopback_haproxy_config(ports), encoding="utf-8")

    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def healthy() -> bool:
            try:
                return get(ports["monitoring"], "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(healthy, "HAProxy's monitor-uri")
        yield ports["chat"], replicas
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
        for replica in replicas.values():
            replica.close()


def test_haproxy_balances_and_sticks(
    haproxy_on_loopback: tuple[int, dict[str, StandInReplica]],
) -> None:
    """New sessions reach both replicas; a session's cookie keeps it on one."""
    port, replicas = haproxy_on_loopback
    seen: dict[str, str] = {}

    def both_seen() -> bool:
        status, body, set_cookie = get(port, "/socket.io/?EIO=4&transport=polling")
        if status == 200:
            seen[body] = set_cookie.split(";")[0]
        return len(seen) == 2

    wait_until(both_seen, "both replicas to receive a new session")
    for name, cookie in seen.items():
        assert cookie == f"GATEWAY_REPLICA={name}"
        for _ in range(5):
            assert get(port, "/socket.io/?EIO=4&transport=polling", cookie)[1] == name
    # `indirect`: HAProxy strips its cookie before the request reaches a replica.
    for replica in replicas.values():
        assert all("GATEWAY_REPLICA" not in cookie for cookie in replica.cookies)


def test_haproxy_skips_unready_replica(
    haproxy_on_loopback: tuple[int, dict[str, StandInReplica]],
) -> None:
    """A replica failing /readyz gets no traffic, even for sessions pinned to it."""
    port, replicas = haproxy_on_loopback
    replicas["gateway-2"].ready = False
    time.sleep(1.0)  # fall 3 checks at inter 100ms, with margin

    for _ in range(6):
        assert get(port, "/")[1] == "gateway"
    assert get(port, "/", "GATEWAY_REPLICA=gateway-2")[1] == "gateway"


def test_haproxy_tunnels_websocket(
    haproxy_on_loopback: tuple[int, dict[str, StandInReplica]],
) -> None:
    """A WebSocket upgrade passes through and bytes flow both ways afterwards."""
    port, _ = haproxy_on_loopback
    request = (
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(1024)
            assert chunk, f"connection closed after {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        client.sendall(b"frame-bytes")
        assert client.recv(1024) == b"frame-bytes"
