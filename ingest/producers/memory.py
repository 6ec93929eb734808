"""InMemoryProducer: messages pushed by code, for tests and benchmarks (Broadway's
DummyProducer)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ingest.exceptions import ProducerNotRunning
from ingest.message import Message
from ingest.producer import Sink


class InMemoryProducer:
    """A producer fed by `await producer.push(messages)`, which waits while the
    processors' buffers are full (backpressure, nothing queued without bound), while the
    producer is paused, and while the pipeline's circuit breaker lets no more in (open, or
    half-open once its probes are in); it raises `BufferClosed` if the pipeline drains or
    restarts meanwhile, those messages not taken."""

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._draining = False
        self._flowing = asyncio.Event()  # cleared while paused
        self._flowing.set()

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._draining = False

    async def push(self, messages: Sequence[Message]) -> None:
        if self._sink is None or self._draining:
            state = "draining" if self._draining else "not started"
            raise ProducerNotRunning(f"cannot push: the pipeline is {state}")
        await self._flowing.wait()
        if self._sink is None or self._draining:
            raise ProducerNotRunning("cannot push: the pipeline stopped while paused")
        await self._sink.push(messages)

    async def pause(self) -> None:
        self._flowing.clear()

    async def resume(self) -> None:
        self._flowing.set()

    async def drain(self) -> None:
        self._draining = True
        self._flowing.set()  # a push waiting while paused ends, refused

    async def close(self) -> None:
        self._sink = None
