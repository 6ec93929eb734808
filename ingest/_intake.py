"""The intake: the sink producers push into, routing to the processors' inboxes, and letting
in only what the pipeline's circuit breaker admits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ingest._buffer import Buffer
from ingest._circuit import Circuit
from ingest._runtime import Runtime
from ingest.exceptions import BufferClosed
from ingest.message import Message, fail_with_exception
from ingest.waiting import first_of

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class Intake:
    """The sink producers push into: counts what arrives and routes it to the processors,
    by partition when the pipeline has `partition_by`. Producer tasks are spawned through
    it, so that the pipeline's supervisor owns them.

    With a circuit breaker, only what it admits gets in (none while open, its probes while
    half-open): `push_nowait` takes nothing more, `push` waits for the rest, and the
    messages wait unsettled in their producer. The supervisor ends the intake with its
    generation, and a push still waiting then raises `BufferClosed`.
    """

    def __init__(
        self, rt: Runtime, inboxes: list[Buffer[Message]], concurrency: int, spawn: Spawn
    ) -> None:
        self._rt = rt
        self._inboxes = inboxes
        self._concurrency = concurrency
        self._spawn = spawn
        self._circuit = rt.circuit
        self._ended = asyncio.Event()

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self._spawn(coroutine, name)

    def end(self) -> None:
        """The generation ended: pushes waiting for the circuit breaker raise BufferClosed."""
        self._ended.set()

    async def push(self, messages: Sequence[Message]) -> None:
        circuit = self._circuit
        if circuit is None:
            await self._put(messages)
            return
        start, total = 0, len(messages)
        while start < total:
            room = circuit.room()
            if room == 0:
                await self._wait_for_room(circuit)
                continue
            end = total if room is None else min(total, start + room)
            circuit.admit(end - start)
            await self._put(messages if end - start == total else messages[start:end])
            start = end

    def push_nowait(self, messages: Sequence[Message]) -> bool:
        rt = self._rt
        circuit = self._circuit
        if circuit is not None:
            room = circuit.room()
            if room is not None and room < len(messages):
                return False
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
            if circuit is not None:
                circuit.admit(len(messages))
        return taken

    async def _put(self, messages: Sequence[Message]) -> None:
        rt = self._rt
        rt.received += len(messages)
        if rt.partition_by is None:
            await self._inboxes[0].put_many(messages)
            return
        for slot, group in self._by_slot(messages).items():
            await self._inboxes[slot].put_many(group)

    async def _wait_for_room(self, circuit: Circuit) -> None:
        """Wait for the circuit breaker to change state; BufferClosed once the pipeline
        drains or its generation ended (the messages stay unsettled: the producer's
        `close()` hands them back)."""
        changed = circuit.changed()
        if self._ended.is_set() or self._inboxes[0].closed:
            raise BufferClosed(
                "the pipeline is draining or restarting while its circuit breaker lets nothing in"
            )
        await first_of(changed.wait(), self._ended.wait())

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
