"""Testing helpers: push messages through a running pipeline and await their
acknowledgement (Broadway's `test_message` / `test_batch`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ingest.acknowledger import validate_ack_options
from ingest.message import BatchMode, Message
from ingest.pipeline import Pipeline
from ingest.producers.memory import InMemoryProducer

__all__ = ["AckResult", "CollectingAcknowledger", "push_messages", "send_batch", "send_message"]


@dataclass
class AckResult:
    """What the pipeline acknowledged: the messages, and each `ack` call as it came."""

    successful: list[Message] = field(default_factory=list)
    failed: list[Message] = field(default_factory=list)
    calls: list[tuple[list[Message], list[Message]]] = field(default_factory=list)

    @property
    def successful_data(self) -> list[Any]:
        return [message.data for message in self.successful]

    @property
    def failed_reasons(self) -> list[str | None]:
        return [message.failure_reason for message in self.failed]


class CollectingAcknowledger:
    """An acknowledger that records every ack and tells when `expected` messages were
    settled. `configure_ack` options are validated and kept in the message's `ack_data`."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.result = AckResult()
        self._settled = asyncio.get_running_loop().create_future()
        if expected == 0:
            self._settled.set_result(None)

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.result.calls.append((list(successful), list(failed)))
        self.result.successful.extend(successful)
        self.result.failed.extend(failed)
        settled = len(self.result.successful) + len(self.result.failed)
        if settled >= self.expected and not self._settled.done():
            self._settled.set_result(None)

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        return {**(ack_data or {}), **validate_ack_options(options)}

    async def wait(self, timeout: float = 5.0) -> AckResult:
        """Wait until every expected message was acknowledged."""
        try:
            await asyncio.wait_for(asyncio.shield(self._settled), timeout)
        except TimeoutError:
            settled = len(self.result.successful) + len(self.result.failed)
            raise TimeoutError(
                f"{settled} of {self.expected} messages acknowledged after {timeout}s"
            ) from None
        return self.result


async def push_messages(
    pipeline: Pipeline,
    data: Iterable[Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    batch_mode: BatchMode = "bulk",
) -> CollectingAcknowledger:
    """Push one message per item of `data`; await `.wait()` on the result for the acks."""
    producer = pipeline.producer
    if not isinstance(producer, InMemoryProducer):
        raise TypeError(
            f"pipeline {pipeline.name!r} must use an InMemoryProducer to be tested this way"
        )
    items = list(data)
    acknowledger = CollectingAcknowledger(len(items))
    messages = [
        Message(
            item,
            acknowledger,
            metadata=dict(metadata or {}),
            batch_mode=batch_mode,
        )
        for item in items
    ]
    await producer.push(messages)
    return acknowledger


async def send_message(
    pipeline: Pipeline,
    data: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    batch_mode: BatchMode = "flush",
    timeout: float = 5.0,
) -> AckResult:
    """Send one message and return once it is acknowledged. Its batch is flushed at once
    unless `batch_mode="bulk"`."""
    pending = await push_messages(pipeline, [data], metadata=metadata, batch_mode=batch_mode)
    return await pending.wait(timeout)


async def send_batch(
    pipeline: Pipeline,
    data: Iterable[Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    batch_mode: BatchMode = "bulk",
    timeout: float = 5.0,
) -> AckResult:
    """Send several messages at once and return once all are acknowledged."""
    pending = await push_messages(pipeline, data, metadata=metadata, batch_mode=batch_mode)
    return await pending.wait(timeout)
