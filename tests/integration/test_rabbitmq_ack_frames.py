"""How acks go to the broker: one multiple-ack frame for a run of delivery tags, a frame
of its own only for a message done long before an older one, or when half the prefetch
waits. The first message published goes to a batch that stays open; the others, later
tags, are done at once."""

from __future__ import annotations

from typing import Any

import aiormq
import pytest

from ingest import Batcher, BatchInfo, Handlers, Message, Pipeline
from ingest.rabbitmq import RabbitMQProducer
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
    """A pipeline of `OldFirst` given b"old" and then `newer` other messages, with acks
    held up to `hold` seconds and the "slow" batch closing after `slow_timeout`."""

    def __init__(self, pipeline: Pipeline, producer: RabbitMQProducer, handlers: OldFirst):
        self.pipeline, self.producer, self.handlers = pipeline, producer, handlers
        self.stats = producer.stats

    @classmethod
    async def start(
        cls,
        make: MakeRabbitPipeline,
        amqp: aiormq.abc.AbstractChannel,
        queue: str,
        monkeypatch: pytest.MonkeyPatch,
        *,
        hold: float,
        slow_timeout: float,
        newer: int,
        **options: Any,
    ) -> Run:
        monkeypatch.setattr(ChannelAcknowledger, "ACK_HOLD", hold)
        batchers = {
            "slow": Batcher(batch_size=10, batch_timeout=slow_timeout),
            "fast": Batcher(batch_size=1),
        }
        handlers = OldFirst()
        pipeline, producer = await make(handlers, {"batchers": batchers}, **options)
        await publish(amqp, queue, b"old", *(b"new%d" % i for i in range(newer)))
        return cls(pipeline, producer, handlers)

    async def stop_with_nothing_left(self, amqp: aiormq.abc.AbstractChannel, queue: str) -> None:
        """Stopped (the drain flushes the open batch and sends every pending ack), the
        queue is empty, and no ack was refused: the broker would have closed the channel
        and redelivered."""
        await self.pipeline.stop()
        assert await queue_depth(amqp, queue) == 0
        assert (self.stats.connection_losses, self.handlers.redelivered) == (0, 0)


async def test_acks_wait_for_an_older_message_and_go_in_one_frame(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = await Run.start(
        make_rabbit_pipeline, amqp, queue_name, monkeypatch, hold=60, slow_timeout=0.3, newer=20
    )

    async def all_acked() -> bool:
        return run.stats.ack == 21 and run.stats.multiple_ack_frames >= 1

    await eventually(all_acked)
    assert run.stats.single_ack_frames == 0
    await run.stop_with_nothing_left(amqp, queue_name)


async def test_an_ack_held_past_ack_hold_goes_alone(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = await Run.start(
        make_rabbit_pipeline, amqp, queue_name, monkeypatch, hold=0.05, slow_timeout=30, newer=20
    )

    async def newer_ones_acked() -> bool:
        return run.stats.single_ack_frames == 20

    await eventually(newer_ones_acked)
    assert run.stats.ack == 20  # "old" is still in its open batch
    await run.stop_with_nothing_left(amqp, queue_name)


async def test_half_the_prefetch_waiting_sends_every_pending_ack(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = await Run.start(
        make_rabbit_pipeline,
        amqp,
        queue_name,
        monkeypatch,
        hold=60,
        slow_timeout=30,
        newer=30,
        prefetch_count=40,
    )

    async def thirty_acked() -> bool:
        return run.stats.ack == 30

    await eventually(thirty_acked)
    # The 20th pending ack reached half the prefetch: those 20 went, one frame each; the
    # other 10 wait for "old" (held up to ACK_HOLD, a minute here).
    assert (run.stats.single_ack_frames, run.stats.multiple_ack_frames) == (20, 0)
    await run.stop_with_nothing_left(amqp, queue_name)
