"""PRODUCER spans for what the service publishes, and the W3C trace context they put in
each message's headers (`traceparent`, `tracestate`), so its consumer goes on with the
trace."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from weakref import WeakKeyDictionary

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from ingest.message import Message
from ingest.service.tracing.spans import HEADERS
from ingest.text import bounded

# Where a published message's trace goes on from, when the publisher was told of no cause.
_CONTEXT_HEADERS: Final = ("traceparent", "tracestate")


class PublishSpan:
    """One message being published: its span, and the headers that carry it."""

    __slots__ = ("headers", "span")

    def __init__(self, span: Span, headers: dict[str, Any]) -> None:
        self.span = span
        self.headers = headers

    def end(self, error: BaseException | None) -> None:
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(
                Status(StatusCode.ERROR, bounded(f"{type(error).__name__}: {error}", 500))
            )
        self.span.end()


class PublishSpans:
    """The connector's `PublishTracer`: a PRODUCER span per message published. Its parent
    is, first found: the process span of the message it is published for (`cause`: what
    a consumed message leads to goes on in its trace), the trace context it already
    carries (a replayed dead letter goes on in its own), the current span."""

    def __init__(self, tracer: Tracer, process: WeakKeyDictionary[Message, Span]) -> None:
        self.tracer = tracer
        # The consumed messages' process spans (the pipelines' spans keep them).
        self.process = process

    def start(
        self,
        exchange: str,
        routing_key: str,
        message_id: str | None,
        headers: Mapping[str, Any] | None,
        cause: Message | None,
    ) -> PublishSpan:
        destination = exchange or routing_key
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": destination,
            "messaging.rabbitmq.destination.routing_key": routing_key,
        }
        if message_id:
            attributes["messaging.message.id"] = message_id
        span = self.tracer.start_span(
            f"publish {destination}",
            context=self._parent(headers, cause),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
        )
        carrier: dict[str, Any] = {}
        inject(carrier, context=trace.set_span_in_context(span))
        return PublishSpan(span, carrier)

    def _parent(self, headers: Mapping[str, Any] | None, cause: Message | None) -> Context | None:
        if cause is not None:
            span = self.process.get(cause)
            if span is not None:
                return trace.set_span_in_context(span, Context())
        if headers and any(key in headers for key in _CONTEXT_HEADERS):
            return extract(headers, getter=HEADERS)
        return None  # the current context
