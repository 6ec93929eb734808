"""Acknowledgement: grouping per acknowledger, configure_ack, ack_immediately."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from ingest import Batcher, Handlers, Message, Processors
from ingest.acknowledger import validate_ack_options
from ingest.events import Event
from ingest.testing import CollectingAcknowledger, send_batch, send_message

from .conftest import MakePipeline


class PassThrough(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.failed("odd") if message.data % 2 else message


async def test_messages_are_acknowledged_in_one_call_per_acknowledger(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(PassThrough(), processors=Processors(max_demand=10))
    first = CollectingAcknowledger(4)
    second = CollectingAcknowledger(2)
    # One chunk holding messages of two acknowledgers, interleaved.
    messages = [Message(i, first if i < 4 else second) for i in (0, 1, 4, 2, 5, 3)]
    await pipeline.producer.push(messages)  # type: ignore[attr-defined]
    first_result = await first.wait()
    second_result = await second.wait()
    assert [([m.data for m in ok], [m.data for m in bad]) for ok, bad in first_result.calls] == [
        ([0, 2], [1, 3])
    ]
    assert [([m.data for m in ok], [m.data for m in bad]) for ok, bad in second_result.calls] == [
        ([4], [5])
    ]


class Immediate(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return await message.ack_immediately()

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


async def test_ack_immediately_acknowledges_once_and_not_again_after_the_batch(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Immediate(), batchers={"default": Batcher(batch_size=2)})
    result = await send_batch(pipeline, [1, 2])
    # Two calls from ack_immediately; the batch processor's ack goes to the no-op one.
    assert [len(ok) for ok, _ in result.calls] == [1, 1]
    assert pipeline.in_flight == 0


async def test_configure_ack_rejects_unknown_actions() -> None:
    with pytest.raises(ValueError, match="on_failure must be one of ack, reject"):
        validate_ack_options({"on_failure": "requeue_forever"})
    with pytest.raises(ValueError, match="unknown ack option 'on_timeout'"):
        validate_ack_options({"on_timeout": "ack"})


class BrokenAcknowledger:
    def __init__(self) -> None:
        self.calls = 0

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.calls += 1
        raise ConnectionError("channel closed")

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        return ack_data


async def test_an_acknowledger_that_raises_does_not_stop_the_pipeline(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(PassThrough())
    events: list[Event] = []
    pipeline.events.subscribe(events.append)
    broken = BrokenAcknowledger()
    await pipeline.producer.push([Message(0, broken)])  # type: ignore[attr-defined]
    result = await send_message(pipeline, 2)
    assert result.successful_data == [2]
    assert broken.calls == 1
    # The message that could not be acknowledged is reported as such, not as processed.
    acks = [(e.kind, [m.data for m in e.messages]) for e in events if e.kind.startswith("ack")]
    assert acks == [("ack.exception", [0]), ("ack", [2])]
    assert isinstance(
        events[[e.kind for e in events].index("ack.exception")].exception, ConnectionError
    )
