"""The circuit breaker on the RabbitMQ producer, on a quorum queue with a delivery limit:
half-open, the consumer takes a few messages (a prefetch of the probes), not a whole
prefetch; what raises while the circuit is open or probing is released (a copy at the tail
of the queue, the delivery acknowledged), which counts neither a retry attempt nor a
delivery. An outage many times longer than the retries and the delivery limit allow
dead-letters nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq

from ingest import CircuitBreaker, Event, Handlers, Message, Pipeline
from ingest.rabbitmq import ATTEMPTS_HEADER, RetryPolicy
from ingest.rabbitmq.queues import quorum

from .conftest import Broker, MakeRabbitPipeline, eventually, publish, queue_depth

MESSAGES = 100
PREFETCH = 20
BREAKER = CircuitBreaker(min_messages=5, window=5.0, open_delay=0.2, max_open_delay=0.4, probes=2)


class Dependency(Handlers):
    """Raises while `down`, answers once `gate` is set; records each delivery's delivery
    count and attempts."""

    def __init__(self) -> None:
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.seen: list[tuple[int, int]] = []  # (x-delivery-count, x-ingest-attempts)
        self.done: set[bytes] = set()

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        headers = message.metadata.get("headers") or {}
        self.seen.append((headers.get("x-delivery-count", 0), headers.get(ATTEMPTS_HEADER, 0)))
        await self.gate.wait()
        if self.down:
            raise ConnectionError("database unreachable")
        self.done.add(message.data)
        return message


class Released(Handlers):
    """Releases each message once, then takes it; records its headers each time."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        headers = dict(message.metadata.get("headers") or {})
        self.seen.append(headers)
        if len(self.seen) == 1:
            return message.failed("not now").configure_ack(on_failure="release")
        return message


async def test_a_released_message_comes_back_without_an_attempt_or_a_delivery(
    queue_name: str, make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel
) -> None:
    handlers = Released()
    _, producer = await make_rabbit_pipeline(
        handlers,
        declare=quorum(f"{queue_name}.dlq", delivery_limit=1),
        retry=RetryPolicy(max_attempts=3, delays=(0.1,)),
        metadata=("headers",),
    )
    await publish(amqp, queue_name, b"x", headers={ATTEMPTS_HEADER: 1, "trace": "kept"})

    async def taken() -> bool:
        return len(handlers.seen) == 2

    await eventually(taken)
    first, second = handlers.seen
    assert first == second == {ATTEMPTS_HEADER: 1, "trace": "kept"}  # no x-delivery-count
    assert producer.stats.release == 1
    assert producer.stats.reject_and_requeue == producer.stats.retry == 0
    assert await queue_depth(amqp, f"{queue_name}.dlq") == 0


async def test_an_outage_on_a_quorum_queue_probes_with_a_few_and_dead_letters_nothing(
    broker: Broker,
    queue_name: str,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    dependency = Dependency()
    dependency.down = True
    pipeline, producer = await make_rabbit_pipeline(
        dependency,
        {"circuit_breaker": BREAKER},
        # A delivery counted twice, or a second attempt, and it would be a dead letter.
        declare=quorum(f"{queue_name}.dlq", delivery_limit=2),
        retry=RetryPolicy(max_attempts=2, delays=(0.1,)),
        prefetch_count=PREFETCH,
        metadata=("headers",),
    )
    resumes = _count_resumes(pipeline)
    await publish(amqp, queue_name, *(f"m{i}".encode() for i in range(MESSAGES)))

    async def opened() -> bool:
        return pipeline.circuit_state == "open"

    await eventually(opened)
    handled_at_opening = len(dependency.seen)
    await asyncio.sleep(3.0)  # half-open after 0.2 s, 0.4 s, 0.4 s ...: each probe fails
    assert resumes[0] >= 4
    assert len(dependency.seen) - handled_at_opening <= PREFETCH + resumes[0] * BREAKER.probes
    # The server answers again, slowly: half-open, the consumer has a prefetch of the probes.
    dependency.down = False
    dependency.gate.clear()

    async def probing() -> bool:
        return pipeline.circuit_state == "half-open" and pipeline.in_flight == BREAKER.probes

    await eventually(probing)
    await eventually(lambda: _prefetch_is(broker, queue_name, BREAKER.probes))
    assert pipeline.in_flight == BREAKER.probes
    dependency.gate.set()

    async def all_done() -> bool:
        return len(dependency.done) == MESSAGES and pipeline.circuit_state == "closed"

    await eventually(all_done, timeout=20)
    await eventually(lambda: _prefetch_is(broker, queue_name, PREFETCH))
    assert await queue_depth(amqp, f"{queue_name}.dlq") == 0
    # Whatever the number of probes, a delivery is counted at most at the opening and at
    # the closing: what was on its way to a consumer that is cancelled comes back counted.
    assert max(count for count, _ in dependency.seen) <= 2
    assert max(attempts for _, attempts in dependency.seen) == 1  # those that opened it
    assert producer.stats.release > 0
    assert producer.stats.dead_letter == producer.stats.reject_and_requeue == 0


def _count_resumes(pipeline: Pipeline) -> list[int]:
    """How many times the circuit let the intake go (each half-open), kept up to date."""
    resumes = [0]

    def on_resume(event: Event) -> None:
        resumes[0] += 1

    pipeline.events.subscribe(on_resume, kinds=("pipeline.resume",))
    return resumes


async def _prefetch_is(broker: Broker, queue: str, prefetch: int) -> bool:
    """Whether the queue's one consumer has `prefetch`, as the management API says (it
    learns of a new consumer within a few seconds)."""
    consumers = await broker.api_async("GET", "consumers/%2F")
    ours = [c["prefetch_count"] for c in consumers if c["queue"]["name"] == queue]
    return ours == [prefetch]
