"""Graceful shutdown: drain everything in flight, incomplete batches included, within the
shutdown timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ingest import Batcher, Handlers, InMemoryProducer, Message, Pipeline, Processors, waiting
from ingest.producers.memory import ProducerNotRunning
from ingest.testing import push_messages

from .conftest import MakePipeline


class SlowBatches(Handlers):
    def __init__(self, message_delay: float = 0.0, batch_delay: float = 0.0) -> None:
        self.message_delay = message_delay
        self.batch_delay = batch_delay
        self.batches: list[tuple[str, list[Any]]] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await asyncio.sleep(self.message_delay)
        return message

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.batch_delay)
        self.batches.append((batch_info.trigger, [m.data for m in messages]))
        return messages


async def test_stop_waits_for_every_in_flight_message_and_flushes_incomplete_batches(
    make_pipeline: MakePipeline,
) -> None:
    handlers = SlowBatches(message_delay=0.01, batch_delay=0.05)
    pipeline = await make_pipeline(
        handlers,
        processors=Processors(concurrency=2, max_demand=5),
        batchers={"default": Batcher(batch_size=7, batch_timeout=60)},
    )
    pending = await push_messages(pipeline, range(20))
    await pipeline.stop()
    result = await pending.wait(timeout=0)
    assert sorted(result.successful_data) == list(range(20))
    assert [trigger for trigger, _ in handlers.batches] == ["size", "size", "flush"]
    assert pipeline.in_flight == 0


async def test_stop_respects_its_timeout_and_leaves_the_rest_unacknowledged(
    make_pipeline: MakePipeline,
) -> None:
    class Hangs(SlowBatches):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            if message.data == "hang":
                await asyncio.Event().wait()
            return message

    pipeline = await make_pipeline(Hangs(), shutdown_timeout=0.2)
    done = await push_messages(pipeline, ["quick"])
    await done.wait()
    hanging = await push_messages(pipeline, ["hang"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pipeline.stop()
    assert loop.time() - started < 2  # the deadline, not the handler, ended the drain
    assert hanging.result.successful == []
    assert hanging.result.failed == []
    assert pipeline.in_flight == 1
    assert pipeline.state == "stopped"


async def test_a_drained_producer_refuses_new_messages(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(SlowBatches())
    await pipeline.stop()
    with pytest.raises(ProducerNotRunning, match="draining"):
        await push_messages(pipeline, [1])


class RecordingProducer(InMemoryProducer):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def drain(self) -> None:
        self.calls.append("drain")
        await super().drain()

    async def close(self) -> None:
        self.calls.append("close")
        await super().close()


async def test_the_producer_is_drained_first_and_closed_last() -> None:
    producer = RecordingProducer()
    handlers = SlowBatches(batch_delay=0.05)
    pipeline = Pipeline("test", handlers, producer, batchers={"default": Batcher(batch_size=10)})
    async with pipeline:
        pending = await push_messages(pipeline, [1, 2])
    assert producer.calls == ["drain", "close"]
    assert (await pending.wait(0)).successful_data == [1, 2]


class HangingClose(InMemoryProducer):
    async def close(self) -> None:
        await asyncio.Event().wait()  # a broker that never answers


async def test_a_producer_close_that_hangs_is_given_up_after_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(waiting, "CLOSE_TIMEOUT_S", 0.1)
    pipeline = Pipeline("test", SlowBatches(), HangingClose())
    await pipeline.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(pipeline.stop(), 5)
    assert loop.time() - started < 2
    assert pipeline.state == "stopped"


async def test_stop_is_idempotent_and_concurrent_calls_wait_for_the_same_drain(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(SlowBatches(batch_delay=0.1), batchers={"default": Batcher()})
    pending = await push_messages(pipeline, [1])
    await asyncio.gather(pipeline.stop(), pipeline.stop())
    await pipeline.stop()
    assert (await pending.wait(0)).successful_data == [1]


async def test_a_pipeline_starts_once(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(SlowBatches())
    with pytest.raises(RuntimeError, match="a pipeline starts once"):
        await pipeline.start()


async def test_a_closing_step_that_raises_is_logged_and_the_shutdown_goes_on() -> None:
    async def broken() -> None:
        raise ConnectionError("already gone")

    with capture_logs() as logs:
        await waiting.close_within(broken(), structlog.get_logger("test"), "database close")
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("database close raised", "error")
    ]
