"""Settings: the service's configuration from `INGEST_*` environment variables and a TOML
file, validated once at start-up."""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from ingest.options import Batcher, CircuitBreaker, Processors
from ingest.rabbitmq.options import QueueDeclare, RetryPolicy
from ingest.rabbitmq.partitions import Replica
from ingest.rabbitmq.queues import quorum

DEFAULT_CONFIG_FILE = Path("config/ingest.toml")
# Shorter admin tokens are refused at start-up: the endpoints they open are reachable by
# whoever reaches the port, and failures are only slowed down (see ingest.service.protection).
ADMIN_TOKEN_MIN_LENGTH = 16
# The names a browser on this machine uses; a DNS name an attacker controls is none of them.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


# A DNS name or IPv4 address, or an IPv6 address in brackets (as in a Host header).
_HOST = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")


class ProcessorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concurrency: PositiveInt | None = None
    max_demand: PositiveInt | None = None


class BatcherSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: PositiveInt | None = None
    batch_timeout: PositiveFloat | None = None
    concurrency: PositiveInt | None = None


class CircuitBreakerSettings(BaseModel):
    """`INGEST_PIPELINES__<NAME>__CIRCUIT_BREAKER__...`: see ingest.CircuitBreaker."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    failure_ratio: PositiveFloat | None = None
    min_messages: PositiveInt | None = None
    window: PositiveFloat | None = None
    open_delay: PositiveFloat | None = None
    max_open_delay: PositiveFloat | None = None
    probes: PositiveInt | None = None


class PipelineSettings(BaseModel):
    """One pipeline's settings (`INGEST_PIPELINES__<NAME>__...`); unset values keep the
    pipeline's own defaults. A pipeline with settings of its own declares a subclass
    (ingest.service.hosted.DeclaresSettings), read under the same prefix::

        class OrderSettings(PipelineSettings):
            closed_shops: list[str] = Field(default_factory=list)

        # INGEST_PIPELINES__ORDERS__CLOSED_SHOPS='["north"]'
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    queue: str | None = None
    # quorum: replicated, and a message redelivered more than delivery_limit times (one
    # that kills the process) is dead-lettered by the broker; classic: neither.
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: PositiveInt = 20
    prefetch_count: PositiveInt | None = None
    processors: ProcessorSettings = Field(default_factory=ProcessorSettings)
    batchers: dict[str, BatcherSettings] = Field(default_factory=dict)
    retry_max_attempts: PositiveInt | None = None
    retry_delays: list[PositiveFloat] | None = None
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=CircuitBreakerSettings)

    def processor_options(self, default: Processors) -> Processors:
        """The pipeline's processors with these settings applied."""
        given = self.processors.model_dump(exclude_none=True)
        return replace(default, **given) if given else default

    def batcher_options(self, defaults: dict[str, Batcher]) -> dict[str, Batcher]:
        """The pipeline's batchers with these settings applied; unknown names are refused."""
        unknown = sorted(set(self.batchers) - set(defaults))
        if unknown:
            raise ValueError(
                f"unknown batcher {', '.join(unknown)} in settings; this pipeline has "
                f"{', '.join(defaults)}"
            )
        options = dict(defaults)
        for name, given in self.batchers.items():
            values = given.model_dump(exclude_none=True)
            if values:
                options[name] = replace(defaults[name], **values)
        return options

    def queue_declare(self, queue: str) -> QueueDeclare:
        """How `queue` is declared, by its consumer and by whoever publishes to it."""
        if self.queue_type == "classic":
            return QueueDeclare()
        return quorum(f"{queue}.dlq", self.delivery_limit)

    def circuit_breaker_options(self) -> CircuitBreaker | None:
        """The circuit breaker (on by default, with CircuitBreaker's defaults), or None when
        disabled."""
        breaker = self.circuit_breaker
        if not breaker.enabled:
            return None
        return CircuitBreaker(**breaker.model_dump(exclude_none=True, exclude={"enabled"}))

    def retry_policy(self, default: RetryPolicy) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.retry_max_attempts or default.max_attempts,
            delays=tuple(self.retry_delays) if self.retry_delays else default.delays,
        )


