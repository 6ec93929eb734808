"""Hooks that misbehave in ways the stages must survive: a CancelledError out of user code,
lists changed in place, an acknowledger that is not hashable, a subscriber arriving while
a handler runs. Each fails the message (or batch), never the stage, and every message is
acknowledged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from ingest import Batcher, BatchInfo, Event, Handlers, Message
from ingest.testing import send_batch, send_message

from .conftest import MakePipeline


async def await_a_task_someone_else_cancelled() -> None:
    task = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()
    await task


class CancelledIn(Handlers):
    """Awaits a task it cancelled itself in `hook`, for data "cancel"."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        if self.hook == "prepare_messages" and any(m.data == "cancel" for m in messages):
            await await_a_task_someone_else_cancelled()
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if self.hook == "handle_message" and message.data == "cancel":
            await await_a_task_someone_else_cancelled()
        return message.put_batcher("b")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        if self.hook == "handle_batch" and any(m.data == "cancel" for m in messages):
            await await_a_task_someone_else_cancelled()
        return messages

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        if self.hook == "handle_failed":
            await await_a_task_someone_else_cancelled()
        return messages


@pytest.mark.parametrize("hook", ["prepare_messages", "handle_message", "handle_batch"])
async def test_a_cancelled_error_out_of_a_hook_fails_the_message_and_the_stage_goes_on(
    make_pipeline: MakePipeline, hook: str
) -> None:
    pipeline = await make_pipeline(CancelledIn(hook), batchers={"b": Batcher(batch_size=1)})
    result = await send_message(pipeline, "cancel")
    assert result.failed_reasons == [f"{hook} raised CancelledError: "]
    # The only processor and batch processor are still there for the next message.
    assert (await send_message(pipeline, "ok")).successful_data == ["ok"]
    assert pipeline.state == "running"


async def test_a_cancelled_error_out_of_handle_failed_still_acknowledges_the_message(
    make_pipeline: MakePipeline,
) -> None:
    class FailAll(CancelledIn):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            return message.failed("no")

    pipeline = await make_pipeline(FailAll("handle_failed"), batchers={"b": Batcher()})
    assert (await send_message(pipeline, "x")).failed_reasons == ["no"]
    assert (await send_message(pipeline, "y")).failed_reasons == ["no"]


class DropsInPlace(Handlers):
    """Removes data "drop" from the list it is given, in place, and returns that list."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        if self.hook == "prepare_messages":
            messages[:] = [m for m in messages if m.data != "drop"]
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if self.hook == "handle_failed":
            return message.failed("on purpose")
        return message.put_batcher("b")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        if self.hook == "handle_batch":
            messages[:] = [m for m in messages if m.data != "drop"]
        return messages

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        if self.hook == "handle_failed":
            messages[:] = [m for m in messages if m.data != "drop"]
        return messages


@pytest.mark.parametrize(
    ("hook", "successful", "failed"),
    [
        # A chunk whose prepare_messages returned the wrong count fails whole.
        pytest.param("prepare_messages", [], ["keep", "drop"], id="prepare_messages"),
        pytest.param("handle_batch", ["keep"], ["drop"], id="handle_batch"),
        pytest.param("handle_failed", [], ["keep", "drop"], id="handle_failed"),
    ],
)
async def test_messages_a_hook_removes_in_place_are_still_failed_and_acknowledged(
    make_pipeline: MakePipeline, hook: str, successful: list[str], failed: list[str]
) -> None:
    pipeline = await make_pipeline(DropsInPlace(hook), batchers={"b": Batcher(batch_size=2)})
    result = await send_batch(pipeline, ["keep", "drop"])
    assert result.successful_data == successful
    assert sorted(m.data for m in result.failed) == sorted(failed)


async def test_handle_batch_dropping_a_message_in_place_names_it_missing(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(
        DropsInPlace("handle_batch"), batchers={"b": Batcher(batch_size=2)}
    )
    result = await send_batch(pipeline, ["keep", "drop"])
    assert result.failed_reasons == ["missing from the list handle_batch returned"]


@dataclass
class PlainDataclassAcknowledger:
    """A custom acknowledger as users write them: a `@dataclass` (so `__hash__` is None)."""

    acked: list[Any] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        self.acked.extend(m.data for m in successful + failed)
        self.done.set()

    def configure(self, ack_data: Any, options: Any) -> Any:
        return ack_data


class Passes(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


async def test_an_acknowledger_that_is_not_hashable_is_called(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Passes())
    acknowledger = PlainDataclassAcknowledger()
    with pytest.raises(TypeError):
        hash(acknowledger)
    await pipeline.producer.push([Message("a", acknowledger), Message("b", acknowledger)])  # type: ignore[attr-defined]
    await asyncio.wait_for(acknowledger.done.wait(), 5)
    assert acknowledger.acked == ["a", "b"]
    assert (await send_message(pipeline, "next")).successful_data == ["next"]


async def test_subscribing_while_a_handler_runs_does_not_break_the_processor(
    make_pipeline: MakePipeline,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    class Waits(Handlers):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            if message.data == "wait":
                entered.set()
                await release.wait()
            return message

    pipeline = await make_pipeline(Waits())
    sent = asyncio.create_task(send_message(pipeline, "wait"))
    await entered.wait()
    events: list[Event] = []
    pipeline.events.subscribe(events.append)  # mid-handler, as a dashboard would
    release.set()
    assert (await sent).successful_data == ["wait"]
    assert (await send_message(pipeline, "next")).successful_data == ["next"]
    kinds = [event.kind for event in events]
    assert "message.start" in kinds  # the next message is traced from its start
    assert kinds.count("message.stop") == kinds.count("message.start")
