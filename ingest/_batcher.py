"""The batcher stage: one open batch per (partition, batch_key), closed on size, timeout
or flush and handed to the batch processors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ingest._buffer import Buffer
from ingest._runtime import Batch, Runtime
from ingest.batch_info import BatchTrigger
from ingest.message import Message, fail_with_exception
from ingest.options import Batcher, CustomBatchSize

# How many messages the batcher moves from its inbox per wake-up.
_TAKE = 1_000


@dataclass(eq=False, slots=True)
class _OpenBatch:
    messages: list[Message]
    deadline: float
    acc: Any


class BatcherStage:
    """Accumulates the messages routed to one batcher.

    Open batches live in a dict in creation order; as every batch of a batcher has the
    same timeout, the first one always has the nearest deadline, so expiring is a walk
    from the front and no timer per batch is needed. When the open batches of all batchers
    hold the runtime's `hold_limit` (most of a broker's prefetch), the oldest is closed
    early, with trigger `flush`: dynamic batch keys can never stall the pipeline.
    """

    def __init__(
        self,
        rt: Runtime,
        name: str,
        options: Batcher,
        inbox: Buffer[Message],
        outboxes: list[Buffer[Batch]],
    ) -> None:
        self.rt = rt
        self.name = name
        self.stage = f"batcher_{name}"
        self.options = options
        self.inbox = inbox
        self.outboxes = outboxes
        self._open: dict[tuple[int | None, Any], _OpenBatch] = {}

    def summary(self, busiest: int = 5) -> dict[str, Any]:
        """The open batches now: how many, their messages, the age in seconds of the
        oldest, and the `busiest` batch keys with their sizes (for the live view)."""
        batches = self._open
        oldest_s = None
        if batches:  # the first is the oldest: its deadline is its start plus the timeout
            first = next(iter(batches.values()))
            started = first.deadline - self.options.batch_timeout
            oldest_s = round(max(0.0, asyncio.get_running_loop().time() - started), 3)
        largest = sorted(batches.items(), key=lambda item: len(item[1].messages), reverse=True)
        return {
            "batches": len(batches),
            "messages": sum(len(batch.messages) for batch in batches.values()),
            "oldest_s": oldest_s,
            "busiest": [[str(key[1])[:80], len(b.messages)] for key, b in largest[:busiest]],
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox = self.inbox
        while True:
            deadline = next(iter(self._open.values())).deadline if self._open else None
            messages = await inbox.take(_TAKE, deadline)
            if messages:
                await self._add(messages, loop.time())
            elif inbox.closed and not len(inbox):
                break
            await self._expire(loop.time())
        for key in list(self._open):
            await self._close(key, "flush")
        for outbox in self.outboxes:
            outbox.close()

    async def _add(self, messages: list[Message], now: float) -> None:
        rt = self.rt
        open_batches = self._open
        size = self.options.batch_size
        partition_by = rt.partition_by
        slots = self.options.concurrency
        for message in messages:
            partition = None
            if partition_by is not None:
                try:
                    partition = partition_by(message) % slots
                except Exception as exc:
                    fail_with_exception(message, exc, "partition_by")
                    await rt.settle(self.stage, "batcher", [], [message])
                    continue
            key = (partition, message.batch_key)
            batch = open_batches.get(key)
            if batch is None:
                initial = size.initial if isinstance(size, CustomBatchSize) else None
                batch = open_batches[key] = _OpenBatch(
                    [], now + self.options.batch_timeout, initial
                )
            batch.messages.append(message)
            rt.held += 1
            if isinstance(size, CustomBatchSize):
                try:
                    full, batch.acc = size.step(message, batch.acc)
                except Exception as exc:
                    batch.messages.pop()
                    rt.held -= 1
                    if not batch.messages:
                        del open_batches[key]
                    fail_with_exception(message, exc, "batch_size")
                    await rt.settle(self.stage, "batcher", [], [message])
                    continue
            else:
                full = len(batch.messages) >= size
            if full:
                await self._close(key, "size")
            elif message.batch_mode == "flush":
                await self._close(key, "flush")
            elif rt.hold_limit is not None and rt.held >= rt.hold_limit:
                # Open batches hold most of what the producer may leave unacknowledged (a
                # broker's prefetch): no more would come, and batches that cannot fill
                # would wait for their timeout. The oldest goes now instead.
                await self._close(next(iter(open_batches)), "flush")

    async def _expire(self, now: float) -> None:
        open_batches = self._open
        while open_batches:
            key, batch = next(iter(open_batches.items()))
            if batch.deadline > now:
                return
            await self._close(key, "timeout")

    async def _close(self, key: tuple[int | None, Any], trigger: BatchTrigger) -> None:
        batch = self._open.pop(key)
        self.rt.held -= len(batch.messages)
        partition, batch_key = key
        outbox = self.outboxes[partition or 0]
        await outbox.put(Batch(batch.messages, self.name, batch_key, partition, trigger))
