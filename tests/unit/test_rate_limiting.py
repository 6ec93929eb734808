"""Rate limiting: a pipeline-wide allowance per interval, changeable while running."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest import Handlers, Message, Processors, RateLimiting
from ingest.testing import push_messages

from .conftest import MakePipeline


class Clock(Handlers):
    """Records the loop time at which each message was handled."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.times.append(asyncio.get_running_loop().time())
        return message


def per_window(times: list[float], start: float, interval: float) -> list[int]:
    counts: dict[int, int] = {}
    for at in times:
        window = int((at - start) / interval)
        counts[window] = counts.get(window, 0) + 1
    return [counts.get(i, 0) for i in range(max(counts) + 1)]


async def test_no_more_than_allowed_messages_per_interval_across_processors(
    make_pipeline: MakePipeline,
) -> None:
    handlers = Clock()
    pipeline = await make_pipeline(
        handlers,
        processors=Processors(concurrency=3, max_demand=5),
        rate_limiting=RateLimiting(allowed_messages=4, interval=0.2),
    )
    start = asyncio.get_running_loop().time()
    pending = await push_messages(pipeline, range(12))
    await pending.wait()
    # Three windows of four: the limit holds although three processors compete.
    assert sorted(per_window(handlers.times, start, 0.2)) == [4, 4, 4]


async def test_update_rate_limiting_applies_while_running(make_pipeline: MakePipeline) -> None:
    handlers = Clock()
    pipeline = await make_pipeline(
        handlers, rate_limiting=RateLimiting(allowed_messages=1, interval=60)
    )
    pending = await push_messages(pipeline, range(5))
    await asyncio.sleep(0.05)
    assert len(handlers.times) == 1  # one per minute: the rest wait
    pipeline.update_rate_limiting(allowed_messages=100)
    await pending.wait(timeout=2)
    assert len(handlers.times) == 5
    assert pipeline.rate_limiting == RateLimiting(allowed_messages=100, interval=60)


async def test_update_rate_limiting_without_rate_limiting_says_so(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Clock())
    with pytest.raises(RuntimeError, match="was built without rate_limiting"):
        pipeline.update_rate_limiting(allowed_messages=3)


async def test_update_rate_limiting_starts_a_new_window_at_once(
    make_pipeline: MakePipeline,
) -> None:
    # Broadway keeps the current window; ingest starts a fresh one with the new allowance
    # (README, Options), even when nothing is waiting at the moment of the update.
    handlers = Clock()
    pipeline = await make_pipeline(
        handlers, rate_limiting=RateLimiting(allowed_messages=1, interval=60)
    )
    await (await push_messages(pipeline, ["first"])).wait()
    pipeline.update_rate_limiting(allowed_messages=3)
    await (await push_messages(pipeline, range(3))).wait(timeout=2)
    assert len(handlers.times) == 4
