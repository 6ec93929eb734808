"""The circuit breaker: enough messages raising within the window open it (the pipeline
holds its intake, what raises meanwhile goes back without an attempt), a delay later it is
half-open (it lets in its probes and holds the rest back), the probes succeeding close it,
one failing opens it again for longer and goes back without an attempt. Failures on
purpose never open it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from ingest import CircuitBreaker, Handlers, Message, Pipeline
from ingest._circuit import CIRCUIT_OPEN
from ingest.acknowledger import ACK_ACTIONS, validate_ack_options
from ingest.exceptions import BufferClosed
from ingest.producers.memory import InMemoryProducer
from ingest.testing import CollectingAcknowledger, push_messages
from tests.support import eventually

from .conftest import MakePipeline

FAST = CircuitBreaker(min_messages=10, window=5.0, open_delay=0.3, max_open_delay=1.0, probes=3)


class Dependency(Handlers):
    """Raises while `down`; fails "bad" payloads on purpose; counts what it was given."""

    def __init__(self) -> None:
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = 0

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.entered += 1
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


async def test_what_raises_while_open_goes_back_without_an_attempt(
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


async def test_half_open_lets_in_only_its_probes_and_holds_the_rest_back(
    make_pipeline: MakePipeline,
) -> None:
    dependency, pipeline = await opened(make_pipeline)
    dependency.down = False
    dependency.gate.clear()  # the first probe stays in the handler until the test says
    dependency.entered = 0
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    pushing = asyncio.create_task(push_messages(pipeline, range(10)))
    await eventually(lambda: _true(pipeline.in_flight == FAST.probes))
    await asyncio.sleep(0.2)
    assert pipeline.in_flight == FAST.probes  # 3 of 10: the other 7 wait in the producer
    assert dependency.entered == 1  # the first probe, in the handler
    assert not pushing.done()
    dependency.gate.set()
    result = await (await pushing).wait()
    assert len(result.successful) == 10
    assert pipeline.circuit_state == "closed"


async def test_a_probe_that_fails_goes_back_without_an_attempt_and_opens_it_for_longer(
    make_pipeline: MakePipeline,
) -> None:
    dependency, pipeline = await opened(make_pipeline)
    dependency.entered = 0
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    loop = asyncio.get_running_loop()
    pushing = asyncio.create_task(push_messages(pipeline, range(10)))
    await eventually(lambda: _state_is(pipeline, "open"))
    reopened = loop.time()
    assert dependency.entered == FAST.probes  # not all ten
    dependency.down = False
    dependency.gate.clear()  # the next probes stay in the handler until the test says
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    assert loop.time() - reopened >= 0.55  # 0.3 s, then 0.6 s
    dependency.gate.set()
    result = await (await pushing).wait()
    assert pipeline.circuit_state == "closed"
    # The probes that raised went back without counting an attempt; the others passed.
    assert [m.ack_data for m in result.failed] == [{"on_failure": "reject_and_requeue"}] * 3
    assert len(result.successful) == 7


async def test_what_raises_while_not_closed_is_released_when_the_acknowledger_can(
    make_pipeline: MakePipeline,
) -> None:
    """`release` (RabbitMQ's: a copy at the tail of the queue, counting neither an attempt
    nor a delivery) is preferred to `reject_and_requeue` by an acknowledger offering it."""
    _, pipeline = await opened(make_pipeline)
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    acknowledger = Releasing(1)
    producer = pipeline.producer
    assert isinstance(producer, InMemoryProducer)
    await producer.push([Message("probe", acknowledger)])
    result = await acknowledger.wait()
    assert [m.ack_data for m in result.failed] == [{"on_failure": "release"}]
    assert pipeline.circuit_state == "open"


async def test_a_push_held_back_by_the_circuit_ends_when_the_pipeline_stops(
    make_pipeline: MakePipeline,
) -> None:
    _, pipeline = await opened(make_pipeline)
    await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
    pushing = asyncio.create_task(push_messages(pipeline, range(10)))
    await eventually(lambda: _state_is(pipeline, "open"))  # the probes raised
    assert not pushing.done()
    await pipeline.stop()
    with pytest.raises(BufferClosed):
        await pushing


async def test_a_producer_that_can_limit_takes_in_only_the_probes_while_half_open() -> None:
    dependency = Dependency()
    dependency.down = True
    producer = LimitingProducer()
    async with Pipeline(
        "test", dependency, producer, circuit_breaker=FAST, shutdown_timeout=5.0
    ) as pipeline:
        await (await push_messages(pipeline, range(10))).wait()
        assert pipeline.circuit_state == "open"
        assert producer.limits == []
        await eventually(lambda: _state_is(pipeline, "half-open"), timeout=3)
        assert producer.limits == [FAST.probes]  # set before the intake is released
        dependency.down = False
        await (await push_messages(pipeline, range(FAST.probes))).wait()
        assert pipeline.circuit_state == "closed"
        assert producer.limits == [FAST.probes, None]


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


async def _true(value: bool) -> bool:
    return value


class LimitingProducer(InMemoryProducer):
    """An in-memory producer that records what the pipeline limits it to."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: list[int | None] = []

    async def limit(self, messages: int | None) -> None:
        self.limits.append(messages)


class Releasing(CollectingAcknowledger):
    """A collecting acknowledger that also offers the `release` action."""

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        return {**(ack_data or {}), **validate_ack_options(options, (*ACK_ACTIONS, "release"))}
