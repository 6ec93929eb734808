"""RabbitMQProducer: consumes a queue, survives connection loss, drains with basic.cancel."""

from __future__ import annotations

import asyncio

from ingest.producer import PipelineShape, Sink
from ingest.rabbitmq._consumer import Consumer
from ingest.rabbitmq.options import RabbitMQOptions
from ingest.rabbitmq.stats import ProducerStats


class RabbitMQProducer:
    """Feeds a pipeline from a RabbitMQ queue (broadway_rabbitmq's producer).

    Each of `concurrency` consumers has its own connection and channel. On connection or
    channel loss, or a consumer cancelled by the broker, a consumer reconnects with the
    backoff, declares and binds again and consumes again; acks for the dead channel are
    dropped (the broker redelivers). `ready` is true only while every consumer consumes.
    An exception that reconnecting cannot get past (a bug) escapes to the pipeline's
    supervisor, which closes this producer and starts it again.
    """

    def __init__(self, options: RabbitMQOptions) -> None:
        self.options = options
        self.stats = ProducerStats()
        self.prefetch_count = options.prefetch_count or 50
        self._consumers: list[Consumer] = []
        self._held = False

    @property
    def ready(self) -> bool:
        return bool(self._consumers) and all(consumer.ready for consumer in self._consumers)

    @property
    def consumers_ready(self) -> list[bool]:
        """Each consumer: connected and consuming?"""
        return [consumer.ready for consumer in self._consumers]

    @property
    def concurrency(self) -> int:
        """How many consumers (connections) feed the pipeline; shown in the topology."""
        return self.options.concurrency

    def prefetch_of(self, index: int) -> int:
        """Consumer `index`'s QoS: its `per_producer` prefetch_count, else the shared one."""
        own: int | None = self.options.per_producer.get(index, {}).get("prefetch_count")
        return own if own is not None else self.prefetch_count

    def bind(self, shape: PipelineShape) -> int:
        """Check prefetch against the batchers (or pick one), before anything starts."""
        if self.options.prefetch_count is None:
            self.prefetch_count = shape.default_bound()
        else:
            shape.check_bound(self.options.prefetch_count, "prefetch_count")
            self.prefetch_count = self.options.prefetch_count
        return sum(self.prefetch_of(index) for index in range(self.options.concurrency))

    async def start(self, sink: Sink) -> None:
        # New consumers each time: after a crash the pipeline closes this producer and
        # starts it again, and nothing of the closed connections' state may carry over.
        options = self.options
        self._consumers = [
            Consumer(options.for_producer(i), i, self.prefetch_of(i), self.stats, sink, self._held)
            for i in range(options.concurrency)
        ]
        for consumer in self._consumers:
            consumer.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every consumer is consuming."""
        async with asyncio.timeout(timeout):
            for consumer in self._consumers:
                await consumer.consuming.wait()

    async def pause(self) -> None:
        """Stop consuming (basic.cancel on every consumer) until resume(), across
        reconnects and restarts; deliveries already made go on and are acknowledged."""
        self._held = True
        await asyncio.gather(*(consumer.hold() for consumer in self._consumers))

    async def resume(self) -> None:
        self._held = False
        await asyncio.gather(*(consumer.release() for consumer in self._consumers))

    async def drain(self) -> None:
        await asyncio.gather(*(consumer.drain() for consumer in self._consumers))

    async def close(self) -> None:
        await asyncio.gather(*(consumer.close() for consumer in self._consumers))
