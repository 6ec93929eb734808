"""Publisher: confirmed, persistent publishing for pipelines that publish downstream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq
import structlog
from pamqp import commands as spec

from ingest.exceptions import PublishError
from ingest.message import Message
from ingest.rabbitmq._aiormq.publishing import PublishBatch, batch_publisher
from ingest.rabbitmq._backoff import reconnect_delay
from ingest.rabbitmq.connection import CONNECTION_ERRORS, open_connection, redact
from ingest.rabbitmq.instrumentation import PublishSpan, PublishTracer
from ingest.rabbitmq.options import AfterConnect, Backoff, QueueDeclare
from ingest.waiting import CLOSE_TIMEOUT_S

logger = structlog.get_logger("ingest.rabbitmq")

# A header with the publish time (milliseconds since the epoch) on a sample of what a
# Publisher sends: at most one message every STAMP_INTERVAL_S, so that consumers can tell
# publish-to-ack latency while a busy publisher pays for almost no headers (a delivery
# with headers skips the consumer's fast frame decoder).
PUBLISHED_AT_HEADER = "x-published-at"
STAMP_INTERVAL_S = 0.01


def published_times(messages: Iterable[Message]) -> Iterator[float]:
    """The publish times (seconds since the epoch) that the stamped ones of `messages`
    carry in PUBLISHED_AT_HEADER (publish-to-ack latency)."""
    for message in messages:
        headers = message.metadata.get("headers")
        if headers:
            published = headers.get(PUBLISHED_AT_HEADER)
            if isinstance(published, int) and not isinstance(published, bool):
                yield published / 1000


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to publish; `message_id` defaults to a fresh UUID. `cause` is the
    message it is published for (an order's confirmation: the order), if any: a
    tracer continues that message's trace; it is not sent."""

    body: bytes
    routing_key: str
    exchange: str = ""
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    headers: Mapping[str, Any] | None = None
    content_type: str | None = None
    correlation_id: str | None = None
    cause: Message | None = field(default=None, repr=False, compare=False)

    def properties(self) -> spec.Basic.Properties:
        """Its AMQP properties: persistent, with its id and whatever else it sets."""
        return spec.Basic.Properties(
            delivery_mode=2,
            message_id=self.message_id,
            headers=dict(self.headers) if self.headers else None,
            content_type=self.content_type,
            correlation_id=self.correlation_id,
        )


