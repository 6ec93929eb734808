"""Fixtures of the integration tests: pipelines on the real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ingest import Handlers, Pipeline
from ingest.rabbitmq import RabbitMQOptions, RabbitMQProducer
from tests.support import (
    Broker,
    drain_queue,
    eventually,
    free_port,
    publish,
    queue_depth,
)

__all__ = ["Broker", "drain_queue", "eventually", "free_port", "publish", "queue_depth"]


MakeRabbitPipeline = Callable[..., Awaitable[tuple[Pipeline, RabbitMQProducer]]]


@pytest.fixture
async def make_rabbit_pipeline(
    broker: Broker, queue_name: str
) -> AsyncIterator[MakeRabbitPipeline]:
    """Build, start and wait for a pipeline consuming `queue_name`; always stopped after."""
    started: list[Pipeline] = []

    async def make(
        handlers: Handlers, pipeline_options: dict[str, Any] | None = None, **options: Any
    ) -> tuple[Pipeline, RabbitMQProducer]:
        options.setdefault("queue", queue_name)
        options.setdefault("url", broker.amqp_url)
        producer = RabbitMQProducer(RabbitMQOptions(**options))
        pipeline_options = {"shutdown_timeout": 10.0, **(pipeline_options or {})}
        pipeline = Pipeline("it", handlers, producer, **pipeline_options)
        await pipeline.start()
        started.append(pipeline)
        await producer.wait_ready(timeout=10)
        return pipeline, producer

    yield make
    for pipeline in started:
        await pipeline.stop()
