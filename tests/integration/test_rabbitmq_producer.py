"""The RabbitMQ producer: metadata, bindings, connection loss, broker-side cancel, drain."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import aiormq

from ingest import Batcher, Handlers, Message
from ingest.rabbitmq import Backoff, Binding

from .conftest import Broker, MakeRabbitPipeline, eventually, publish, queue_depth


class Collect(Handlers):
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.messages: list[Message] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.messages.append(message)
        return message

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages

    def bodies(self) -> set[bytes]:
        return {m.data for m in self.messages}


async def test_only_the_selected_metadata_is_copied(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Collect()
    await make_rabbit_pipeline(
        handlers, metadata=("routing_key", "message_id", "content_type", "persistent", "headers")
    )
    await publish(
        amqp, queue_name, b"x", message_id="id-1", content_type="text/csv", headers={"k": "v"}
    )
    await eventually(lambda: _true(len(handlers.messages) == 1))
    assert handlers.messages[0].metadata == {
        "routing_key": queue_name,
        "message_id": "id-1",
        "content_type": "text/csv",
        "persistent": True,
        "headers": {"k": "v"},
    }


async def test_bindings_route_exchange_messages_to_the_queue(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Collect()
    await make_rabbit_pipeline(
        handlers, bindings=(Binding("amq.topic", routing_key=f"{queue_name}.bookings.#"),)
    )
    await amqp.basic_publish(
        b"via-topic", exchange="amq.topic", routing_key=f"{queue_name}.bookings.new"
    )
    await amqp.basic_publish(b"elsewhere", exchange="amq.topic", routing_key=f"{queue_name}.other")
    await eventually(lambda: _true(len(handlers.messages) == 1))
    await asyncio.sleep(0.2)
    assert handlers.bodies() == {b"via-topic"}


async def test_connections_closed_by_the_broker_lose_nothing(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    broker: Broker,
) -> None:
    handlers = Collect(delay=0.002)
    name = f"ingest-{queue_name}"
    pipeline, producer = await make_rabbit_pipeline(
        handlers,
        {"batchers": {"default": Batcher(batch_size=20, batch_timeout=0.05)}},
        connection_name=name,
        backoff=Backoff("exp", min=0.1, max=0.5),
        prefetch_count=40,
    )
    bodies: list[bytes] = []
    readiness: list[bool] = []
    closed: set[str] = set()
    for round_ in range(2):
        await eventually(lambda: _true(producer.ready))
        # The management API lists a new connection within its stats interval (~5 s).
        connections = await _connections(broker, name, exclude=closed, wait=15)
        closed.update(connections)
        batch = [b"r%d-%d" % (round_, i) for i in range(300)]
        bodies += batch
        await publish(amqp, queue_name, *batch)
        sent = set(batch)
        await eventually(lambda: _true(len(handlers.bodies() & sent) >= 50))  # noqa: B023
        for connection in connections:  # mid-load: ~40 messages are in flight
            await broker.api_async("DELETE", f"connections/{_quote(connection)}")
        await eventually(lambda: _true(not producer.ready), timeout=5)
        readiness.append(producer.ready)
    await eventually(lambda: _true(producer.ready), timeout=10)
    readiness.append(producer.ready)
    await eventually(lambda: _true(handlers.bodies() == set(bodies)), timeout=30)
    await pipeline.stop()
    assert readiness == [False, False, True]
    assert await queue_depth(amqp, queue_name) == 0  # every message acked, on its own channel
    assert producer.stats.connection_losses == 2
    assert producer.stats.dropped_stale > 0  # the dead channels' in-flight acks
    assert len(handlers.messages) > len(bodies)  # ... whose messages were redelivered


async def test_a_consumer_cancelled_by_the_broker_reconnects(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Collect()
    _pipeline, producer = await make_rabbit_pipeline(
        handlers, backoff=Backoff("exp", min=0.1, max=0.2)
    )
    await amqp.queue_delete(queue_name)
    await eventually(lambda: _true(producer.stats.connection_losses == 1))
    await eventually(lambda: _true(producer.ready))
    await publish(amqp, queue_name, b"after")
    await eventually(lambda: _true(handlers.bodies() == {b"after"}))


async def test_drain_cancels_the_consumer_and_acks_what_is_in_flight(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Collect(delay=0.01)
    pipeline, producer = await make_rabbit_pipeline(
        handlers,
        {"batchers": {"default": Batcher(batch_size=1000, batch_timeout=60)}},
        prefetch_count=2000,
    )
    await publish(amqp, queue_name, *(b"d%d" % i for i in range(100)))
    await eventually(lambda: _true(len(handlers.messages) >= 5))
    await pipeline.stop()
    taken = len(handlers.messages)
    # What was handled was acked (flushed from the open batch); the rest is back in the queue.
    assert await queue_depth(amqp, queue_name) == 100 - taken
    assert producer.stats.ack == taken
    assert not producer.ready


async def _connections(broker: Broker, name: str, exclude: set[str], wait: float) -> list[str]:
    """The broker's names of the connections with this client-provided name (the list
    can lag: connections already closed are excluded)."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        connections = await broker.api_async("GET", "connections?columns=name,client_properties")
        ours = [
            c["name"]
            for c in connections
            if c.get("client_properties", {}).get("connection_name") == name
            and c["name"] not in exclude
        ]
        if ours or asyncio.get_running_loop().time() > deadline:
            return ours
        await asyncio.sleep(0.2)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


