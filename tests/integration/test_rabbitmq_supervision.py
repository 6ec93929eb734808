"""The RabbitMQ producer under the pipeline's supervisor: a bug fails the pipeline instead
of reconnecting forever, what the broker refuses is retried and said, and a restarted
pipeline consumes again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import pytest
from structlog.testing import capture_logs

from ingest import Handlers, Message, Pipeline
from ingest.exceptions import PipelineFailed, StageCrashed
from ingest.rabbitmq import Backoff, Binding, RabbitMQOptions, RabbitMQProducer

from .conftest import Broker, eventually, publish, queue_depth

FAST_BACKOFF = Backoff("exp", min=0.05, max=0.1)


class Crash(BaseException):
    """Escapes the processor stage, as a bug in the engine would."""


class Record(Handlers):
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


MakePipeline = Callable[..., Pipeline]


@pytest.fixture
async def make_pipeline(broker: Broker, queue_name: str) -> AsyncIterator[MakePipeline]:
    """Build (not start) a pipeline consuming `queue_name`; always stopped after."""
    built: list[Pipeline] = []

    def make(handlers: Handlers, max_restarts: int = 3, **options: Any) -> Pipeline:
        options = {"queue": queue_name, "url": broker.amqp_url, "backoff": FAST_BACKOFF, **options}
        producer = RabbitMQProducer(RabbitMQOptions(**options))
        pipeline = Pipeline("it", handlers, producer, max_restarts=max_restarts, max_seconds=60)
        built.append(pipeline)
        return pipeline

    yield make
    for pipeline in built:
        await pipeline.stop()


async def test_a_bug_in_after_connect_fails_the_pipeline_instead_of_reconnecting(
    make_pipeline: MakePipeline,
) -> None:
    calls = 0

    async def after_connect(channel: aiormq.abc.AbstractChannel) -> None:
        nonlocal calls
        calls += 1
        raise TypeError("a bug in the hook")

    pipeline = make_pipeline(Record(), max_restarts=1, after_connect=after_connect)
    producer = pipeline.producer
    assert isinstance(producer, RabbitMQProducer)
    await pipeline.start()
    await asyncio.wait_for(pipeline.wait(), timeout=15)
    assert pipeline.state == "failed"
    assert isinstance(pipeline.failure, PipelineFailed)
    crash = pipeline.failure.__cause__
    assert isinstance(crash, StageCrashed)
    assert isinstance(crash.error, TypeError)
    # Once per generation (the first and its one restart): never a reconnect on a bug.
    assert calls == 2
    assert producer.stats.reconnects == 0


async def test_a_binding_to_a_missing_exchange_is_retried_and_logged_as_an_error(
    make_pipeline: MakePipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    exchange = f"{queue_name}-exchange"
    with capture_logs() as logs:
        pipeline = make_pipeline(Record(), bindings=(Binding(exchange, routing_key="#"),))
        producer = pipeline.producer
        assert isinstance(producer, RabbitMQProducer)
        await pipeline.start()

        async def retried() -> bool:
            return producer.stats.reconnects >= 2

        await eventually(retried)
    assert pipeline.state == "running"
    assert not producer.ready
    refusals = [log for log in logs if log["event"].startswith("the broker refused")]
    assert refusals
    assert all(log["log_level"] == "error" for log in refusals)
    assert "NOT_FOUND" in refusals[0]["error"]
    # An operator creates the exchange: the next attempt consumes.
    await amqp.exchange_declare(exchange, exchange_type="topic", auto_delete=True)
    await producer.wait_ready(timeout=10)
    await amqp.basic_publish(b"routed", exchange=exchange, routing_key="bookings")

    async def handled() -> bool:
        return bool(pipeline.handlers.bodies == [b"routed"])  # type: ignore[attr-defined]

    await eventually(handled)


async def test_a_restarted_pipeline_consumes_again_and_loses_nothing(
    make_pipeline: MakePipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Record()
    pipeline = make_pipeline(handlers)
    producer = pipeline.producer
    assert isinstance(producer, RabbitMQProducer)
    await pipeline.start()
    await producer.wait_ready(timeout=10)
    await publish(amqp, queue_name, b"before", b"crash", b"after")

    async def all_handled() -> bool:
        return {b"before", b"crash", b"after"} <= set(handlers.bodies)

    await eventually(all_handled, timeout=15)
    assert pipeline.crashes == 1
    assert pipeline.state == "running"
    assert producer.ready
    # The restarted producer is a live one: it still reconnects when the broker cancels it.
    await amqp.queue_delete(queue_name)

    async def consuming_again() -> bool:
        return producer.stats.connection_losses == 1 and producer.ready

    await eventually(consuming_again)
    await publish(amqp, queue_name, b"later")

    async def later_handled() -> bool:
        return b"later" in handlers.bodies

    await eventually(later_handled)
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0
