"""Traces of the tickets service end to end: a booking published with a W3C trace context
through the real broker, database and SMTP server, read from an in-memory exporter; and
`ingest run` exporting over OTLP/HTTP to a receiver this test runs."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ingest.rabbitmq import REASON_HEADER
from ingest.rabbitmq.dead_letters import DeadLetters
from ingest.service import tracing
from tests.support import Broker, eventually, free_port

from .service import Inbox, RunningService, run_cli, tickets_service

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PUBLISHER_SPAN = "b7ad6b7169203331"


def publish_traced(broker: Broker, queue: str, payload: str, message_id: str) -> None:
    """Publish as a traced client would: its span's context in the `traceparent` header."""
    body = {
        "properties": {
            "message_id": message_id,
            "headers": {"traceparent": f"00-{TRACE_ID}-{PUBLISHER_SPAN}-01"},
        },
        "routing_key": queue,
        "payload": payload,
        "payload_encoding": "string",
    }
    assert broker.api("POST", "exchanges/%2F/amq.default/publish", body)["routed"]


@pytest.fixture
async def service(
    broker: Broker, queue_name: str, database_url: str, span_exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[RunningService, Inbox]]:
    queues = {name: f"{queue_name}-{name}" for name in ("bookings", "notifications")}
    async with tickets_service(broker, queues, database_url) as running:
        yield running


class Trace:
    """The finished spans, looked up the way the assertions read."""

    def __init__(self, spans: tuple[ReadableSpan, ...]) -> None:
        self.spans = spans

    def one(self, name: str, **attributes: Any) -> ReadableSpan:
        found = [
            span
            for span in self.spans
            if span.name == name
            and all((span.attributes or {}).get(k) == v for k, v in attributes.items())
        ]
        assert len(found) == 1, (name, attributes, [s.name for s in self.spans])
        return found[0]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [s for s in self.spans if s.parent is not None and s.parent == parent.context]

    def statements(self, parent: ReadableSpan) -> list[str]:
        """The SQL of the database spans directly under `parent`."""
        texts = []
        for span in self.children(parent):
            attributes = span.attributes or {}
            text = attributes.get("db.statement") or attributes.get("db.query.text")
            if text is not None:
                assert span.kind is SpanKind.CLIENT
                texts.append(str(text))
        return texts