async def _true(value: bool) -> bool:
    return value


async def test_concurrent_producers_share_the_queue_with_their_own_options(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    hooked: list[int] = []

    async def after_connect(channel: aiormq.abc.AbstractChannel) -> None:
        hooked.append(channel.number)

    handlers = Collect()
    pipeline, _producer = await make_rabbit_pipeline(
        handlers,
        concurrency=2,
        consumer_tag=f"{queue_name}-consumer",
        per_producer={1: {"consumer_tag": f"{queue_name}-second"}},
        after_connect=after_connect,
    )
    ok = await amqp.queue_declare(queue_name, passive=True)
    assert ok.consumer_count == 2
    assert len(hooked) == 2
    await publish(amqp, queue_name, *(b"c%d" % i for i in range(200)))
    await eventually(lambda: _true(len(handlers.bodies()) == 200))
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0


async def test_a_per_producer_prefetch_count_is_that_consumers_qos(
    make_rabbit_pipeline: MakeRabbitPipeline, broker: Broker, queue_name: str
) -> None:
    pipeline, _producer = await make_rabbit_pipeline(
        Collect(), concurrency=2, prefetch_count=60, per_producer={1: {"prefetch_count": 5}}
    )
    prefetches: list[int] = []

    async def both_listed() -> bool:
        # The management API lists consumers within its stats interval (~5 s).
        consumers = await broker.api_async("GET", "consumers/%2F")
        prefetches[:] = sorted(
            c["prefetch_count"] for c in consumers if c["queue"]["name"] == queue_name
        )
        return len(prefetches) == 2

    await eventually(both_listed, timeout=15)
    assert prefetches == [5, 60]
    assert pipeline.producer.prefetch == 65  # type: ignore[attr-defined]


async def test_with_no_ack_the_backlog_waits_in_the_broker_while_the_intake_is_full(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    bodies = {b"n%d" % i for i in range(3000)}
    await publish(amqp, queue_name, *bodies)
    handlers = Collect(delay=0.001)
    pipeline, producer = await make_rabbit_pipeline(handlers, no_ack=True, prefetch_count=50)
    peak = 0
    async with asyncio.timeout(40):
        while len(handlers.messages) < len(bodies):
            peak = max(peak, pipeline.in_flight)
            await asyncio.sleep(0.005)
    # The intake (50, the prefetch), the processor's demand (10), and one chunk of at most
    # the prefetch being handed over: never the backlog.
    assert peak <= 50 + 10 + 50
    assert handlers.bodies() == bodies
    assert len(handlers.messages) == len(bodies)
    assert producer.stats.consume_pauses >= 1
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0
