"""Tracing: the OpenTelemetry spans the service makes of a pipeline's events, read from an
in-memory exporter (pipelines on the in-memory producer; no broker)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import MutableMapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from ingest import Batcher, Handlers, Message, NoopAcknowledger, Pipeline
from ingest.exceptions import ConfigurationError
from ingest.rabbitmq import OutgoingMessage
from ingest.service import tracing
from ingest.service.logging import trace_ids
from ingest.service.tracing.provider import Tracing
from ingest.testing import CollectingAcknowledger, send_batch

from .conftest import MakePipeline

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traceparent(trace_id: str = TRACE_ID, span_id: str = PARENT_ID) -> dict[str, Any]:
    return {"headers": {"traceparent": f"00-{trace_id}-{span_id}-01"}, "message_id": "m-1"}


@pytest.fixture
def traced(make_pipeline: MakePipeline, span_exporter: InMemorySpanExporter) -> MakePipeline:
    """Build a pipeline on the in-memory producer whose events are traced."""

    async def make(handlers: Handlers, **options: Any) -> Pipeline:
        pipeline = await make_pipeline(handlers, **options)
        active = tracing.active()
        assert active is not None
        active.watch(pipeline, "bookings_queue")
        return pipeline

    return make


class Booked(Handlers):
    """Routes to batcher `b`; fails "closed", raises on "boom" and in prepare on "db down"."""

    def __init__(self) -> None:
        self.logged: list[MutableMapping[str, Any]] = []

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        if any(message.data == "db down" for message in messages):
            raise ConnectionError("database down")
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.logged.append(trace_ids(None, "info", {"event": "handling"}))
        if message.data == "closed":
            return message.failed("bookings-closed")
        if message.data == "boom":
            raise ValueError("boom")
        return message.put_batcher("b")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        if any(message.data == "mail down" for message in messages):
            raise ConnectionError("mail server down")
        return messages


def named(span_exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in span_exporter.get_finished_spans() if span.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_a_delivery_s_traceparent_is_the_parent_of_its_process_span(
    traced: Any, span_exporter: InMemorySpanExporter
) -> None:
    pipeline = await traced(Booked(), batchers={"b": Batcher(batch_size=1)})
    metadata = {**traceparent(), "delivery_tag": 7, "routing_key": "bookings_queue"}
    await send_batch(pipeline, [b"cinema,1"], metadata=metadata)

    [process] = named(span_exporter, "process bookings_queue")
    assert process.kind is SpanKind.CONSUMER
    assert format(process.context.trace_id, "032x") == TRACE_ID
    assert parent_of(process) == int(PARENT_ID, 16)
    assert process.parent is not None
    assert process.parent.is_remote
    assert dict(process.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "bookings_queue",
        "messaging.message.id": "m-1",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "messaging.rabbitmq.destination.routing_key": "bookings_queue",
        "messaging.message.body.size": 8,
        "ingest.pipeline": "test",
        "ingest.processor": "processor_0",
    }
    assert process.status.status_code is StatusCode.UNSET


async def test_prepare_handle_and_batch_spans_hang_under_the_message(
    traced: Any, span_exporter: InMemorySpanExporter
) -> None:
    handlers = Booked()
    pipeline = await traced(handlers, batchers={"b": Batcher(batch_size=1)})
    await send_batch(pipeline, [b"cinema,1"], metadata=traceparent())

    [process] = named(span_exporter, "process bookings_queue")
    [prepare] = named(span_exporter, "prepare_messages")
    [handle] = named(span_exporter, "handle_message")
    [batch] = named(span_exporter, "handle_batch b")
    process_id = process.context.span_id
    assert parent_of(prepare) == parent_of(handle) == process_id
    # A batch span links to every message it holds; one message's batch is in its trace.
    assert batch.kind is SpanKind.CONSUMER
    assert [link.context.span_id for link in batch.links] == [process_id]
    assert parent_of(batch) == process_id
    assert batch.context.trace_id == process.context.trace_id
    attributes = dict(batch.attributes or {})
    assert attributes["messaging.batch.message_count"] == 1
    assert (attributes["ingest.batch.successful"], attributes["ingest.batch.failed"]) == (1, 0)
    assert attributes["ingest.batcher"] == "b"
    # The process span lasts until the ack, which follows the batch's hook.
    assert process.end_time is not None
    assert batch.start_time is not None
    assert process.end_time > batch.start_time
    # Logged inside handle_message: the ids of its span.
    [logged] = handlers.logged
    assert logged["trace_id"] == TRACE_ID
    assert logged["span_id"] == format(handle.context.span_id, "016x")


async def test_a_batch_of_several_traces_is_a_trace_of_its_own_linked_to_each(
    traced: Any, span_exporter: InMemorySpanExporter
) -> None:
    pipeline = await traced(Booked(), batchers={"b": Batcher(batch_size=3, batch_timeout=5)})
    acknowledger = CollectingAcknowledger(3)
    trace_ids = [f"{index:032x}" for index in (1, 2, 3)]
    messages = [
        Message(b"cinema,1", acknowledger, metadata=traceparent(trace_id)) for trace_id in trace_ids
    ]
    await pipeline.producer.push(messages)
    await acknowledger.wait(5)

    [batch] = named(span_exporter, "handle_batch b")
    assert batch.parent is None
    assert sorted(format(link.context.trace_id, "032x") for link in batch.links) == trace_ids
    processes = {span.context.span_id for span in named(span_exporter, "process bookings_queue")}
    assert {link.context.span_id for link in batch.links} == processes


async def test_a_message_without_trace_context_starts_a_trace(
    traced: Any, span_exporter: InMemorySpanExporter
) -> None:
    pipeline = await traced(Booked(), batchers={"b": Batcher(batch_size=1)})
    await send_batch(pipeline, [b"cinema,1"])
    [process] = named(span_exporter, "process bookings_queue")
    assert process.parent is None
    assert "messaging.message.id" not in (process.attributes or {})


@pytest.mark.parametrize(
    ("data", "failed_span", "exception"),
    [
        pytest.param("boom", "handle_message", ValueError, id="handle_message raised"),
        pytest.param("db down", "prepare_messages", ConnectionError, id="prepare raised"),
        pytest.param("mail down", "handle_batch b", ConnectionError, id="handle_batch raised"),
    ],
)
async def test_a_hook_that_raised_records_the_exception_and_fails_the_spans(
    traced: Any,
    span_exporter: InMemorySpanExporter,
    data: str,
    failed_span: str,
    exception: type[Exception],
) -> None:
    pipeline = await traced(Booked(), batchers={"b": Batcher(batch_size=1)})
    await send_batch(pipeline, [data], metadata=traceparent())

    [span] = named(span_exporter, failed_span)
    assert span.status.status_code is StatusCode.ERROR
    [recorded] = [event for event in span.events if event.name == "exception"]
    assert (recorded.attributes or {})["exception.type"] == exception.__name__
    [process] = named(span_exporter, "process bookings_queue")
    assert process.status.status_code is StatusCode.ERROR
    assert any(event.name == "exception" for event in process.events)


async def test_a_message_failed_on_purpose_fails_its_process_span_with_the_reason(
    traced: Any, span_exporter: InMemorySpanExporter
) -> None:
    pipeline = await traced(Booked(), batchers={"b": Batcher(batch_size=1)})
    await send_batch(pipeline, ["closed"], metadata=traceparent())
    [process] = named(span_exporter, "process bookings_queue")
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "bookings-closed"
    assert named(span_exporter, "handle_batch b") == []


def test_a_published_message_goes_on_in_its_causes_trace(
    span_exporter: InMemorySpanExporter,
) -> None:
    active = tracing.active()
    assert active is not None
    cause = Message(b"cinema,1", NoopAcknowledger())
    tracer = active.tracer
    process = tracer.start_span("process bookings_queue", context=Context())
    active.process[cause] = process
    publishing = active.publishing

    caused = publishing.start("", "notifications_queue", "n-1", None, cause)
    carried = publishing.start("", "q", "n-2", traceparent()["headers"], None)
    with tracer.start_as_current_span("around") as around:
        current = publishing.start("", "q", "n-3", None, None)
    for span in (caused, carried, current):
        span.end(None)
    spans = {
        (span.attributes or {})["messaging.message.id"]: span
        for span in named(span_exporter, "publish q")
    }
    [published] = named(span_exporter, "publish notifications_queue")
    assert published.kind is SpanKind.PRODUCER
    assert parent_of(published) == process.get_span_context().span_id
    assert parent_of(spans["n-2"]) == int(PARENT_ID, 16)
    assert parent_of(spans["n-3"]) == around.get_span_context().span_id
    # What goes into the headers is the PRODUCER span's own context.
    trace_id, span_id = caused.headers["traceparent"].split("-")[1:3]
    assert int(span_id, 16) == published.context.span_id
    assert int(trace_id, 16) == process.get_span_context().trace_id


def test_a_publish_that_failed_fails_its_span(span_exporter: InMemorySpanExporter) -> None:
    active = tracing.active()
    assert active is not None
    span = active.publishing.start("", "q", "n-1", None, None)
    span.end(ConnectionError("connection lost"))
    [published] = named(span_exporter, "publish q")
    assert published.status.status_code is StatusCode.ERROR
    assert published.status.description == "ConnectionError: connection lost"


def test_outgoing_messages_do_not_send_their_cause() -> None:
    cause = Message(b"x", NoopAcknowledger())
    message = OutgoingMessage(b"n", "q", message_id="n-1", cause=cause)
    assert message.properties().headers is None
    assert message == OutgoingMessage(b"n", "q", message_id="n-1")


def test_no_span_no_ids_in_the_logs(span_exporter: InMemorySpanExporter) -> None:
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert trace_ids(None, "info", {"event": "x"}) == {"event": "x"}


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        pytest.param({}, False, id="nothing said"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}, True, id="endpoint"),
        pytest.param({"OTEL_TRACES_EXPORTER": "console"}, True, id="console"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, False, id="exporter none"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"},
            False,
            id="endpoint but exporter none",
        ),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False, id="disabled"
        ),
    ],
)
def test_tracing_is_on_only_when_the_environment_asks(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled(environ) is on


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        pytest.param({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin' is not available", id="zipkin"),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "HTTP/protobuf",
            id="grpc",
        ),
    ],
)
def test_an_exporter_this_install_lacks_is_refused_saying_what_to_set(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        tracing.start(environ)


def test_tracing_off_imports_nothing_of_opentelemetry() -> None:
    script = (
        "import sys\n"
        "import ingest.service.cli, ingest.service.hosting, pipelines.bookings, "
        "pipelines.notifications\n"
        "from ingest.service import tracing\n"
        "assert tracing.start({}) is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


async def test_a_sampled_out_trace_records_nothing_and_carries_its_decision_on(
    make_pipeline: MakePipeline,
) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    tracing.install(Tracing(provider, exporter=exported))
    try:
        active = tracing.active()
        assert active is not None
        publishing = active.publishing
        published: list[str] = []

        class Publishing(Booked):
            async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
                for message in messages:
                    span = publishing.start("", "q", None, None, message)
                    published.append(span.headers["traceparent"])
                    span.end(None)
                return messages

        pipeline = await make_pipeline(Publishing(), batchers={"b": Batcher(batch_size=1)})
        active.watch(pipeline, "bookings_queue")
        await send_batch(pipeline, [b"cinema,1"])
    finally:
        tracing.uninstall()
    assert exported.get_finished_spans() == ()
    [traceparent] = published
    flags = int(traceparent.rsplit("-", 1)[1], 16)
    assert flags & 1 == 0, "the next consumer is told it is sampled out"
