"""RabbitMQProducer: consumes a queue, survives connection loss, drains with basic.cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq
import structlog
from aiormq.abc import DeliveredMessage

from ingest.exceptions import BufferClosed
from ingest.message import Message
from ingest.producer import PipelineShape, Sink
from ingest.rabbitmq import _fastpath as fastpath
from ingest.rabbitmq._backoff import reconnect_delay
from ingest.rabbitmq._connection import open_connection
from ingest.rabbitmq.acknowledger import ChannelAcknowledger, Delivery, retry_queue_name
from ingest.rabbitmq.options import RabbitMQOptions, redact
from ingest.rabbitmq.stats import ProducerStats

logger = structlog.get_logger("ingest.rabbitmq")

_PROPERTY_OF = {
    "content_type": "content_type",
    "content_encoding": "content_encoding",
    "headers": "headers",
    "priority": "priority",
    "correlation_id": "correlation_id",
    "message_id": "message_id",
    "timestamp": "timestamp",
    "type": "message_type",
    "user_id": "user_id",
    "app_id": "app_id",
    "reply_to": "reply_to",
    "expiration": "expiration",
}


def _metadata_reader(fields: tuple[str, ...]) -> Callable[[DeliveredMessage], dict[str, Any]]:
    """A function building the selected metadata of a delivery, decided once."""
    delivery_fields = [
        f for f in fields if f in ("delivery_tag", "redelivered", "exchange", "routing_key")
    ]
    property_fields = [(f, _PROPERTY_OF[f]) for f in fields if f in _PROPERTY_OF]
    persistent = "persistent" in fields

    def read(raw: DeliveredMessage) -> dict[str, Any]:
        delivery = raw.delivery
        properties = raw.header.properties
        metadata = {name: getattr(delivery, name) for name in delivery_fields}
        for name, attribute in property_fields:
            metadata[name] = getattr(properties, attribute)
        if persistent:
            metadata["persistent"] = properties.delivery_mode == 2
        return metadata

    return read


class RabbitMQProducer:
    """Feeds a pipeline from a RabbitMQ queue (broadway_rabbitmq's producer).

    Each of `concurrency` consumers has its own connection and channel. On connection or
    channel loss, or a consumer cancelled by the broker, a consumer reconnects with the
    backoff, declares and binds again and consumes again; acks for the dead channel are
    dropped (the broker redelivers). `ready` is true only while every consumer consumes.
    """

    def __init__(self, options: RabbitMQOptions) -> None:
        self.options = options
        self.stats = ProducerStats()
        self.prefetch_count = options.prefetch_count or 50
        self._consumers = [
            _Consumer(self, index, options.for_producer(index))
            for index in range(options.concurrency)
        ]

    @property
    def ready(self) -> bool:
        return all(consumer.ready for consumer in self._consumers)

    @property
    def concurrency(self) -> int:
        """How many consumers (connections) feed the pipeline; shown in the topology."""
        return len(self._consumers)

    def bind(self, shape: PipelineShape) -> int:
        """Check prefetch against the batchers (or pick one), before anything starts."""
        if self.options.prefetch_count is None:
            self.prefetch_count = shape.default_bound()
        else:
            shape.check_bound(self.options.prefetch_count, "prefetch_count")
            self.prefetch_count = self.options.prefetch_count
        return sum(consumer.prefetch_count for consumer in self._consumers)

    async def start(self, sink: Sink) -> None:
        for consumer in self._consumers:
            consumer.start(sink)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every consumer is consuming."""
        async with asyncio.timeout(timeout):
            for consumer in self._consumers:
                await consumer.consuming.wait()

    async def drain(self) -> None:
        await asyncio.gather(*(consumer.drain() for consumer in self._consumers))

    async def close(self) -> None:
        await asyncio.gather(*(consumer.close() for consumer in self._consumers))


class _Consumer:
    """One connection, one channel, one consumer, reconnected for as long as it runs."""

    def __init__(self, owner: RabbitMQProducer, index: int, options: RabbitMQOptions) -> None:
        self.owner = owner
        self.index = index
        self.options = options
        self.stats = owner.stats
        self.consuming = asyncio.Event()
        self._read_metadata = _metadata_reader(options.metadata)
        self._sink: Sink | None = None
        self._task: asyncio.Task[None] | None = None
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._acknowledger: ChannelAcknowledger | None = None
        self._consumer_tag: str | None = None
        self._cancelled_by_broker = asyncio.Event()
        self._draining = False
        self._pushing: set[asyncio.Task[None]] = set()
        self._arrived: list[Message] = []
        self._log = logger.bind(queue=options.queue, producer=index)

    @property
    def ready(self) -> bool:
        return self.consuming.is_set()

    @property
    def prefetch_count(self) -> int:
        """This consumer's QoS: its `per_producer` prefetch_count, else the producer's."""
        overrides = self.owner.options.per_producer.get(self.index, {})
        own: int | None = overrides.get("prefetch_count")
        return own if own is not None else self.owner.prefetch_count

    def start(self, sink: Sink) -> None:
        self._sink = sink
        self._task = asyncio.create_task(
            self._run(), name=f"rabbitmq-{self.options.queue}-{self.index}"
        )

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                await self._wait_for_loss()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning("broker connection failed", error=repr(exc), attempt=attempt + 1)
            finally:
                self.consuming.clear()
            if self._draining:
                return
            await self._close_connection()
            attempt += 1
            self.stats.reconnects += 1
            delay = reconnect_delay(self.options.backoff, attempt)
            if delay is None:
                self._log.error("broker connection lost and backoff is 'stop': giving up")
                return
            await asyncio.sleep(delay)

    async def _connect(self) -> None:
        options = self.options
        url = options.connection_url()
        self._log.info("connecting", url=redact(url))
        self._connection = connection = await open_connection(
            url,
            name=options.connection_name,
            ssl_context=options.ssl_context,
            heartbeat=options.heartbeat,
        )
        # aiormq's default frame buffer (10 frames, about 3 messages) makes the channel
        # reader and the connection reader take turns every 3 messages; a buffer the size
        # of the prefetch lets a whole burst through in one turn (bounded by the prefetch).
        channel = await connection.channel(
            publisher_confirms=False, frame_buffer_size=3 * self.prefetch_count + 10
        )
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.basic_qos(
            prefetch_count=self.prefetch_count, prefetch_size=options.prefetch_size
        )
        if options.after_connect is not None:
            await options.after_connect(channel)
        await self._declare(channel)
        self._cancelled_by_broker = asyncio.Event()
        channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._channel = channel
        self._acknowledger = ChannelAcknowledger(
            channel, publisher, options, self.stats, self.prefetch_count
        )
        # Deliveries skip aiormq's task per message: the channel's reader hands them to
        # _deliver directly (the single biggest per-message cost of a Python consumer).
        direct = fastpath.deliver_directly(channel, self._deliver)
        ok = await channel.basic_consume(
            options.queue,
            fastpath.ignore if direct else self._on_delivery,
            no_ack=options.no_ack,
            exclusive=options.consume_exclusive,
            arguments=dict(options.consume_arguments),
            consumer_tag=options.consumer_tag,
        )
        self._consumer_tag = ok.consumer_tag
        self.consuming.set()
        self._log.info("consuming", prefetch_count=self.prefetch_count)

    async def _declare(self, channel: aiormq.abc.AbstractChannel) -> None:
        options = self.options
        declare = options.declare
        if declare is not None:
            await channel.queue_declare(
                options.queue,
                durable=declare.durable,
                auto_delete=declare.auto_delete,
                exclusive=declare.exclusive,
                passive=declare.passive,
                arguments=dict(declare.arguments),
            )
        if options.dlq_name:
            await channel.queue_declare(options.dlq_name, durable=True)
        if options.retry is not None:
            for delay in sorted(set(options.retry.delays)):
                await channel.queue_declare(
                    retry_queue_name(options.queue, delay),
                    durable=True,
                    arguments={
                        "x-message-ttl": round(delay * 1000),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": options.queue,
                    },
                )
        for binding in options.bindings:
            await channel.queue_bind(
                options.queue,
                binding.exchange,
                routing_key=binding.routing_key,
                arguments=dict(binding.arguments),
            )

    async def _wait_for_loss(self) -> None:
        assert self._channel is not None
        assert self._connection is not None
        waiters = [
            asyncio.ensure_future(self._channel.closing),
            asyncio.ensure_future(self._connection.closing),
            asyncio.ensure_future(self._cancelled_by_broker.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._draining:
            return
        reason = (
            "consumer cancelled by the broker"
            if self._cancelled_by_broker.is_set()
            else "connection lost"
        )
        self._log.warning("stopped consuming; reconnecting", reason=reason)
        self.stats.connection_losses += 1

    def _on_broker_cancel(self, frame: Any) -> None:
        self._cancelled_by_broker.set()

    def _deliver(self, raw: DeliveredMessage) -> None:
        acknowledger = self._acknowledger
        if acknowledger is None or acknowledger.channel is not raw.channel:
            self.stats.dropped_stale_delivery += 1
            return
        # Deliveries read in one turn of the event loop go to the pipeline together: one
        # wake-up and one chunk for the processors instead of one per message.
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._arrived.append(
            Message(
                raw.body, acknowledger, ack_data=Delivery(raw), metadata=self._read_metadata(raw)
            )
        )

    def _hand_over(self) -> None:
        messages, self._arrived = self._arrived, []
        sink = self._sink
        if sink is None:
            return
        try:
            if sink.push_nowait(messages):
                return
        except BufferClosed:
            # Draining: left unacknowledged; closing the channel hands them back to the broker.
            self.stats.not_taken_while_draining += len(messages)
            return
        # Only when the intake is smaller than the prefetch (a producer not bound to its
        # pipeline): wait for room, bounded by the prefetch.
        task = asyncio.create_task(self._push(sink, messages))
        self._pushing.add(task)
        task.add_done_callback(self._pushing.discard)

    async def _push(self, sink: Sink, messages: list[Message]) -> None:
        try:
            await sink.push(messages)
        except BufferClosed:
            self.stats.not_taken_while_draining += len(messages)

    async def _on_delivery(self, raw: DeliveredMessage) -> None:
        self._deliver(raw)

    async def drain(self) -> None:
        """Stop receiving: basic.cancel, and no reconnecting from now on."""
        self._draining = True
        self.consuming.clear()
        channel, tag = self._channel, self._consumer_tag
        if channel is not None and tag is not None and not channel.is_closed:
            try:
                await channel.basic_cancel(tag)
            except Exception as exc:
                self._log.warning("basic.cancel failed", error=repr(exc))
        if self._task is not None and not self._task.done() and self._channel is None:
            self._task.cancel()

    async def close(self) -> None:
        self._draining = True
        if self._acknowledger is not None:
            await self._acknowledger.flush()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as exc:
                self._log.debug("closing the connection failed", error=repr(exc))