class Publisher:
    """Publishes with publisher confirms and `mandatory`, so a publish returns only once
    the broker has the message (persisted, for durable queues) and raises `Unroutable` when
    no queue would receive it. A batch (`publish_batch`) goes out in one write and is
    confirmed by delivery tag, as acks are sent (see `_aiormq.publishing`). The connection is
    opened on first use and again after a loss, with the backoff, for up to
    `connect_timeout` seconds per publish; the durable `declare_queues` are declared on
    each connect, so publishing never depends on their consumer having started first, and
    `after_connect(channel)` runs after them (to declare an exchange, say). Unless
    `stamp_publish_time=False`, a sample of the messages (the first of a publish, at most
    every 10 ms) carries PUBLISHED_AT_HEADER, for publish-to-ack latency. A `tracer`
    sees each message go out and adds its trace context to the headers::

        async with Publisher("amqp://guest:guest@localhost/%2F") as publisher:
            await publisher.publish(OutgoingMessage(b"email,foo@email.com", "notifications_queue"))
    """

    def __init__(
        self,
        url: str,
        *,
        connection_name: str | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 30.0,
        publish_timeout: float = 30.0,
        declare_queues: Sequence[str] | Mapping[str, QueueDeclare] = (),
        stamp_publish_time: bool = True,
        after_connect: AfterConnect | None = None,
        tracer: PublishTracer | None = None,
    ) -> None:
        self.url = url
        self.tracer = tracer
        self.stamp_publish_time = stamp_publish_time
        self.after_connect = after_connect
        # A queue named alone is declared durable; with its QueueDeclare, as that says
        # (the arguments must be those its consumer declares: a quorum queue, say).
        self.declare_queues: dict[str, QueueDeclare] = (
            dict(declare_queues)
            if isinstance(declare_queues, Mapping)
            else {queue: QueueDeclare() for queue in declare_queues}
        )
        self.connection_name = connection_name
        self.backoff = backoff or Backoff("rand_exp", min=0.2, max=5.0)
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        # How to publish on a channel (fast path or not), chosen once per channel.
        self._publishing: tuple[aiormq.abc.AbstractChannel, PublishBatch] | None = None
        self._connecting = asyncio.Lock()
        self._stamped_at = 0.0

    async def __aenter__(self) -> Publisher:
        await self._ensure_channel()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish one message; return when the broker confirmed it."""
        await self.publish_batch((message,))

    async def publish_batch(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish `messages` in order, their frames in one write; return when the broker
        confirmed every one, else raise for the first that failed, once all are settled
        (`Unroutable`, or `PublishError`: refused, not confirmed within `publish_timeout`,
        or lost with the connection). The others may have been published: publish with
        message_ids you can deduplicate on."""
        publish = await self._ensure_publishing()
        if self.tracer is None:
            await publish(self._stamp(messages), self.publish_timeout)
            return
        spans, traced = self._traced(self.tracer, messages)
        try:
            await publish(self._stamp(traced), self.publish_timeout)
        except BaseException as exc:
            for span in spans:
                span.end(exc)
            raise
        for span in spans:
            span.end(None)

    @staticmethod
    def _traced(
        tracer: PublishTracer, messages: Sequence[OutgoingMessage]
    ) -> tuple[list[PublishSpan], list[OutgoingMessage]]:
        """A span per message, and the messages with their spans' headers."""
        spans: list[PublishSpan] = []
        traced: list[OutgoingMessage] = []
        for message in messages:
            span = tracer.start(
                message.exchange,
                message.routing_key,
                message.message_id,
                message.headers,
                message.cause,
            )
            spans.append(span)
            headers = {**(message.headers or {}), **span.headers}
            traced.append(dataclasses.replace(message, headers=headers))
        return spans, traced

    def _stamp(self, messages: Sequence[OutgoingMessage]) -> Sequence[OutgoingMessage]:
        """`messages`, the first with PUBLISHED_AT_HEADER when none was stamped for a while."""
        now = time.time()
        if not self.stamp_publish_time or not messages or now - self._stamped_at < STAMP_INTERVAL_S:
            return messages
        self._stamped_at = now
        first = messages[0]
        headers = {**(first.headers or {}), PUBLISHED_AT_HEADER: int(now * 1000)}
        return [dataclasses.replace(first, headers=headers), *messages[1:]]

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """`publish_batch`, under the name it had when it was one publish per message."""
        await self.publish_batch(messages)

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._publishing = None
        if connection is not None and not connection.is_closed:
            await connection.close()

    async def _ensure_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._connecting:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            return await self._reconnect()

    async def _ensure_publishing(self) -> PublishBatch:
        channel = await self._ensure_channel()
        chosen = self._publishing
        if chosen is None or chosen[0] is not channel:
            chosen = self._publishing = (channel, batch_publisher(channel))
        return chosen[1]

    async def _open(self) -> tuple[aiormq.abc.AbstractConnection, aiormq.abc.AbstractChannel]:
        """A connection and its confirming channel, with what it declares; a connection
        whose declarations fail (a queue declared with other arguments) is closed, not left
        open behind the next attempt."""
        connection = await open_connection(self.url, name=self.connection_name)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            for queue, how in self.declare_queues.items():
                await channel.queue_declare(
                    queue, durable=how.durable, arguments=dict(how.arguments)
                )
            if self.after_connect is not None:
                await self.after_connect(channel)
        except BaseException:
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()
            raise
        return connection, channel

    async def _reconnect(self) -> aiormq.abc.AbstractChannel:
        await self.close()
        attempt = 0
        try:
            async with asyncio.timeout(self.connect_timeout):
                while True:
                    attempt += 1
                    try:
                        connection, channel = await self._open()
                    except CONNECTION_ERRORS as exc:
                        delay = reconnect_delay(self.backoff, attempt)
                        logger.warning(
                            "publisher cannot connect",
                            url=redact(self.url),
                            error=repr(exc),
                            attempt=attempt,
                        )
                        if delay is None:
                            raise PublishError(
                                f"cannot connect to {redact(self.url)}: {exc!r}"
                            ) from exc
                        await asyncio.sleep(delay)
                        continue
                    self._connection, self._channel = connection, channel
                    return channel
        except TimeoutError:
            raise PublishError(
                f"cannot connect to {redact(self.url)} within {self.connect_timeout}s"
            ) from None
