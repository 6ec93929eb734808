"""Settings from the environment and a TOML file; env wins; secrets stay masked."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ingest import Batcher, Processors
from ingest.service.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("INGEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))


def test_nested_pipeline_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_PIPELINES__BOOKINGS__CLOSED_EVENTS", '["musical", "opera"]')
    monkeypatch.setenv("INGEST_PIPELINES__BOOKINGS__BATCHERS__CINEMA__BATCH_SIZE", "10")
    monkeypatch.setenv("INGEST_PIPELINES__BOOKINGS__PROCESSORS__CONCURRENCY", "4")
    monkeypatch.setenv("INGEST_SHUTDOWN_TIMEOUT", "12.5")
    settings = Settings()
    bookings = settings.pipeline("bookings")
    assert bookings.closed_events == ["musical", "opera"]
    assert settings.shutdown_timeout == 12.5
    assert bookings.processor_options(Processors(concurrency=2, max_demand=50)) == Processors(4, 50)
    options = bookings.batcher_options({"cinema": Batcher(batch_size=75, batch_timeout=2.0)})
    assert options["cinema"] == Batcher(batch_size=10, batch_timeout=2.0)


def test_the_toml_file_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text(
        'log_format = "json"\nhttp_port = 9000\n\n'
        '[pipelines.notifications]\nqueue = "from-toml"\nprefetch_count = 300\n'
    )
    monkeypatch.setenv("INGEST_CONFIG", str(config))
    monkeypatch.setenv("INGEST_HTTP_PORT", "9100")
    settings = Settings()
    assert settings.log_format == "json"
    assert settings.http_port == 9100
    assert settings.pipeline("notifications").queue == "from-toml"
    assert settings.pipeline("notifications").prefetch_count == 300


def test_secrets_are_masked_when_settings_are_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_AMQP_URL", "amqp://app:hunter2@rabbitmq:5672/%2F")
    monkeypatch.setenv("INGEST_DATABASE_URL", "postgresql+asyncpg://app:hunter2@db/tickets")
    monkeypatch.setenv("INGEST_SMTP_URL", "smtp://app:hunter2@mail:1025")
    settings = Settings()
    assert "hunter2" not in str(settings.public())
    assert "hunter2" not in repr(settings)
    assert settings.amqp_url.get_secret_value().endswith("@rabbitmq:5672/%2F")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("INGEST_LOG_FORMAT", "xml"),
        ("INGEST_HTTP_PORT", "70000"),
        ("INGEST_PIPELINES__BOOKINGS__PREFETCH_COUNT", "0"),
        ("INGEST_PIPELINES__BOOKINGS__COLOUR", "blue"),
    ],
    ids=["log-format", "port", "prefetch", "unknown-option"],
)
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_unknown_batchers_in_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_PIPELINES__BOOKINGS__BATCHERS__OPERA__BATCH_SIZE", "3")
    with pytest.raises(
        ValueError, match="unknown batcher opera in settings; this pipeline has cinema"
    ):
        Settings().pipeline("bookings").batcher_options({"cinema": Batcher()})


def test_a_pipelines_own_settings_are_read_with_its_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_PIPELINES__NOTIFICATIONS__PARTITIONS", "4")
    settings = Settings()
    assert type(settings.pipeline("notifications")).__name__ == "NotificationsSettings"
    assert settings.pipeline("notifications").model_dump()["partitions"] == 4
    assert settings.public()["pipelines"]["notifications"]["partitions"] == 4
    # Unset, a pipeline's settings are its model's defaults.
    assert settings.pipeline("bookings").model_dump()["closed_events"] == []


def test_an_option_of_another_pipeline_is_refused_where_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INGEST_PIPELINES__NOTIFICATIONS__CLOSED_EVENTS", '["musical"]')
    monkeypatch.setenv("INGEST_PIPELINES__BOOKINGS__PREFETCH_COUNT", "0")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert {error["loc"] for error in refused.value.errors()} == {
        ("pipelines", "notifications", "closed_events"),
        ("pipelines", "bookings", "prefetch_count"),
    }
