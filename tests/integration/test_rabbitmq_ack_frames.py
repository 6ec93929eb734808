"""How acks go to the broker: one multiple-ack frame for a run of delivery tags, a frame
of its own only for a message done long before an older one, or when half the prefetch
waits. The first message published goes to a batch that stays open; the others, later
tags, are done at once."""

from __future__ import annotations

from typing import Any

import aiormq
import pytest

from ingest import Batcher, BatchInfo, Handlers, Message
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


def batchers(slow_timeout: float) -> dict[str, Any]:
    return {
        "batchers": {
            "slow": Batcher(batch_size=10, batch_timeout=slow_timeout),
            "fast": Batcher(batch_size=1),
        }
    }


async def test_acks_wait_for_an_older_message_and_go_in_one_frame(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ChannelAcknowledger, "ACK_HOLD", 60.0)
    handlers = OldFirst()
    pipeline, producer = await make_rabbit_pipeline(handlers, batchers(slow_timeout=0.3))
    await publish(amqp, queue_name, b"old", *(b"new%d" % i for i in range(20)))

    async def all_acked() -> bool:
        stats = producer.stats
        return stats.ack == 21 and stats.multiple_ack_frames >= 1

    await eventually(all_acked)
    assert producer.stats.single_ack_frames == 0
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0
    assert (producer.stats.connection_losses, handlers.redelivered) == (0, 0)


async def test_an_ack_held_past_ack_hold_goes_alone(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ChannelAcknowledger, "ACK_HOLD", 0.05)
    handlers = OldFirst()
    pipeline, producer = await make_rabbit_pipeline(handlers, batchers(slow_timeout=30.0))
    await publish(amqp, queue_name, b"old", *(b"new%d" % i for i in range(20)))

    async def newer_ones_acked() -> bool:
        return producer.stats.single_ack_frames == 20

    await eventually(newer_ones_acked)
    assert producer.stats.ack == 20  # "old" is still in its open batch
    await pipeline.stop()  # the drain flushes that batch, and its ack goes
    assert await queue_depth(amqp, queue_name) == 0
    assert (producer.stats.connection_losses, handlers.redelivered) == (0, 0)


async def test_half_the_prefetch_waiting_sends_every_pending_ack(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ChannelAcknowledger, "ACK_HOLD", 60.0)
    handlers = OldFirst()
    pipeline, producer = await make_rabbit_pipeline(
        handlers, batchers(slow_timeout=30.0), prefetch_count=40
    )
    await publish(amqp, queue_name, b"old", *(b"new%d" % i for i in range(30)))

    async def thirty_acked() -> bool:
        return producer.stats.ack == 30

    await eventually(thirty_acked)
    # The 20th pending ack reached half the prefetch: those 20 went, one frame each; the
    # other 10 wait for "old" (held up to ACK_HOLD, a minute here).
    assert (producer.stats.single_ack_frames, producer.stats.multiple_ack_frames) == (20, 0)
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0
    assert (producer.stats.connection_losses, handlers.redelivered) == (0, 0)
