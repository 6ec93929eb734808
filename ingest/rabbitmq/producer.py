"""RabbitMQProducer: consumes a queue, survives connection loss, drains with basic.cancel."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

from ingest.producer import PipelineShape, Sink
from ingest.rabbitmq._consumer import Consumer
from ingest.rabbitmq.acknowledger import retry_queue_name
from ingest.rabbitmq.options import RabbitMQOptions
from ingest.rabbitmq.stats import ProducerStats
from ingest.waiting import first_of


class RabbitMQProducer:
    """Feeds a pipeline from a RabbitMQ queue (broadway_rabbitmq's producer).

    Each of `concurrency` consumers has its own connection and channel. On connection or
    channel loss, or a consumer cancelled by the broker, a consumer reconnects with the
    backoff, declares and binds again and consumes again; acks for the dead channel are
    dropped (the broker redelivers). `ready` is true only while every consumer consumes;
    `wait_ready()` waits for that, whichever consumers the producer has by then.
    An exception that reconnecting cannot get past (a bug) escapes to the pipeline's
    supervisor, which closes this producer and starts it again.
    """

    def __init__(self, options: RabbitMQOptions) -> None:
        self.options = options
        self.stats = ProducerStats()
        self.prefetch_count = options.prefetch_count or 50
        self._consumers: list[Consumer] = []
        self._held = False
        self._limit: int | None = None  # limit(): the circuit breaker's probes
        # Set by start(), and replaced: a wait for the consumers then looks at the new ones.
        self._restarted = asyncio.Event()

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

    @property
    def prefetch(self) -> int:
        """How many unacknowledged deliveries the consumers may hold together."""
        return sum(self.prefetch_of(index) for index in range(self.options.concurrency))

    def work_queues(self) -> list[str]:
        """The queues consumed: the queue, or each consumer's partition."""
        options = self.options
        return list(
            dict.fromkeys(options.for_producer(i).queue for i in range(options.concurrency))
        )

    def queues(self) -> list[str]:
        """The work queues, each followed by its retry queues and its dead-letter queue."""
        queues: list[str] = []
        for queue in self.work_queues():
            queues.append(queue)
            options = replace(self.options, queue=queue)
            if options.retry is not None:
                queues += [retry_queue_name(queue, d) for d in sorted(set(options.retry.delays))]
            if options.dlq_name:
                queues.append(options.dlq_name)
        return queues

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
        return self.prefetch

    async def start(self, sink: Sink) -> None:
        # New consumers each time: after a crash the pipeline closes this producer and
        # starts it again, and nothing of the closed connections' state may carry over.
        options = self.options
        self._consumers = [
            Consumer(
                options.for_producer(i),
                i,
                self.prefetch_of(i),
                self.stats,
                sink,
                self._held,
                limit=self._share(i),
            )
            for i in range(options.concurrency)
        ]
        restarted, self._restarted = self._restarted, asyncio.Event()
        restarted.set()
        for consumer in self._consumers:
            consumer.start()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every consumer is consuming (`ready`); TimeoutError after `timeout`
        seconds (e.g. while the pipeline is paused).

        The consumers are those of the producer's current start: a pipeline restarting
        after a crash closes them and starts new ones, so a wait begun before the start,
        or between a crash and the restart, ends once the new ones consume."""
        async with asyncio.timeout(timeout):
            while not self.ready:
                restarted = self._restarted  # taken now: a start meanwhile is not missed
                idle = [
                    consumer.consuming.wait() for consumer in self._consumers if not consumer.ready
                ]
                await first_of(restarted.wait(), *([asyncio.gather(*idle)] if idle else []))

    async def pause(self) -> None:
        """Stop consuming (basic.cancel on every consumer) until resume(), across
        reconnects and restarts; deliveries already made go on and are acknowledged."""
        self._held = True
        await asyncio.gather(*(consumer.hold() for consumer in self._consumers))

    async def resume(self) -> None:
        self._held = False
        await asyncio.gather(*(consumer.release() for consumer in self._consumers))

    async def limit(self, messages: int | None) -> None:
        """Hold at most about `messages` unacknowledged deliveries from now on (None: the
        prefetch again), across reconnects and restarts: the circuit breaker probes with a
        few messages rather than a whole prefetch. Each consumer consumes with its share
        as prefetch, at least 1 (the pipeline's intake lets in no more than `messages`)."""
        self._limit = messages
        await asyncio.gather(
            *(consumer.limit(self._share(i)) for i, consumer in enumerate(self._consumers))
        )

    def _share(self, index: int) -> int | None:
        """Consumer `index`'s prefetch under `limit()`; None without a limit."""
        if self._limit is None:
            return None
        share = max(1, math.ceil(self._limit / self.options.concurrency))
        return min(share, self.prefetch_of(index))

    async def drain(self) -> None:
        await asyncio.gather(*(consumer.drain() for consumer in self._consumers))

    async def close(self) -> None:
        await asyncio.gather(*(consumer.close() for consumer in self._consumers))
