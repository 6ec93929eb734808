"""The intake: the sink producers push into, routing to the processors' inboxes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ingest._buffer import Buffer
from ingest._runtime import Runtime
from ingest.message import Message, fail_with_exception

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class Intake:
    """The sink producers push into: counts what arrives and routes it to the processors,
    by partition when the pipeline has `partition_by`. Producer tasks are spawned through
    it, so that the pipeline's supervisor owns them."""

    def __init__(
        self, rt: Runtime, inboxes: list[Buffer[Message]], concurrency: int, spawn: Spawn
    ) -> None:
        self._rt = rt
        self._inboxes = inboxes
        self._concurrency = concurrency
        self._spawn = spawn

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self._spawn(coroutine, name)

    async def push(self, messages: Sequence[Message]) -> None:
        rt = self._rt
        rt.received += len(messages)
        if rt.partition_by is None:
            await self._inboxes[0].put_many(messages)
            return
        for slot, group in self._by_slot(messages).items():
            await self._inboxes[slot].put_many(group)

    def push_nowait(self, messages: Sequence[Message]) -> bool:
        rt = self._rt
        if rt.partition_by is None:
            taken = self._inboxes[0].put_nowait(messages)
        else:
            groups = self._by_slot(messages)
            if any(
                len(self._inboxes[slot]) + len(group) > self._inboxes[slot].capacity
                for slot, group in groups.items()
            ):
                return False
            taken = all(self._inboxes[slot].put_nowait(group) for slot, group in groups.items())
        if taken:
            rt.received += len(messages)
        return taken

    def _by_slot(self, messages: Sequence[Message]) -> dict[int, list[Message]]:
        partition_by = self._rt.partition_by
        assert partition_by is not None
        slots: dict[int, list[Message]] = {}
        for message in messages:
            try:
                slot = partition_by(message) % self._concurrency
            except Exception as exc:
                # Still delivered (to the first processor), as failed: it skips handle_message.
                fail_with_exception(message, exc, "partition_by")
                slot = 0
            slots.setdefault(slot, []).append(message)
        return slots
