"""partition_by keeps same-key messages in order through processors and batch processors."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from ingest import Batcher, BatchInfo, Handlers, Message, Processors
from ingest.testing import send_batch

from .conftest import MakePipeline


class RandomSleeps(Handlers):
    """Sleeps a random while in both stages, so only partitioning can keep the order."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.handled: dict[int, list[int]] = {}
        self.batched: dict[int, list[int]] = {}
        self.partitions: dict[int, set[int | None]] = {}

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await asyncio.sleep(self.rng.random() / 500)
        key, seq = message.data
        self.handled.setdefault(key, []).append(seq)
        return message.put_batch_key(key % 3)

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        await asyncio.sleep(self.rng.random() / 200)
        for message in messages:
            key, seq = message.data
            self.batched.setdefault(key, []).append(seq)
            self.partitions.setdefault(key, set()).add(batch_info.partition)
        return messages


async def test_partition_by_keeps_order_per_key_through_every_stage(
    make_pipeline: MakePipeline,
) -> None:
    handlers = RandomSleeps(seed=7)
    pipeline = await make_pipeline(
        handlers,
        processors=Processors(concurrency=4, max_demand=3),
        batchers={"default": Batcher(batch_size=4, batch_timeout=0.02, concurrency=3)},
        partition_by=lambda message: message.data[0],
    )
    data = [(key, seq) for seq in range(25) for key in range(8)]
    result = await send_batch(pipeline, data, timeout=20)
    assert len(result.successful) == len(data)
    expected = list(range(25))
    assert all(handlers.handled[key] == expected for key in range(8))
    assert all(handlers.batched[key] == expected for key in range(8))
    # One key, one batch processor: its batches all report the same partition.
    assert all(handlers.partitions[key] == {key % 3} for key in range(8))


async def test_without_partition_by_random_sleeps_do_reorder(make_pipeline: MakePipeline) -> None:
    """The control for the test above: the sleeps are enough to break the order."""
    handlers = RandomSleeps(seed=7)
    pipeline = await make_pipeline(
        handlers,
        processors=Processors(concurrency=4, max_demand=3),
        batchers={"default": Batcher(batch_size=4, batch_timeout=0.02, concurrency=3)},
    )
    data = [(key, seq) for seq in range(25) for key in range(8)]
    await send_batch(pipeline, data, timeout=20)
    assert any(handlers.batched[key] != list(range(25)) for key in range(8))


async def test_a_raising_partition_by_fails_the_message(make_pipeline: MakePipeline) -> None:
    class Plain(Handlers):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            return message

    pipeline = await make_pipeline(
        Plain(),
        processors=Processors(concurrency=2),
        partition_by=lambda message: 10 // message.data,
    )
    result = await send_batch(pipeline, [1, 0, 2])
    assert sorted(result.successful_data) == [1, 2]
    assert result.failed_reasons == [
        "partition_by raised ZeroDivisionError: integer division or modulo by zero"
    ]
