"""The circuit breaker: enough messages raising within the window open it (the pipeline
holds its intake, what raises meanwhile is requeued without an attempt), a delay later it
is half-open (messages flow and count), successes close it, a failure opens it again for
longer. Failures on purpose never open it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ingest import CircuitBreaker, Handlers, Message, Pipeline
from ingest._circuit import CIRCUIT_OPEN
from ingest.testing import push_messages
from tests.support import eventually

from .conftest import MakePipeline

FAST = CircuitBreaker(min_messages=10, window=5.0, open_delay=0.3, max_open_delay=1.0, probes=3)


class Dependency(Handlers):
    """Raises while `down`; fails "bad" payloads on purpose."""

    def __init__(self) -> None:
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        await self.gate.wait()
        if message.data == "bad":
            return message.failed("bad payload")
        if self.down:
            raise ConnectionError("database unreachable")
        return message


async def opened(make_pipeline: MakePipeline) -> tuple[Dependency, Pipeline]:
    """A pipeline whose dependency is down, after the 10 failures that open its circuit."""
    dependency = Dependency()
    dependency.down = True
    pipeline = await make_pipeline(dependency, circuit_breaker=FAST)
    await (await push_messages(pipeline, range(10))).wait()
    return dependency, pipeline


async def test_failures_by_exception_open_it_and_the_pipeline_stops_taking_messages(
    make_pipeline: MakePipeline,
) -> None:
    dependency = Dependency()
    dependency.down = True
    pipeline = await make_pipeline(dependency, circuit_breaker=FAST)
    result = await (await push_messages(pipeline, range(10))).wait()
    assert len(result.failed) == 10
    assert pipeline.circuit_state == "open"
    assert pipeline.holds == {CIRCUIT_OPEN}
    # They opened it: they counted an attempt, as any failure does.
    assert all(not m.ack_data for m in result.failed)


async def test_what_raises_while_open_is_requeued_without_an_attempt(
    make_pipeline: MakePipeline,
) -> None:
    dependency = Dependency()
    dependency.down = True
    dependency.gate.clear()
    pipeline = await make_pipeline(dependency, circuit_breaker=FAST)
    opening = await push_messages(pipeline, range(10))
    held = await push_messages(pipeline, ["in flight"])  # taken in before it opened
    dependency.gate.set()
    await opening.wait()
    result = await held.wait()
    assert pipeline.circuit_state == "open"
    assert [m.ack_data for m in result.failed] == [{"on_failure": "reject_and_requeue"}]


async def test_half_open_after_the_delay_then_closed_by_successes(
    make_pipeline: MakePipeline,
) -> None:
    dependency, pipeline = await opened(make_pipeline)
    dependency.down = False
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    assert pipeline.holds == frozenset()  # consuming again
    result = await (await push_messages(pipeline, range(3))).wait()
    assert len(result.successful) == 3
    assert pipeline.circuit_state == "closed"


async def test_a_failure_while_half_open_opens_it_again_for_longer(
    make_pipeline: MakePipeline,
) -> None:
    _, pipeline = await opened(make_pipeline)
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    loop = asyncio.get_running_loop()
    result = await (await push_messages(pipeline, ["probe"])).wait()
    assert not result.failed[0].ack_data  # a probe's failure counts an attempt
    reopened = loop.time()
    assert pipeline.circuit_state == "open"
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    assert loop.time() - reopened >= 0.55  # 0.3 s, then 0.6 s


async def test_failures_on_purpose_never_open_it(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Dependency(), circuit_breaker=FAST)
    result = await (await push_messages(pipeline, ["bad"] * 30)).wait()
    assert len(result.failed) == 30
    assert pipeline.circuit_state == "closed"


async def test_a_few_failures_among_many_successes_do_not_open_it(
    make_pipeline: MakePipeline,
) -> None:
    dependency = Dependency()
    pipeline = await make_pipeline(dependency, circuit_breaker=FAST)
    await (await push_messages(pipeline, range(20))).wait()
    dependency.down = True
    await (await push_messages(pipeline, range(10))).wait()  # 10 of 30: a third
    assert pipeline.circuit_state == "closed"


def test_its_options_are_checked() -> None:
    with pytest.raises(ValueError, match="failure_ratio must be in"):
        CircuitBreaker(failure_ratio=1.5)
    with pytest.raises(ValueError, match="max_open_delay must be >= open_delay"):
        CircuitBreaker(open_delay=10, max_open_delay=5)


def test_a_producer_that_cannot_pause_cannot_have_one() -> None:
    class Unpausable:
        async def start(self, sink: Any) -> None: ...

        async def drain(self) -> None: ...

        async def close(self) -> None: ...

    with pytest.raises(TypeError, match="Unpausable cannot pause"):
        Pipeline("p", Dependency(), Unpausable(), circuit_breaker=FAST)


async def _state_is(pipeline: Pipeline, state: str) -> bool:
    return pipeline.circuit_state == state
