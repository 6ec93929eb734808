"""The OpenTelemetry side of tracing: the tracer provider and exporters the `OTEL_*`
variables ask for, and what the service hangs on it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from structlog.typing import EventDict

from ingest.exceptions import ConfigurationError
from ingest.message import Message
from ingest.pipeline import Pipeline
from ingest.service.tracing.publishing import PublishSpans
from ingest.service.tracing.spans import PipelineSpans

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

# The instrumentation scope every span of the service's is created under.
SCOPE = "ingest"


class Tracing:
    """A tracer provider and what the service traces with it: each watched pipeline's
    messages (`watch`), publishing (`publishing`), database and SMTP calls::

        tracing = Tracing(TracerProvider(), exporter=InMemorySpanExporter())
    """

    def __init__(self, provider: TracerProvider, exporter: SpanExporter | None = None) -> None:
        self.provider = provider
        if exporter is not None:
            # Exported as each span ends (tests read them at once); production batches.
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = provider.get_tracer(SCOPE, version("ingest"))
        # Each consumed message's process span, until it is acknowledged.
        self.process: WeakKeyDictionary[Message, Span] = WeakKeyDictionary()
        self.publishing = PublishSpans(self.tracer, self.process)
        self._watched: list[tuple[Pipeline, PipelineSpans]] = []

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Tracing:
        """As the `OTEL_*` variables say: `OTEL_SERVICE_NAME` (else `ingest`) and
        `OTEL_RESOURCE_ATTRIBUTES`, the sampler (`OTEL_TRACES_SAMPLER`, read by the SDK),
        and each exporter of `OTEL_TRACES_EXPORTER` (`otlp`, the default, over
        HTTP/protobuf to `OTEL_EXPORTER_OTLP_ENDPOINT`; `console`), batched."""
        attributes: dict[str, str] = {
            "service.version": version("ingest"),
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }
        if not environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = "ingest"
        provider = TracerProvider(resource=Resource.create(attributes))
        for processor in _processors(environ):
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        return cls(provider)

    def watch(self, pipeline: Pipeline, destination: str | None) -> None:
        """Trace `pipeline`'s messages (read from `destination`, a queue)."""
        spans = PipelineSpans(
            self.tracer, pipeline.name, destination or pipeline.name, self.process
        )
        pipeline.events.subscribe(spans.on_event, kinds=spans.kinds)
        self._watched.append((pipeline, spans))

    def unwatch(self) -> None:
        for pipeline, spans in self._watched:
            pipeline.events.unsubscribe(spans.on_event)
        self._watched.clear()

    @contextlib.contextmanager
    def client_span(self, name: str, attributes: Mapping[str, Any]) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT, attributes=dict(attributes)
        ) as span:
            try:
                yield
            except BaseException as exc:
                # start_as_current_span records it too; the status says what failed.
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
                raise

    def instrument_database(self, engine: AsyncEngine) -> None:
        """OpenTelemetry's SQLAlchemy engine tracer on this engine only. Not
        `SQLAlchemyInstrumentor().instrument()`: it patches `create_engine` for the whole
        process, and the durable windows' store would then start a trace of its own with
        every append."""
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
        from opentelemetry.metrics import NoOpMeterProvider

        meter = NoOpMeterProvider().get_meter(SCOPE)
        usage = meter.create_up_down_counter("db.client.connections.usage")
        tracer = ChildSpansOnly(
            self.provider.get_tracer("opentelemetry.instrumentation.sqlalchemy")
        )
        EngineTracer(tracer, engine.sync_engine, usage)  # type: ignore[no-untyped-call]

    def add_ids(self, event_dict: EventDict) -> None:
        """`trace_id` and `span_id` of the current span, if any, into a log line."""
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
            event_dict.setdefault("span_id", format(context.span_id, "016x"))

    def shutdown(self) -> None:
        """Stop tracing pipelines, and export what is left (bounded by the SDK's timeouts)."""
        self.unwatch()
        self.provider.shutdown()


class ChildSpansOnly(trace.Tracer):
    """A tracer making spans only under a current span: an app's database is traced inside
    a message's story, never on its own (its start-up, the uploads' and the windows'
    polls would each be a trace of one span, many a minute)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def start_span(
        self, name: str, context: Context | None = None, *args: Any, **kwargs: Any
    ) -> Span:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return trace.INVALID_SPAN
        return self.tracer.start_span(name, context, *args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: Context | None = None, *args: Any, **kwargs: Any
    ) -> Iterator[Span]:
        if not trace.get_current_span(context).get_span_context().is_valid:
            yield trace.INVALID_SPAN
            return
        with self.tracer.start_as_current_span(name, context, *args, **kwargs) as span:
            yield span


def _processors(environ: Mapping[str, str]) -> Iterator[SpanProcessor]:
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for name in filter(None, names):
        if name == "otlp":
            yield BatchSpanProcessor(_otlp(environ))
        elif name == "console":
            yield BatchSpanProcessor(ConsoleSpanExporter())
        elif name != "none":
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={name!r} is not available; use otlp (HTTP/protobuf), "
                "console or none"
            )


def _otlp(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not available: ingest exports "
            "OTLP over HTTP/protobuf (port 4318); set http/protobuf"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION itself.
    return OTLPSpanExporter()
