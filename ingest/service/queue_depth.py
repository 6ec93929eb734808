"""Queue depths next to the service's own metrics: `ingest_queue_messages{pipeline,queue,
state}`, the messages ready in each pipeline's work, retry and dead-letter queues.

Read every `interval` seconds by one task of the service, over one connection of its own,
with a passive queue.declare per queue (a few frames each): a bounded cost whatever the
depth. A queue the broker does not have (yet) is left out; a lost connection is opened
again at the next reading, and the figures of a reading that failed are dropped rather
than shown stale."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence

import aiormq
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.rabbitmq.connection import CONNECTION_ERRORS, open_connection
from ingest.waiting import CLOSE_TIMEOUT_S

logger = structlog.get_logger("ingest.service.queue_depth")


class QueueDepths(Collector):
    def __init__(
        self, url: str, queues: Mapping[str, Sequence[str]], interval: float = 15.0
    ) -> None:
        """`queues`: each pipeline's queues to read."""
        self.url = url
        self.queues = queues
        self.interval = interval
        self.ready: dict[tuple[str, str], int] = {}
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._stopping = asyncio.Event()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ingest_queue_messages",
            "Messages in a pipeline's work, retry and dead-letter queues (state: ready), "
            f"read every {self.interval:g} s",
            labels=["pipeline", "queue", "state"],
        )
        for (pipeline, queue), count in sorted(self.ready.items()):
            family.add_metric([pipeline, queue, "ready"], count)
        yield family

    async def run(self) -> None:
        """Read, then wait `interval`, until `stop()` (the service, at shutdown). A reading
        under way finishes first: cancelling aiormq half-way through opening a connection
        can leave its socket open."""
        try:
            while not self._stopping.is_set():
                await self.read()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._stopping.wait()
        finally:
            await self._close()

    def stop(self) -> None:
        self._stopping.set()

    async def read(self) -> None:
        try:
            if self._connection is None or self._connection.is_closed:
                self._connection = await open_connection(self.url, name="ingest-queue-depth")
            ready: dict[tuple[str, str], int] = {}
            for pipeline, queues in self.queues.items():
                for queue in queues:
                    count = await self._ready(self._connection, queue)
                    if count is not None:
                        ready[pipeline, queue] = count
            self.ready = ready
        except (*CONNECTION_ERRORS, aiormq.exceptions.ChannelInvalidStateError) as error:
            self.ready = {}
            logger.warning("cannot read queue depths", error=repr(error))
            await self._close()

    @staticmethod
    async def _ready(connection: aiormq.abc.AbstractConnection, queue: str) -> int | None:
        # A channel per queue: a passive declare of a missing queue closes its channel.
        channel = await connection.channel()
        try:
            declared = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not channel.is_closed:
                await channel.close()
        return int(declared.message_count or 0)

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            # Bounded: closing waits for the broker's close-ok, which may never come.
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await connection.close()
