"""Pause and resume: a paused pipeline takes no messages in, finishes what it holds, and
takes them again once every hold is released; it stays paused across a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest import Event, Handlers, Message, Pipeline
from ingest.exceptions import ConfigurationError
from ingest.pipeline import PAUSED
from ingest.producer import Sink
from ingest.testing import push_messages

from .conftest import MakePipeline


class Slow(Handlers):
    def __init__(self) -> None:
        self.handled: list[Any] = []
        self.release = asyncio.Event()
        self.release.set()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await self.release.wait()
        self.handled.append(message.data)
        return message


async def test_a_paused_pipeline_takes_nothing_in_until_resumed(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Slow())
    events: list[Event] = []
    pipeline.events.subscribe(events.append, kinds={"pipeline.pause", "pipeline.resume"})
    await pipeline.pause()
    assert pipeline.paused
    assert pipeline.holds == {PAUSED}
    pushing = asyncio.create_task(push_messages(pipeline, ["a"]))
    await asyncio.sleep(0.1)
    assert not pushing.done()  # the producer takes nothing while paused
    await pipeline.resume()
    result = await (await pushing).wait()
    assert [m.data for m in result.successful] == ["a"]
    assert [(e.kind, e.reason) for e in events] == [
        ("pipeline.pause", PAUSED),
        ("pipeline.resume", PAUSED),
    ]


async def test_what_the_pipeline_holds_when_paused_is_finished_and_acknowledged(
    make_pipeline: MakePipeline,
) -> None:
    handlers = Slow()
    handlers.release.clear()
    pipeline = await make_pipeline(handlers)
    pending = await push_messages(pipeline, ["a", "b"])
    await pipeline.pause()
    handlers.release.set()
    result = await pending.wait()
    assert sorted(m.data for m in result.successful) == ["a", "b"]
    assert pipeline.paused


async def test_it_takes_messages_again_only_once_no_hold_is_left(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Slow())
    await pipeline.pause()
    await pipeline.hold("circuit open")
    await pipeline.pause()  # twice: still one hold
    await pipeline.resume()
    assert pipeline.holds == {"circuit open"}
    pushing = asyncio.create_task(push_messages(pipeline, ["a"]))
    await asyncio.sleep(0.1)
    assert not pushing.done()
    await pipeline.release("circuit open")
    await (await pushing).wait()


class Unpausable:
    async def start(self, sink: Sink) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


async def test_a_producer_that_cannot_pause_says_so() -> None:
    pipeline = Pipeline("p", Slow(), Unpausable())
    with pytest.raises(ConfigurationError, match="Unpausable cannot pause"):
        await pipeline.pause()
