"""The terminator: a pipeline's shutdown, as one ordered sequence under one deadline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from ingest._buffer import Buffer
from ingest._runtime import Runtime
from ingest.message import Message
from ingest.producer import Producer
from ingest.waiting import close_within

logger = structlog.get_logger("ingest")


@dataclass(eq=False)
class Stages:
    """The tasks and buffers of a running pipeline, in the order they are shut down."""

    intake: list[Buffer[Message]]
    processors: list[asyncio.Task[None]] = field(default_factory=list)
    batcher_inboxes: list[Buffer[Message]] = field(default_factory=list)
    batchers: list[asyncio.Task[None]] = field(default_factory=list)
    batch_processors: list[asyncio.Task[None]] = field(default_factory=list)
    timers: list[asyncio.Task[None]] = field(default_factory=list)  # cancelled last

    def all_tasks(self) -> list[asyncio.Task[None]]:
        return [*self.processors, *self.batchers, *self.batch_processors]


async def shut_down(rt: Runtime, producer: Producer, stages: Stages, timeout: float) -> None:
    """Stop consuming, let processors finish, flush every open batch, run handle_batch and
    acknowledge — all within `timeout` seconds. What is still unacknowledged at the
    deadline is cancelled and left to the producer's `close()` (a broker redelivers it):
    nothing is ever acknowledged unprocessed.
    """
    log = logger.bind(pipeline=rt.pipeline)
    log.info("draining", in_flight=rt.in_flight, timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            await producer.drain()
            for inbox in stages.intake:
                inbox.close()
            await _join(stages.processors)
            # Closing a batcher's inbox makes it flush every open batch, then close the
            # batch processors' inboxes once they have taken the last one.
            for inbox in stages.batcher_inboxes:
                inbox.close()
            await _join(stages.batchers)
            await _join(stages.batch_processors)
    except TimeoutError:
        log.warning(
            "shutdown timeout reached; unacknowledged messages are left to the producer",
            unacknowledged=rt.in_flight,
            timeout=timeout,
        )
        for task in stages.all_tasks():
            task.cancel()
        await asyncio.gather(*stages.all_tasks(), return_exceptions=True)
    finally:
        for timer in stages.timers:
            timer.cancel()
        await asyncio.gather(*stages.timers, return_exceptions=True)
        await close_within(producer.close(), log, "producer close")
    log.info("stopped", unacknowledged=rt.in_flight)


async def _join(tasks: list[asyncio.Task[None]]) -> None:
    # A crashed stage is logged where it crashed; the sequence goes on.
    await asyncio.gather(*tasks, return_exceptions=True)
