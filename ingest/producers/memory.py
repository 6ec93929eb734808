"""InMemoryProducer: messages pushed by code, for tests and benchmarks (Broadway's
DummyProducer)."""

from __future__ import annotations

from collections.abc import Sequence

from ingest.exceptions import ProducerNotRunning
from ingest.message import Message
from ingest.producer import Sink


class InMemoryProducer:
    """A producer fed by `await producer.push(messages)`, which waits while the
    processors' buffers are full (backpressure, nothing queued without bound)."""

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._draining = False

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        self._draining = False

    async def push(self, messages: Sequence[Message]) -> None:
        if self._sink is None or self._draining:
            state = "draining" if self._draining else "not started"
            raise ProducerNotRunning(f"cannot push: the pipeline is {state}")
        await self._sink.push(messages)

    async def drain(self) -> None:
        self._draining = True

    async def close(self) -> None:
        self._sink = None
