"""Supervision as the service shows it: a stage crash turns /readyz red at once, the
pipeline restarts and nothing is lost (the broker redelivers what the crashed generation
held); a pipeline past its restart limit stops the service, the others drained."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiormq
import pytest

from ingest import Batcher, Handlers, InMemoryProducer, Message, Pipeline, Processors
from ingest.exceptions import PipelineFailed
from ingest.rabbitmq import RabbitMQOptions, RabbitMQProducer
from ingest.service.hosting import HostedPipeline, serve
from ingest.service.settings import Settings
from ingest.testing import push_messages
from tests.integration.service import RunningService, metric
from tests.support import Broker, eventually, free_port, queue_depth


class Crash(BaseException):
    """Escapes every hook's `except Exception`: the stage running it crashes."""


class IdempotentSink(Handlers):
    """Records message ids in a set (a redelivery writes nothing twice) and crashes its
    batch processor the first time it sees the message "crash"."""

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.writes = 0
        self.crashed_at: float | None = None

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.put_batcher("store")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        if self.crashed_at is None and any(m.data == b"crash" for m in messages):
            self.crashed_at = time.monotonic()
            raise Crash("a bug in the batch stage")
        self.writes += len(messages)
        self.stored.update(m.metadata["message_id"] for m in messages)
        return messages


async def serve_in_task(hosted: dict[str, HostedPipeline]) -> RunningService:
    settings = Settings(http_host="127.0.0.1", http_port=free_port())
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, hosted, stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    return RunningService(settings, hosted, stop, task)


async def test_a_stage_crash_turns_readyz_red_restarts_and_loses_nothing(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    handlers = IdempotentSink()
    producer = RabbitMQProducer(
        RabbitMQOptions(queue=queue_name, url=broker.amqp_url, prefetch_count=200)
    )
    pipeline = Pipeline(
        "it",
        handlers,
        producer,
        processors=Processors(concurrency=2),
        batchers={"store": Batcher(batch_size=20, batch_timeout=0.2)},
    )
    running = await serve_in_task({"it": HostedPipeline.of(pipeline, queue_name)})
    try:
        await producer.wait_ready(20)
        assert (await running.get_async("/readyz"))[0] == 200
        ids = [f"m{i}" for i in range(500)]
        for message_id in ids:
            body = b"crash" if message_id == "m250" else message_id.encode()
            await amqp.basic_publish(
                body,
                routing_key=queue_name,
                properties=aiormq.spec.Basic.Properties(message_id=message_id),
            )
        # /readyz says so within a second of the crash, naming the pipeline and the error.
        red: tuple[float, dict[str, Any]] | None = None
        deadline = time.monotonic() + 20
        while red is None and time.monotonic() < deadline:
            status, body = await running.get_async("/readyz")
            if status == 503:
                red = (time.monotonic(), json.loads(body))
            await asyncio.sleep(0.05)
        assert red is not None, "readyz never went red"
        assert handlers.crashed_at is not None
        assert red[0] - handlers.crashed_at < 1.0
        assert red[1]["ready"] == {"it": False}
        reason = red[1]["not_ready"]["it"]
        assert reason.startswith("restarting: pipeline 'it': stage batch_processor_store_0")
        assert "Crash('a bug in the batch stage')" in reason

        async def all_stored() -> bool:
            return handlers.stored == set(ids) and await queue_depth(amqp, queue_name) == 0

        await eventually(all_stored, timeout=30)
        assert (await running.get_async("/readyz"))[0] == 200
        _, text = await running.get_async("/metrics")
        assert metric(text, "ingest_pipeline_restarts_total", pipeline="it") == 1
        assert metric(text, "ingest_pipeline_state", pipeline="it", state="running") == 1
        # What the crashed generation held came back: some stored twice (idempotently).
        assert handlers.writes >= len(ids)
    finally:
        running.stop.set()
        await asyncio.wait_for(running.task, 30)


class AlwaysCrashes(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        raise Crash("every time")


class Counts(Handlers):
    def __init__(self) -> None:
        self.handled = 0

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.handled += 1
        return message


async def test_a_pipeline_past_its_restart_limit_stops_the_service_with_an_error() -> None:
    crashing = Pipeline("crashing", AlwaysCrashes(), InMemoryProducer(), max_restarts=1)
    healthy_handlers = Counts()
    healthy = Pipeline("healthy", healthy_handlers, InMemoryProducer())
    running = await serve_in_task(
        {
            "crashing": HostedPipeline.of(crashing, None),
            "healthy": HostedPipeline.of(healthy, None),
        }
    )
    pending = await push_messages(healthy, range(10))
    for _ in range(2):
        await eventually(_state_is(crashing, "running"), timeout=5)
        await push_messages(crashing, ["boom"])
        await eventually(_state_is(crashing, "restarting", "failed"), timeout=5)
    with pytest.raises(PipelineFailed, match="'crashing' crashed 2 times"):
        await asyncio.wait_for(running.task, 20)
    await pending.wait()  # the healthy pipeline was drained, not dropped
    assert healthy.state == "stopped"
    assert crashing.state == "failed"


def _state_is(pipeline: Pipeline, *states: str) -> Any:
    async def check() -> bool:
        return pipeline.state in states

    return check