class Settings(BaseSettings):
    """Everything `ingest run` reads. Environment variables win over the TOML file
    (`INGEST_CONFIG`, default `config/ingest.toml` when it exists)::

        INGEST_AMQP_URL=amqp://user:pass@rabbitmq:5672/%2F
        INGEST_PIPELINES__ORDERS__PREFETCH_COUNT=500
    """

    model_config = SettingsConfigDict(
        env_prefix="INGEST_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
    )

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/%2F")
    database_url: SecretStr = SecretStr("sqlite+aiosqlite:///var/ingest.db")
    smtp_url: SecretStr | None = None
    mail_outbox: Path = Path("var/outbox")
    # None: the sender the pipelines that send mail choose.
    mail_from: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    admin_token: SecretStr | None = None
    # The Host headers answered (any port; `*`: any host, behind a proxy that checks them);
    # from the environment as `a,b` or a JSON list.
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(LOOPBACK_HOSTS)
    )
    http_header_timeout: PositiveFloat = 15.0
    http_body_timeout: PositiveFloat = 300.0
    http_max_connections: PositiveInt = 256
    http_max_event_streams: PositiveInt = 32
    queue_depth_interval: PositiveFloat = 15.0
    log_format: Literal["json", "console"] = "console"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout: PositiveFloat = 30.0
    max_body_bytes: PositiveInt = 64 * 1024
    replica_index: int | None = Field(default=None, ge=0)
    replicas: PositiveInt | None = None
    upload_dir: Path = Path("var/uploads")
    upload_max_bytes: PositiveInt = 50 * 1024 * 1024
    # Each one read with the settings model its pipeline declares (`_per_pipeline`).
    pipelines: dict[str, SerializeAsAny[PipelineSettings]] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("INGEST_CONFIG", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, EnvironmentSource(settings_cls)]
        if config_file.is_file():
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            except tomllib.TOMLDecodeError as error:
                raise SettingsError(f"{config_file} is not valid TOML: {error}") from error
        return tuple(sources)

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        """An empty token is no token (the admin endpoints are off); a short one is refused."""
        if token is None or not token.get_secret_value():
            return None
        length = len(token.get_secret_value())
        if length < ADMIN_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"the admin token must be {ADMIN_TOKEN_MIN_LENGTH} characters or more, got "
                f"{length}: set INGEST_ADMIN_TOKEN to a longer one (e.g. `openssl rand -hex 24`)"
            )
        return token

    @field_validator("pipelines", mode="before")
    @classmethod
    def _per_pipeline(cls, value: object) -> object:
        """Each pipeline's settings read with its own model (an installed pipeline may
        declare one); the errors of all of them at once, where they are."""
        if not isinstance(value, dict) or not value:
            return value  # pydantic says what is wrong, or there is nothing to read
        # Imported here: the pipelines' factories import the service, settings included.
        from ingest.service.hosting import settings_models

        models = settings_models()
        read: dict[str, object] = {}
        errors: list[InitErrorDetails] = []
        for name, given in value.items():
            model = models.get(name, PipelineSettings)
            if not isinstance(given, dict):
                read[name] = given
                continue
            try:
                read[name] = model.model_validate(given)
            except ValidationError as error:
                errors += [
                    InitErrorDetails(
                        type=e["type"],
                        loc=(name, *e["loc"]),
                        input=e["input"],
                        ctx=e.get("ctx", {}),
                    )
                    for e in error.errors()
                ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return read

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _host_names(cls, value: object) -> object:
        """`a,b` or `["a", "b"]` (environment) or a list (TOML): host names or addresses,
        lower case, without scheme or port; at least one."""
        if isinstance(value, str):
            value = _json_list(value) or value.split(",")
        if not isinstance(value, list):
            return value  # pydantic says what is wrong
        hosts = [name for host in value if (name := str(host).strip().lower().rstrip("."))]
        for host in hosts:
            if host != "*" and not _HOST.fullmatch(host):
                raise ValueError(
                    f"{host!r} is not a host name or address without scheme or port (any port "
                    f"is allowed; IPv6 in brackets): INGEST_HTTP_ALLOWED_HOSTS=ingest,localhost"
                )
        if not hosts:
            raise ValueError("no host allowed: INGEST_HTTP_ALLOWED_HOSTS names at least one")
        return hosts

    def replica(self) -> Replica:
        """Which replica this process is, of how many (for partitioned pipelines)."""
        return Replica.of(self.replica_index, self.replicas)

    def pipeline(self, name: str) -> PipelineSettings:
        """`name`'s settings, read with the model its pipeline declares."""
        given = self.pipelines.get(name)
        if given is not None:
            return given
        from ingest.service.hosting import settings_models  # see _per_pipeline

        return settings_models().get(name, PipelineSettings)()

    def public(self) -> dict[str, Any]:
        """The settings as logged at start-up: secrets stay masked."""
        return self.model_dump(mode="json")


class EnvironmentSource(EnvSettingsSource):
    """The environment, each pipeline's variables typed by its own settings model (so
    that `INGEST_PIPELINES__<NAME>__<LIST>` is decoded as JSON, as any list setting)."""

    def next_field(
        self, field: FieldInfo | Any | None, key: str, case_sensitive: bool | None = None
    ) -> FieldInfo | None:
        if field is not None and field is self.settings_cls.model_fields.get("pipelines"):
            from ingest.service.hosting import settings_models  # see Settings._per_pipeline

            # A model class, as pydantic-settings answers for a dict's value type.
            return cast("FieldInfo", settings_models().get(key, PipelineSettings))
        return super().next_field(field, key, case_sensitive)


def _json_list(text: str) -> list[object] | None:
    """`text` as a JSON list, or None when it is not one (`[::1]` is a host, not JSON)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else None
