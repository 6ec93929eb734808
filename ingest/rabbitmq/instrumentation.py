"""Publish instrumentation: the seam a tracer plugs into to see, and mark, every message
a `Publisher` or a dead-letter replay sends (the service's OpenTelemetry tracing is one)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ingest.message import Message


class PublishSpan(Protocol):
    """One message being published: `headers` go into its headers (a trace context,
    say); `end` is called once the broker confirmed it (`error` None) or did not."""

    @property
    def headers(self) -> Mapping[str, Any]: ...

    def end(self, error: BaseException | None) -> None: ...


class PublishTracer(Protocol):
    """Called for each message published, before it goes out::

        Publisher(url, tracer=tracer)

    `exchange` and `routing_key` say where it goes; `headers` are those it already
    carries (a replayed dead letter's, say); `cause` is the message it is published for,
    when the publisher was told (`OutgoingMessage(cause=...)`), so that its trace goes on.
    """

    def start(
        self,
        exchange: str,
        routing_key: str,
        message_id: str | None,
        headers: Mapping[str, Any] | None,
        cause: Message | None,
    ) -> PublishSpan: ...
