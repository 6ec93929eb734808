"""Tracing: OpenTelemetry spans of every message's story, on with the standard `OTEL_*`
variables and free when off (nothing of OpenTelemetry is even imported then).

`start()` reads the environment once per process; the pipelines, the publishers and the
logs then ask `active()`. The spans come from the engine's events (`tracing.spans`) and
from the connector's publish seam (`tracing.publishing`), as the Prometheus metrics do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ingest.rabbitmq.instrumentation import PublishTracer
    from ingest.service.tracing.provider import Tracing

_active: Tracing | None = None


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: `OTEL_TRACES_EXPORTER` other than `none`,
    or an OTLP endpoint with no exporter named; never with `OTEL_SDK_DISABLED=true`.

    Unlike the SDK's default (`otlp` when nothing is said), no variable means no tracing:
    a service nobody collects traces from should not pay for them, nor try to reach
    localhost:4318 with every batch."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return exporters.strip().lower() not in ("", "none")
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def start(environ: Mapping[str, str] = os.environ) -> Tracing | None:
    """Start tracing as the environment says (None when it says nothing): the tracer
    provider, its exporters, trace ids in the logs. ConfigurationError for an exporter
    or protocol this installation cannot serve."""
    if not enabled(environ):
        return None
    from ingest.service.tracing.provider import Tracing

    return install(Tracing.from_environment(environ))


def install(tracing: Tracing) -> Tracing:
    """Make `tracing` the process's (tests install one with an in-memory exporter)."""
    global _active
    _active = tracing
    return tracing


def uninstall() -> None:
    """Flush and stop the process's tracing, if any."""
    global _active
    tracing, _active = _active, None
    if tracing is not None:
        tracing.shutdown()


def active() -> Tracing | None:
    return _active


def publish_tracer() -> PublishTracer | None:
    """What a Publisher or a replay is given: PRODUCER spans, trace context in the
    headers; None while tracing is off."""
    return None if _active is None else _active.publishing


@contextlib.contextmanager
def client_span(name: str, attributes: Mapping[str, Any]) -> Iterator[None]:
    """A CLIENT span around a call to another system (an SMTP server), a child of the
    current span; nothing while tracing is off. An exception is recorded and raised."""
    if _active is None:
        yield
        return
    with _active.client_span(name, attributes):
        yield


def instrument_database(engine: AsyncEngine) -> None:
    """Trace `engine`'s statements (OpenTelemetry's SQLAlchemy instrumentation), as
    children of the span they run in; nothing while tracing is off."""
    if _active is not None:
        _active.instrument_database(engine)
