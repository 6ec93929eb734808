"""Failure semantics of prepare_messages, handle_message and handle_failed (Broadway's
`handle_message`, `prepare_messages` and `handle_failed` scenarios)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog.testing

from ingest import Batcher, Failed, Handlers, Message, Processors
from ingest.testing import send_batch, send_message

from .conftest import MakePipeline


class Echo(Handlers):
    """Fails on data containing 'fail', raises on 'raise', returns junk on 'junk'."""

    def __init__(self) -> None:
        self.failed_seen: list[list[Any]] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "raise":
            raise RuntimeError("oops")
        if message.data == "junk":
            return "not a message"  # type: ignore[return-value]
        if message.data == "fail":
            return message.failed("told to fail")
        return message

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        self.failed_seen.append([m.data for m in messages])
        return messages


async def test_successful_messages_are_acknowledged_as_successful(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Echo())
    result = await send_batch(pipeline, ["a", "b", "c"])
    assert result.successful_data == ["a", "b", "c"]
    assert result.failed == []


async def test_an_exception_in_handle_message_fails_that_message_only(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Echo())
    result = await send_batch(pipeline, ["a", "raise", "c"])
    assert result.successful_data == ["a", "c"]
    assert [m.data for m in result.failed] == ["raise"]
    status = result.failed[0].status
    assert isinstance(status, Failed)
    assert status.reason == "handle_message raised RuntimeError: oops"
    assert isinstance(status.exception, RuntimeError)


async def test_a_wrong_return_from_handle_message_fails_that_message(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Echo())
    result = await send_batch(pipeline, ["junk", "b"])
    assert result.successful_data == ["b"]
    assert result.failed_reasons == ["handle_message returned a str, expected a Message"]


async def test_message_failed_reaches_handle_failed_with_its_reason(
    make_pipeline: MakePipeline,
) -> None:
    handlers = Echo()
    pipeline = await make_pipeline(handlers)
    result = await send_batch(pipeline, ["fail", "ok", "raise"])
    assert result.failed_reasons == ["told to fail", "handle_message raised RuntimeError: oops"]
    assert handlers.failed_seen == [["fail", "raise"]]


class RaisingPrepare(Handlers):
    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        if any(m.data == "bad" for m in messages):
            raise ValueError("cannot prepare")
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


async def test_an_exception_in_prepare_messages_fails_the_whole_chunk(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(RaisingPrepare(), processors=Processors(max_demand=10))
    result = await send_batch(pipeline, ["a", "bad", "c"])
    assert result.successful == []
    assert sorted(m.data for m in result.failed) == ["a", "bad", "c"]
    assert set(result.failed_reasons) == {"prepare_messages raised ValueError: cannot prepare"}


class FailsThenRaises(RaisingPrepare):
    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        for message in messages:
            if message.data == "garbage":
                message.failed("not a booking")
        raise ConnectionError("database down")


async def test_a_failure_set_before_prepare_messages_raised_is_kept(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(FailsThenRaises(), processors=Processors(max_demand=10))
    result = await send_batch(pipeline, ["garbage", "fine"])
    assert {m.data: m.failure_reason for m in result.failed} == {
        "garbage": "not a booking",
        "fine": "prepare_messages raised ConnectionError: database down",
    }


class ShortPrepare(Handlers):
    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        return messages[:-1]

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


async def test_prepare_messages_returning_fewer_messages_fails_the_chunk(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(ShortPrepare())
    result = await send_batch(pipeline, ["a", "b"])
    assert result.successful == []
    assert result.failed_reasons[0] == (
        "prepare_messages raised TypeError: prepare_messages must return a list of the 2 "
        "Messages it got, returned a list of 1"
    )


class ChunkRecorder(Handlers):
    def __init__(self) -> None:
        self.chunks: list[int] = []

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        self.chunks.append(len(messages))
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message


async def test_prepare_messages_gets_chunks_of_at_most_max_demand(
    make_pipeline: MakePipeline,
) -> None:
    handlers = ChunkRecorder()
    pipeline = await make_pipeline(handlers, processors=Processors(concurrency=1, max_demand=4))
    await send_batch(pipeline, range(10))
    assert max(handlers.chunks) <= 4
    assert sum(handlers.chunks) == 10


class RaisingHandleFailed(Echo):
    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        for message in messages:
            message.configure_ack(on_failure="reject_and_requeue")
        raise RuntimeError("handle_failed broke")


async def test_handle_failed_raising_acknowledges_the_original_messages_as_failed(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(RaisingHandleFailed())
    with structlog.testing.capture_logs() as logs:
        result = await send_batch(pipeline, ["fail", "ok"])
    assert [entry["event"] for entry in logs] == [
        "handle_failed raised; acknowledging the messages as failed"
    ]
    assert result.successful_data == ["ok"]
    assert [m.data for m in result.failed] == ["fail"]
    assert result.failed_reasons == ["told to fail"]


class WrongHandleFailed(Echo):
    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        return []


async def test_handle_failed_with_a_wrong_return_still_acknowledges_every_failed_message(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(WrongHandleFailed())
    result = await send_batch(pipeline, ["fail", "raise"])
    assert sorted(m.data for m in result.failed) == ["fail", "raise"]


class ConfigureInHandleFailed(Echo):
    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        return [m.configure_ack(on_failure="reject") for m in messages]


async def test_configure_ack_in_handle_failed_reaches_the_acknowledger(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(ConfigureInHandleFailed())
    result = await send_message(pipeline, "fail")
    assert result.failed[0].ack_data == {"on_failure": "reject"}


class ToUnknownBatcher(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.put_batcher(message.data)

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


async def test_a_message_routed_to_an_unknown_batcher_fails(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(ToUnknownBatcher(), batchers={"known": Batcher()})
    result = await send_batch(pipeline, ["known", "nowhere"], batch_mode="flush")
    assert result.successful_data == ["known"]
    assert result.failed_reasons == ["unknown batcher 'nowhere'; declared batchers: known"]


class FailingNeverBatched(Handlers):
    def __init__(self) -> None:
        self.batched: list[Any] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.failed("no") if message.data == "x" else message

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        self.batched.extend(m.data for m in messages)
        return messages


async def test_failed_messages_never_reach_a_batcher(make_pipeline: MakePipeline) -> None:
    handlers = FailingNeverBatched()
    pipeline = await make_pipeline(handlers, batchers={"default": Batcher()})
    result = await send_batch(pipeline, ["x", "y"], batch_mode="flush")
    assert handlers.batched == ["y"]
    assert result.failed_reasons == ["no"]


class Slow(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await asyncio.sleep(message.data)
        return message


async def test_handler_timeout_fails_a_slow_message_with_a_clear_reason(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Slow(), handler_timeout=0.05)
    result = await send_batch(pipeline, [0, 10])
    assert result.successful_data == [0]
    assert result.failed_reasons == ["handle_message raised HandlerTimeout: timed out after 0.05s"]


class OwnTimeout(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        raise TimeoutError("the database did not answer")


async def test_a_handlers_own_timeout_error_is_not_reported_as_the_handler_timeout(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(OwnTimeout(), handler_timeout=5)
    result = await send_message(pipeline, "a")
    assert result.failed_reasons == [
        "handle_message raised TimeoutError: the database did not answer"
    ]


class Rendezvous(Handlers):
    """Each message waits until `expected` handlers are running at the same time."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.running = 0
        self.all_in = asyncio.Event()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.running += 1
        if self.running == self.expected:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 2)
        return message


async def test_processors_run_handle_message_concurrently(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(
        Rendezvous(4), processors=Processors(concurrency=4, max_demand=1)
    )
    result = await send_batch(pipeline, range(4))
    assert len(result.successful) == 4
