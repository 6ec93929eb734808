"""`RabbitMQProducer.wait_ready()` follows the producer's consumers as they are now: a
pipeline restarting after a crash gets new consumers, and a wait begun before they exist
(before the start, or between the crash and the restart) ends once they consume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import pytest

from ingest import Handlers, Message, Pipeline
from ingest.rabbitmq import RabbitMQOptions, RabbitMQProducer

from .conftest import Broker, eventually, publish


class Crash(BaseException):
    """Escapes the processor stage, as a bug in the engine would."""


class CrashOnce(Handlers):
    """Records what it handled; crashes its stage on the first b"crash"."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.crashed = False

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == b"crash" and not self.crashed:
            self.crashed = True
            raise Crash("stage crash")
        self.bodies.append(message.data)
        return message


MakePipeline = Callable[[Handlers], tuple[Pipeline, RabbitMQProducer]]


@pytest.fixture
async def make_pipeline(broker: Broker, queue_name: str) -> AsyncIterator[MakePipeline]:
    """Build (not start) a pipeline consuming `queue_name`; always stopped after."""
    built: list[Pipeline] = []

    def make(handlers: Handlers) -> tuple[Pipeline, RabbitMQProducer]:
        producer = RabbitMQProducer(RabbitMQOptions(queue=queue_name, url=broker.amqp_url))
        pipeline = Pipeline("it", handlers, producer, max_seconds=60, shutdown_timeout=10)
        built.append(pipeline)
        return pipeline, producer

    yield make
    for pipeline in built:
        await pipeline.stop()


async def test_wait_ready_during_a_restart_waits_for_the_new_generation(
    make_pipeline: MakePipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = CrashOnce()
    pipeline, producer = make_pipeline(handlers)
    await pipeline.start()
    await producer.wait_ready(timeout=10)
    await publish(amqp, queue_name, b"crash")

    async def restarting() -> bool:
        return pipeline.state == "restarting"

    await eventually(restarting, timeout=10)
    assert producer.consumers_ready == [False]  # the crashed generation's, closed
    await producer.wait_ready(timeout=10)
    assert producer.ready
    assert pipeline.state == "running"
    assert pipeline.crashes == 1
    await publish(amqp, queue_name, b"after")

    async def handled() -> bool:
        return {b"crash", b"after"} <= set(handlers.bodies)

    await eventually(handled)


async def test_wait_ready_before_the_start_waits_for_the_consumers(
    make_pipeline: MakePipeline,
) -> None:
    pipeline, producer = make_pipeline(CrashOnce())
    waiting = asyncio.create_task(producer.wait_ready(timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # nothing consumes yet
    await pipeline.start()
    await waiting
    assert producer.ready


async def test_wait_ready_times_out_while_the_pipeline_is_paused(
    make_pipeline: MakePipeline,
) -> None:
    pipeline, producer = make_pipeline(CrashOnce())
    await pipeline.start()
    await producer.wait_ready(timeout=10)
    await pipeline.pause()
    with pytest.raises(TimeoutError):
        await producer.wait_ready(timeout=0.5)
    await pipeline.resume()
    await producer.wait_ready(timeout=10)