def is_child(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


async def test_one_trace_runs_from_a_booking_to_the_digest_that_mailed_it(
    broker: Broker,
    queue_name: str,
    service: tuple[RunningService, Inbox],
    span_exporter: InMemorySpanExporter,
) -> None:
    _, inbox = service
    bookings, notifications = f"{queue_name}-bookings", f"{queue_name}-notifications"
    publish_traced(broker, bookings, "cinema,1", "booking-1")

    async def mailed() -> bool:
        return bool(inbox.messages) and any(
            s.name == "smtp send" for s in span_exporter.get_finished_spans()
        )

    await eventually(mailed, timeout=20)
    spans = Trace(span_exporter.get_finished_spans())

    booking = spans.one(f"process {bookings}")
    assert booking.kind is SpanKind.CONSUMER
    assert format(booking.context.trace_id, "032x") == TRACE_ID
    assert booking.parent is not None
    assert format(booking.parent.span_id, "016x") == PUBLISHER_SPAN
    attributes = booking.attributes or {}
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.message.id"] == "booking-1"
    assert attributes["messaging.destination.name"] == bookings
    assert isinstance(attributes["messaging.rabbitmq.message.delivery_tag"], int)
    assert attributes["ingest.pipeline"] == "bookings"

    prepare = spans.one("prepare_messages", **{"ingest.pipeline": "bookings"})
    assert is_child(prepare, booking)
    assert any("users" in sql for sql in spans.statements(prepare)), "the users query"
    assert is_child(spans.one("handle_message", **{"ingest.pipeline": "bookings"}), booking)

    batch = spans.one("handle_batch cinema")
    assert [link.context.span_id for link in batch.links] == [booking.context.span_id]
    assert is_child(batch, booking)
    assert any("INSERT INTO tickets" in sql for sql in spans.statements(batch)), "the insert"

    publish = spans.one(f"publish {notifications}")
    assert publish.kind is SpanKind.PRODUCER
    assert is_child(publish, booking)
    assert (publish.attributes or {})["messaging.message.id"] == "booking-1/notification"

    notification = spans.one(f"process {notifications}")
    assert is_child(notification, publish)

    digest = spans.one("handle_batch email")
    assert digest.kind is SpanKind.CONSUMER
    # A durable window's messages come back from the store: the digest links to each
    # one's trace context as it was delivered (its PRODUCER span), in the same trace.
    assert [link.context.span_id for link in digest.links] == [publish.context.span_id]
    assert format(digest.context.trace_id, "032x") == TRACE_ID
    smtp = spans.one("smtp send")
    assert smtp.kind is SpanKind.CLIENT
    assert is_child(smtp, digest)
    assert {format(s.context.trace_id, "032x") for s in (batch, notification, smtp)} == {TRACE_ID}


async def test_a_closed_event_fails_its_process_span_with_the_reason(
    broker: Broker,
    queue_name: str,
    service: tuple[RunningService, Inbox],
    span_exporter: InMemorySpanExporter,
) -> None:
    publish_traced(broker, f"{queue_name}-bookings", "spectaculars,1", "booking-closed")

    async def processed() -> bool:
        return any(s.name.startswith("process") for s in span_exporter.get_finished_spans())

    await eventually(processed, timeout=15)
    process = Trace(span_exporter.get_finished_spans()).one(f"process {queue_name}-bookings")
    assert process.status.description == "bookings-closed"


class OtlpReceiver:
    """An OTLP/HTTP endpoint (`POST /v1/traces`, protobuf), as a collector or Jaeger has."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[ExportTraceServiceRequest] = []

    async def receive(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list[tuple[str, Any, dict[str, Any]]]:
        """(service.name, span, attributes) of every span received."""
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append((resource["service.name"], span, _attributes(span.attributes)))
        return found


def _attributes(values: Any) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in values}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    otlp = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", otlp.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", otlp.port).start()
    yield otlp
    await runner.cleanup()


async def test_ingest_run_exports_its_traces_over_otlp_http(
    broker: Broker, queue_name: str, receiver: OtlpReceiver, tmp_path: Any
) -> None:
    bookings = f"{queue_name}-bookings"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "OTEL_"))}
    env.update(
        INGEST_CONFIG=os.devnull + ".toml",
        INGEST_AMQP_URL=broker.amqp_url,
        INGEST_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/tickets.db",
        INGEST_MAIL_OUTBOX=str(tmp_path / "outbox"),
        INGEST_HTTP_PORT=str(free_port()),
        INGEST_PIPELINES__BOOKINGS__QUEUE=bookings,
        INGEST_PIPELINES__NOTIFICATIONS__QUEUE=f"{queue_name}-notifications",
        INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT="0.5",
        INGEST_LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_SERVICE_NAME="ingest-under-test",
        OTEL_BSP_SCHEDULE_DELAY="200",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(0)

        async def consuming() -> bool:
            queues = await broker.api_async("GET", "queues/%2F")
            return any(q["name"] == bookings and q.get("consumers") for q in queues)

        await eventually(consuming, timeout=30)
        publish_traced(broker, bookings, "musical,1", "booking-otlp")

        async def exported() -> bool:
            return any(span.name == "outbox write" for _, span, _ in receiver.spans())

        await eventually(exported, timeout=30)
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    names = {
        span.name: (service, span, attributes) for service, span, attributes in receiver.spans()
    }
    service, booking, attributes = names[f"process {bookings}"]
    assert service == "ingest-under-test"
    assert booking.trace_id.hex() == TRACE_ID
    assert booking.parent_span_id.hex() == PUBLISHER_SPAN
    assert booking.kind == booking.SPAN_KIND_CONSUMER
    assert attributes["messaging.message.id"] == "booking-otlp"
    others = sorted(
        {span.name for _, span, _ in receiver.spans() if span.trace_id.hex() != TRACE_ID}
    )
    assert others == [], f"every span of the booking's story is in its trace: {others}"
    assert process.returncode == 0, stderr.decode()[-2000:]


async def test_a_replayed_dead_letter_goes_on_in_its_trace_under_a_producer_span(
    broker: Broker,
    queue_name: str,
    amqp: aiormq.abc.AbstractChannel,
    span_exporter: InMemorySpanExporter,
) -> None:
    queue, dlq = f"{queue_name}-work", f"{queue_name}-work.dlq"
    await amqp.queue_declare(queue, durable=True)
    await amqp.queue_declare(dlq, durable=True)
    carried = f"00-{TRACE_ID}-{PUBLISHER_SPAN}-01"
    await amqp.basic_publish(
        b"payload",
        routing_key=dlq,
        properties=aiormq.spec.Basic.Properties(
            message_id="m-1", headers={REASON_HEADER: "database down", "traceparent": carried}
        ),
    )
    async with DeadLetters(broker.amqp_url, queue, tracer=tracing.publish_tracer()) as dead:
        assert (await dead.replay()).replayed == 1

    [replay] = [s for s in span_exporter.get_finished_spans() if s.name == f"publish {queue}"]
    assert replay.kind is SpanKind.PRODUCER
    assert replay.parent is not None
    assert format(replay.parent.span_id, "016x") == PUBLISHER_SPAN
    assert (replay.attributes or {})["messaging.message.id"] == "m-1"
    copy = await amqp.basic_get(queue, no_ack=True)
    headers = copy.header.properties.headers or {}
    span_id = format(replay.context.span_id, "016x")
    assert headers["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"


async def test_ingest_publish_makes_a_producer_span_per_message_and_sends_its_context(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    queue = f"{queue_name}-bookings"
    code, out = await run_cli(
        "publish",
        "bookings",
        "--payload",
        "cinema,1",
        INGEST_AMQP_URL=broker.amqp_url,
        INGEST_PIPELINES__BOOKINGS__QUEUE=queue,
        OTEL_TRACES_EXPORTER="console",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    assert code == 0, out
    published = await amqp.basic_get(queue, no_ack=True)
    traceparent = str((published.header.properties.headers or {})["traceparent"])
    trace_id, span_id = traceparent.split("-")[1:3]
    # The console exporter prints each span as JSON; the PRODUCER span is the one sent.
    assert f'"name": "publish {queue}"' in out
    assert f'"trace_id": "0x{trace_id}"' in out
    assert f'"span_id": "0x{span_id}"' in out
    assert '"kind": "SpanKind.PRODUCER"' in out
