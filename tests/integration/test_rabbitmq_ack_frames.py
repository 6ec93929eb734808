"""How acks go to the broker: one multiple-ack frame for a run of delivery tags, a frame
of its own only for a message done long before an older one, or when half the prefetch
waits. The first message published goes to a batch that stays open; the others, later
tags, are done at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import pytest

from ingest import Batcher, BatchInfo, Handlers, Message, Pipeline
from ingest.rabbitmq import ProducerStats, RabbitMQProducer
from ingest.rabbitmq.acknowledger import ChannelAcknowledger

from .conftest import MakeRabbitPipeline, eventually, publish, queue_depth


class OldFirst(Handlers):
    """b"old" waits in the "slow" batcher's open batch; everything else is a batch of one."""

    def __init__(self) -> None:
        self.redelivered = 0

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.redelivered += bool(message.metadata["redelivered"])
        return message.put_batcher("slow" if message.data == b"old" else "fast")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        return messages


class Run:
    """A pipeline of `OldFirst`, given b"old" and then newer messages; its producer's
    counters in `stats`."""

    def __init__(
        self,
        pipeline: Pipeline,
        producer: RabbitMQProducer,
        handlers: OldFirst,
        amqp: aiormq.abc.AbstractChannel,
        queue: str,
    ) -> None:
        self.pipeline, self.handlers, self.amqp, self.queue = pipeline, handlers, amqp, queue
        self.stats = producer.stats

    async def until(self, reached: Callable[[ProducerStats], bool]) -> None:
        async def check() -> bool:
            return reached(self.stats)

        await eventually(check)

    async def stop_with_nothing_left(self) -> None:
        """Stopped (the drain flushes the open batch and sends every pending ack), the
        queue is empty, and no ack was refused: the broker would have closed the channel
        and redelivered."""
        await self.pipeline.stop()
        assert await queue_depth(self.amqp, self.queue) == 0
        assert (self.stats.connection_losses, self.handlers.redelivered) == (0, 0)


StartRun = Callable[..., Awaitable[Run]]


@pytest.fixture
def old_first(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> StartRun:
    """`await old_first(hold=, slow_timeout=, newer=, **producer_options)`: acks held up
    to `hold` seconds, the "slow" batch closing after `slow_timeout`, b"old" published
    and then `newer` other messages."""

    async def start(*, hold: float, slow_timeout: float, newer: int, **options: Any) -> Run:
        monkeypatch.setattr(ChannelAcknowledger, "ACK_HOLD", hold)
        batchers = {
            "slow": Batcher(batch_size=10, batch_timeout=slow_timeout),
            "fast": Batcher(batch_size=1),
        }
        handlers = OldFirst()
        pipeline, producer = await make_rabbit_pipeline(handlers, {"batchers": batchers}, **options)
        await publish(amqp, queue_name, b"old", *(b"new%d" % i for i in range(newer)))
        return Run(pipeline, producer, handlers, amqp, queue_name)

    return start


async def test_acks_wait_for_an_older_message_and_go_in_one_frame(old_first: StartRun) -> None:
    run = await old_first(hold=60, slow_timeout=0.3, newer=20)
    await run.until(lambda stats: stats.ack == 21 and stats.multiple_ack_frames >= 1)
    assert run.stats.single_ack_frames == 0
    await run.stop_with_nothing_left()


async def test_an_ack_held_past_ack_hold_goes_alone(old_first: StartRun) -> None:
    run = await old_first(hold=0.05, slow_timeout=30, newer=20)
    await run.until(lambda stats: stats.single_ack_frames == 20)
    assert run.stats.ack == 20  # "old" is still in its open batch
    await run.stop_with_nothing_left()


async def test_half_the_prefetch_waiting_sends_every_pending_ack(old_first: StartRun) -> None:
    run = await old_first(hold=60, slow_timeout=30, newer=30, prefetch_count=40)
    await run.until(lambda stats: stats.ack == 30)
    # The 20th pending ack reached half the prefetch: those 20 went, one frame each; the
    # other 10 wait for "old" (held up to ACK_HOLD, a minute here).
    assert (run.stats.single_ack_frames, run.stats.multiple_ack_frames) == (20, 0)
    await run.stop_with_nothing_left()
