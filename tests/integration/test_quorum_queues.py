"""Quorum work queues against the real broker: a message whose consumer dies on it every
time is dead-lettered by the broker past the delivery limit (a classic queue would
redeliver it forever), with a reason `ingest dlq show` reads; `reject_and_requeue_once`
requeues once, then dead-letters; a classic queue redeclared as quorum is refused with
one line saying what to do; a quorum queue's retry queues are quorum queues too."""

from __future__ import annotations

import contextlib
from typing import Any

import aiormq
from structlog.testing import capture_logs

from ingest import Handlers, Message
from ingest.rabbitmq import REASON_HEADER, RabbitMQOptions, RetryPolicy, retry_queue_name
from ingest.rabbitmq.dead_letters import DeadLetters
from ingest.rabbitmq.queues import declare, quorum

from .conftest import Broker, MakeRabbitPipeline, eventually, queue_depth


async def test_a_message_that_kills_its_consumer_is_dead_lettered_past_the_limit(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    dlq = f"{queue_name}.dlq"
    options = RabbitMQOptions(queue=queue_name, declare=quorum(dlq, delivery_limit=2))
    await declare(amqp, options)
    await amqp.basic_publish(
        b"poison", routing_key=queue_name, properties=aiormq.spec.Basic.Properties(message_id="p")
    )
    connection = await aiormq.connect(broker.amqp_url)
    try:
        for _ in range(3):  # delivered, then the consumer "dies" (its channel closes)
            channel = await connection.channel()
            delivered = await channel.basic_get(queue_name, no_ack=False)
            assert delivered.body == b"poison"
            await channel.close()  # no ack: the broker takes it back and counts
    finally:
        await connection.close()
    await eventually(lambda: _depth_is(amqp, dlq, 1), timeout=10)
    assert await queue_depth(amqp, queue_name) == 0
    async with DeadLetters(broker.amqp_url, queue_name) as dead:
        [letter] = await dead.show()
    assert (letter.reason, letter.message_id, letter.queue) == ("delivery_limit", "p", queue_name)


class RequeueOnce(Handlers):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.seen.append(bool(message.metadata.get("redelivered")))
        return message.failed("try once more").configure_ack(on_failure="reject_and_requeue_once")


async def test_reject_and_requeue_once_on_a_quorum_queue(
    queue_name: str, make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel
) -> None:
    handlers = RequeueOnce()
    await make_rabbit_pipeline(
        handlers,
        declare=quorum(f"{queue_name}.dlq", delivery_limit=20),
        metadata=("redelivered",),
    )
    await amqp.basic_publish(b"x", routing_key=queue_name)
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1), timeout=15)
    assert handlers.seen == [False, True]  # requeued once, then a dead letter
    dead = await amqp.basic_get(f"{queue_name}.dlq", no_ack=True)
    assert dead.header.properties.headers[REASON_HEADER] == "try once more"


async def test_a_classic_queue_declared_as_quorum_is_refused_saying_what_to_do(
    queue_name: str, make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel
) -> None:
    await amqp.queue_declare(queue_name, durable=True)  # classic, as an older version made it
    # Never consuming: the broker keeps refusing, and waiting for it times out.
    with capture_logs() as logs, contextlib.suppress(TimeoutError):
        await make_rabbit_pipeline(
            RequeueOnce(), declare=quorum(f"{queue_name}.dlq", delivery_limit=20)
        )
    refusals = [log for log in logs if "cannot change type in place" in log["event"]]
    assert refusals, [log["event"] for log in logs]
    assert f"rabbitmqctl delete_queue {queue_name}" in refusals[0]["event"]
    assert refusals[0]["log_level"] == "error"


async def _depth_is(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    return await queue_depth(channel, queue) == count


class FailsOnce(Handlers):
    def __init__(self) -> None:
        self.attempts = 0

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.attempts += 1
        if self.attempts == 1:
            raise RuntimeError("database down")
        return message


async def test_the_retry_queues_of_a_quorum_queue_are_quorum_and_retry(
    broker: Broker,
    queue_name: str,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    # Classic retry queues live on one node: that node stopped, they cannot be declared
    # and the work queue's consumer never starts (seen in the cluster test).
    handlers = FailsOnce()
    await make_rabbit_pipeline(
        handlers,
        declare=quorum(f"{queue_name}.dlq", delivery_limit=20),
        retry=RetryPolicy(max_attempts=3, delays=(0.2,)),
    )
    await amqp.basic_publish(b"x", routing_key=queue_name)
    await eventually(lambda: _attempts_are(handlers, 2), timeout=10)
    retry_queue = retry_queue_name(queue_name, 0.2)
    connection = await aiormq.connect(broker.amqp_url)
    try:
        channel = await connection.channel()
        # Declared again as a quorum queue with its TTL: refused if it were classic.
        await channel.queue_declare(
            retry_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": 200,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue_name,
            },
        )
    finally:
        await connection.close()
    assert await queue_depth(amqp, f"{queue_name}.dlq") == 0


async def test_a_classic_retry_queue_of_an_older_version_is_refused_saying_what_to_do(
    queue_name: str, make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel
) -> None:
    retry_queue = retry_queue_name(queue_name, 0.2)
    await amqp.queue_declare(
        retry_queue,
        durable=True,
        arguments={
            "x-message-ttl": 200,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue_name,
        },
    )
    with capture_logs() as logs, contextlib.suppress(TimeoutError):
        await make_rabbit_pipeline(
            FailsOnce(),
            declare=quorum(f"{queue_name}.dlq", delivery_limit=20),
            retry=RetryPolicy(max_attempts=3, delays=(0.2,)),
        )
    refusals = [log for log in logs if "retry and dead-letter queues" in log["event"]]
    assert refusals, [log["event"] for log in logs]
    assert f"rabbitmqctl delete_queue {retry_queue}" in refusals[0]["event"]


async def _attempts_are(handlers: FailsOnce, count: int) -> bool:
    return handlers.attempts == count
