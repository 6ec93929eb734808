"""Spans from a pipeline's events, after OpenTelemetry's messaging conventions: a
CONSUMER `process` span per message (its parent the trace context its headers carry),
`prepare_messages` and `handle_message` inside, and a span per batch linked to every
message it holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import Token
from typing import Any, Final
from weakref import WeakKeyDictionary

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer

from ingest.events import Event, EventKind
from ingest.message import Failed, Message
from ingest.rabbitmq.acknowledger import Delivery
from ingest.text import bounded

_SYSTEM: Final = {"messaging.system": "rabbitmq"}


class HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads a trace context from AMQP headers, whose values may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes | bytearray):
            return [bytes(value).decode("utf-8", "replace")]
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


HEADERS: Final = HeaderGetter()


def carried_context(message: Message) -> Context | None:
    """The trace context a message's headers carry (`traceparent`), if any."""
    headers = message.metadata.get("headers")
    if not isinstance(headers, Mapping) or "traceparent" not in headers:
        return None
    return extract(headers, getter=HEADERS)


class PipelineSpans:
    """One pipeline's spans. Each message's `process` span starts when its chunk reaches
    a processor and ends when the message is acknowledged, so its length is the
    message's time in the service; what runs inside (`prepare_messages`,
    `handle_message`, `handle_batch`, and the database and SMTP calls they make) is made
    the current span of the stage's task while it runs, so that instrumented libraries
    nest under it."""

    def __init__(
        self,
        tracer: Tracer,
        pipeline: str,
        destination: str,
        process: WeakKeyDictionary[Message, Span],
    ) -> None:
        self.tracer = tracer
        self.pipeline = pipeline
        self.destination = destination
        # Each message's process span until it is acknowledged, and no longer than the
        # message lives (shared with the publish spans: a message published for it).
        self.process = process
        # The spans under way, by the sequence their events share, with the token that
        # made them current in the stage's task.
        self._open: dict[int, tuple[Span, Token[Context]]] = {}
        self._handlers: dict[EventKind, Callable[[Event], None]] = {
            "processor.start": self._received,
            "prepare.start": self._prepare,
            "message.start": self._handle_message,
            "batch.start": self._batch,
            "prepare.stop": self._stop,
            "message.stop": self._stop,
            "batch.stop": self._stop,
            "prepare.exception": self._exception,
            "message.exception": self._exception,
            "batch.exception": self._exception,
            "ack": self._acknowledged,
            "ack.exception": self._acknowledged,
        }

    @property
    def kinds(self) -> frozenset[EventKind]:
        """The events it subscribes to: those it has a handler for."""
        return frozenset(self._handlers)

    def on_event(self, event: Event) -> None:
        self._handlers[event.kind](event)

    def process_context(self, message: Message) -> SpanContext | None:
        """The message's process span, if it has one here, else what its headers carry."""
        span = self.process.get(message)
        if span is not None:
            return span.get_span_context()
        carried = carried_context(message)
        if carried is None:
            return None
        context = trace.get_current_span(carried).get_span_context()
        return context if context.is_valid else None

    def _received(self, event: Event) -> None:
        for message in event.messages:
            if message not in self.process:
                self.process[message] = self._start_process(message, event.stage)

    def _start_process(self, message: Message, stage: str) -> Span:
        span = self.tracer.start_span(
            f"process {self.destination}",
            context=carried_context(message) or Context(),
            kind=SpanKind.CONSUMER,
        )
        # Sampled out, a span only carries its trace on (to what the message leads to).
        if span.is_recording():
            span.set_attributes(self._process_attributes(message, stage))
        return span

    def _process_attributes(self, message: Message, stage: str) -> dict[str, Any]:
        metadata = message.metadata
        attributes: dict[str, Any] = {
            **_SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self.destination,
            "ingest.pipeline": self.pipeline,
            "ingest.processor": stage,
        }
        for key, name in _METADATA_ATTRIBUTES:
            value = metadata.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool):
                attributes[name] = value
        if isinstance(message.ack_data, Delivery):  # a RabbitMQ delivery: its envelope
            raw = message.ack_data.raw
            attributes["messaging.rabbitmq.message.delivery_tag"] = raw.delivery_tag or 0
            attributes["messaging.rabbitmq.destination.routing_key"] = raw.routing_key or ""
            if raw.exchange:
                attributes["ingest.rabbitmq.exchange"] = raw.exchange
            if raw.redelivered:
                attributes["ingest.rabbitmq.redelivered"] = True
        if isinstance(message.data, bytes | str):
            attributes["messaging.message.body.size"] = len(message.data)
        return attributes

    def _prepare(self, event: Event) -> None:
        attributes = {"ingest.pipeline": self.pipeline, "ingest.processor": event.stage}
        self._open_span(event, "prepare_messages", SpanKind.INTERNAL, attributes)

    def _handle_message(self, event: Event) -> None:
        [message] = event.messages
        span = self.process.get(message)
        if span is None or not span.is_recording():
            return  # its trace is sampled out: no child of it would be either
        started = self.tracer.start_span(
            "handle_message",
            context=trace.set_span_in_context(span, Context()),
            attributes={"ingest.pipeline": self.pipeline, "ingest.processor": event.stage},
        )
        self._make_current(event, started)

    def _batch(self, event: Event) -> None:
        info = event.batch_info
        attributes: dict[str, Any] = {
            **_SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self.destination,
            "messaging.batch.message_count": len(event.messages),
            "ingest.pipeline": self.pipeline,
            "ingest.batch_processor": event.stage,
        }
        if info is not None:
            attributes["ingest.batcher"] = info.batcher
            attributes["ingest.batch_key"] = bounded(str(info.batch_key), 200)
            attributes["ingest.batch.trigger"] = info.trigger
        name = f"handle_batch {info.batcher}" if info is not None else "handle_batch"
        self._open_span(event, name, SpanKind.CONSUMER, attributes)

    def _open_span(
        self, event: Event, name: str, kind: SpanKind, attributes: dict[str, Any]
    ) -> None:
        """A span over several messages: linked to each (the conventions' batch span), and
        in their trace when they all share one (a message published alone, the rows of an
        upload published under one trace); a trace of its own otherwise. None when every
        message's trace is sampled out, as a child of theirs would be."""
        contexts = [c for c in map(self.process_context, event.messages) if c is not None]
        if not any(context.trace_flags.sampled for context in contexts):
            return
        links = [Link(context) for context in contexts]
        parent = Context()
        if contexts and all(c.trace_id == contexts[0].trace_id for c in contexts):
            parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0]), Context())
        span = self.tracer.start_span(
            name, context=parent, kind=kind, attributes=attributes, links=links
        )
        self._make_current(event, span)

    def _make_current(self, event: Event, span: Span) -> None:
        # Events are emitted by the stage's own task: what it runs next (the hook, the
        # database calls) sees this span as current, until the stop detaches it.
        token = otel_context.attach(trace.set_span_in_context(span))
        self._open[id(event.messages)] = (span, token)

    def _stop(self, event: Event) -> None:
        opened = self._open.pop(id(event.messages), None)
        if opened is None:
            return
        span, token = opened
        if event.kind == "batch.stop":
            span.set_attribute("ingest.batch.successful", event.successful)
            span.set_attribute("ingest.batch.failed", event.failed)
            if event.failed:
                span.set_status(Status(StatusCode.ERROR, f"{event.failed} message(s) failed"))
        span.end()
        otel_context.detach(token)

    def _exception(self, event: Event) -> None:
        opened = self._open.get(id(event.messages))
        if opened is None or event.exception is None:
            return
        span = opened[0]
        span.record_exception(event.exception)
        span.set_status(Status(StatusCode.ERROR, _described(event.exception)))
        if event.kind != "batch.exception":  # a batch's stop follows; the others end here
            self._stop(event)

    def _acknowledged(self, event: Event) -> None:
        for message in event.messages:
            span = self.process.pop(message, None)
            if span is None:
                continue
            status = message.status
            if isinstance(status, Failed):
                if status.exception is not None:
                    span.record_exception(status.exception)
                span.set_status(Status(StatusCode.ERROR, status.reason))
            if event.exception is not None:
                span.set_attribute("ingest.ack.error", _described(event.exception))
            span.end()


# Metadata a process span carries, as the conventions name it.
_METADATA_ATTRIBUTES: Final[Sequence[tuple[str, str]]] = (
    ("message_id", "messaging.message.id"),
    ("correlation_id", "messaging.message.conversation_id"),
    ("delivery_tag", "messaging.rabbitmq.message.delivery_tag"),
    ("routing_key", "messaging.rabbitmq.destination.routing_key"),
)


def _described(error: BaseException) -> str:
    return bounded(f"{type(error).__name__}: {error}", 500)
