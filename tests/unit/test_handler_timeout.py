"""handler_timeout with one deadline per chunk: each message still gets its own
`handler_timeout`, however many share the chunk, and only the stage's own cancellation
stops the stage."""

from __future__ import annotations

import asyncio
from typing import Any

from ingest import Handlers, Message, Processors
from ingest.testing import push_messages, send_batch

from .conftest import MakePipeline

TIMEOUT = 0.2


class Sleeps(Handlers):
    """Sleeps `message.data` seconds; data "swallow" sleeps past the timeout but swallows
    the cancellation and returns."""

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "swallow":
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return message.put_data("swallowed")
        await asyncio.sleep(message.data)
        return message


async def test_each_message_of_a_chunk_has_its_own_timeout(make_pipeline: MakePipeline) -> None:
    # Three messages of 0.6 x the timeout in one chunk: 1.8 x the timeout in all, none late.
    pipeline = await make_pipeline(
        Sleeps(), handler_timeout=TIMEOUT, processors=Processors(max_demand=10)
    )
    result = await send_batch(pipeline, [0.6 * TIMEOUT] * 3)
    assert result.failed == []
    assert len(result.successful) == 3


async def test_a_late_message_in_the_middle_of_a_chunk_fails_alone(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(
        Sleeps(), handler_timeout=TIMEOUT, processors=Processors(max_demand=10)
    )
    result = await send_batch(pipeline, [0.01, 0.5 * TIMEOUT, 3 * TIMEOUT, 0.01, 0.7 * TIMEOUT])
    assert result.failed_reasons == [
        f"handle_message raised HandlerTimeout: timed out after {TIMEOUT:g}s"
    ]
    assert sorted(result.successful_data) == sorted([0.01, 0.5 * TIMEOUT, 0.01, 0.7 * TIMEOUT])


async def test_a_handler_that_swallows_the_timeout_keeps_its_result(
    make_pipeline: MakePipeline,
) -> None:
    # As with asyncio.timeout: what the handler returned counts; the next message is fine.
    pipeline = await make_pipeline(Sleeps(), handler_timeout=TIMEOUT)
    result = await send_batch(pipeline, ["swallow", 0.01])
    assert sorted(map(str, result.successful_data)) == ["0.01", "swallowed"]


async def test_stopping_the_pipeline_still_cancels_a_handler_under_a_timeout(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Sleeps(), handler_timeout=30, shutdown_timeout=0.2)
    pending = await push_messages(pipeline, [20])
    await asyncio.sleep(0.05)
    await asyncio.wait_for(pipeline.stop(), 2)  # the stage was cancelled at the deadline
    assert pending.result.successful == pending.result.failed == []
