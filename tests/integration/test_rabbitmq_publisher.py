"""The publisher: confirms, persistence, message ids, returns, nacks, reconnect; batches
in one write or, with the fast path refused, one `basic_publish` per message."""

from __future__ import annotations

import asyncio
import urllib.parse

import aiormq
import pytest

from ingest.rabbitmq import (
    PUBLISHED_AT_HEADER,
    OutgoingMessage,
    Publisher,
    PublishError,
    Unroutable,
)
from ingest.rabbitmq._aiormq import gate
from ingest.rabbitmq.options import Backoff
from ingest.rabbitmq.queues import quorum

from .conftest import Broker, drain_queue, queue_depth


async def test_a_confirmed_publish_is_in_the_queue_persistent_with_its_message_id(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    async with Publisher(broker.amqp_url) as publisher:
        await publisher.publish_many(
            [
                OutgoingMessage(b"one", queue_name, message_id="id-1"),
                OutgoingMessage(b"two", queue_name),
            ]
        )
    taken = await drain_queue(amqp, queue_name)
    assert [m.body for m in taken] == [b"one", b"two"]
    assert taken[0].header.properties.message_id == "id-1"
    assert taken[1].header.properties.message_id  # generated
    assert {m.header.properties.delivery_mode for m in taken} == {2}


async def test_an_unroutable_message_is_an_error(broker: Broker, queue_name: str) -> None:
    async with Publisher(broker.amqp_url) as publisher:
        with pytest.raises(
            Unroutable, match=rf"no queue bound .* routing key '{queue_name}-missing'"
        ):
            await publisher.publish(OutgoingMessage(b"lost?", f"{queue_name}-missing"))


async def test_the_publisher_reconnects_after_losing_its_connection(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    publisher = Publisher(broker.amqp_url)
    await publisher.publish(OutgoingMessage(b"before", queue_name))
    assert publisher._connection is not None
    await publisher._connection.close()
    await publisher.publish(OutgoingMessage(b"after", queue_name))
    await publisher.close()
    assert [m.body for m in await drain_queue(amqp, queue_name)] == [b"before", b"after"]


async def test_an_unreachable_broker_fails_within_the_connect_timeout() -> None:
    publisher = Publisher(
        "amqp://guest:guest@127.0.0.1:1/%2F",
        backoff=Backoff("exp", min=0.05, max=0.1),
        connect_timeout=0.5,
    )
    with pytest.raises(PublishError, match=r"cannot connect to amqp://guest:\*\*\*@127\.0\.0\.1:1"):
        await publisher.publish(OutgoingMessage(b"x", "anywhere"))


async def test_a_connection_whose_declarations_fail_is_closed_before_the_next_attempt(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)  # classic
    name = f"{queue_name}-publisher"
    publisher = Publisher(
        broker.amqp_url,
        connection_name=name,
        declare_queues={queue_name: quorum(None, None)},  # refused: another type
        backoff=Backoff("exp", min=0.1, max=0.2),
        connect_timeout=2,
    )
    with pytest.raises(PublishError, match="within 2"):
        await publisher.publish(OutgoingMessage(b"x", queue_name))
    await publisher.close()

    async def open_ones() -> int:
        connections = await broker.api_async("GET", "connections?columns=client_properties")
        return sum(1 for c in connections if c["client_properties"].get("connection_name") == name)

    await asyncio.sleep(1.0)  # what a closed connection takes to leave the list
    assert await open_ones() == 0


# Batches: their frames in one write, confirmed by delivery tag (the fast path), or one
# `basic_publish` per message when the fast path is refused; the same guarantees either way.

FRAME_MAX = 131072  # the broker's default, which the publisher's connection negotiates


@pytest.fixture(params=["fast-path", "aiormq-publish"])
def publishing_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a Publisher publishes: the second with the fast path refused, as with an
    aiormq it was not written for."""
    if request.param == "aiormq-publish":
        monkeypatch.setattr(gate, "_version", lambda name: "7.3.0")
        monkeypatch.setattr(gate, "_reported", set())
    return str(request.param)


def varied_batch(queue: str, count: int) -> list[OutgoingMessage]:
    """`count` messages with every property a publisher sets, an empty body and a body
    that takes three frames among them."""
    messages = []
    for i in range(count):
        body = b"%d" % i
        if i == 3:
            body = b""
        elif i == count // 2:
            body = bytes(range(256)) * (2 * FRAME_MAX // 256 + 7)
        messages.append(
            OutgoingMessage(
                body,
                queue,
                message_id=f"id-{i}",
                content_type="application/json" if i % 2 else None,
                headers={"n": i, "kind": "é", "nested": {"odd": bool(i % 2)}} if i % 3 else None,
                correlation_id=f"c-{i}" if i % 5 == 0 else None,
            )
        )
    return messages


async def consumed(
    amqp: aiormq.abc.AbstractChannel, queue: str, count: int | None = None
) -> list[aiormq.abc.DeliveredMessage]:
    """A queue's messages (no_ack): the first `count`, or all until none came for 1 s."""
    got: list[aiormq.abc.DeliveredMessage] = []
    arrived = asyncio.Event()

    def take(message: aiormq.abc.DeliveredMessage) -> None:
        got.append(message)
        arrived.set()

    ok = await amqp.basic_consume(queue, take, no_ack=True)
    while count is None or len(got) < count:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), 1 if count is None else 5)
        except TimeoutError:
            break
    assert ok.consumer_tag is not None
    await amqp.basic_cancel(ok.consumer_tag)
    return got


async def test_a_batch_of_1000_is_confirmed_and_every_message_arrives_as_sent(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str, publishing_path: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    sent = varied_batch(queue_name, 1000)
    async with Publisher(broker.amqp_url) as publisher:
        await publisher.publish_batch(sent)
        # Confirmed means in the queue, all of it, before the publish returned.
        assert await queue_depth(amqp, queue_name) == 1000
    taken = await consumed(amqp, queue_name, 1000)
    assert [m.body for m in taken] == [m.body for m in sent]
    assert [m.header.properties.message_id for m in taken] == [m.message_id for m in sent]
    assert [m.header.properties.content_type for m in taken] == [m.content_type for m in sent]
    headers = [dict(m.header.properties.headers or {}) for m in taken]
    # The first carries its publish time (a sample for publish-to-ack latency), as an int.
    assert isinstance(headers[0].pop(PUBLISHED_AT_HEADER), int)
    assert [h or None for h in headers] == [m.headers for m in sent]
    assert [m.header.properties.correlation_id for m in taken] == [m.correlation_id for m in sent]
    assert {m.header.properties.delivery_mode for m in taken} == {2}


async def test_an_unroutable_message_fails_its_batch_and_the_others_are_confirmed(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str, publishing_path: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    await amqp.queue_bind(queue_name, "amq.direct", routing_key=queue_name)
    batch = [
        OutgoingMessage(b"%d" % i, queue_name, exchange="amq.direct", message_id=f"id-{i}")
        for i in range(10)
    ]
    batch[4] = OutgoingMessage(b"4", f"{queue_name}-missing", "amq.direct", "id-4")
    async with Publisher(broker.amqp_url) as publisher:
        with pytest.raises(
            Unroutable,
            match=rf"exchange 'amq.direct' and routing key '{queue_name}-missing' "
            r"\(message_id id-4\)$",
        ):
            await publisher.publish_batch(batch)
        assert await queue_depth(amqp, queue_name) == 9  # settled before the batch failed
        await publisher.publish_batch(batch[5:])  # the channel goes on
    taken = await drain_queue(amqp, queue_name)
    assert [m.body for m in taken] == [b"%d" % i for i in (0, 1, 2, 3, 5, 6, 7, 8, 9)] + [
        b"%d" % i for i in (5, 6, 7, 8, 9)
    ]


async def test_a_message_the_broker_nacks_fails_its_batch(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str, publishing_path: str
) -> None:
    await amqp.queue_declare(
        queue_name, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    batch = [OutgoingMessage(b"%d" % i, queue_name, message_id=f"id-{i}") for i in range(3)]
    async with Publisher(broker.amqp_url) as publisher:
        with pytest.raises(PublishError, match=r"message id-1\b.*1 other message") as raised:
            await publisher.publish_batch(batch)
    assert not isinstance(raised.value, Unroutable)
    assert [m.body for m in await drain_queue(amqp, queue_name)] == [b"0"]


async def test_a_connection_closed_by_the_broker_mid_batch_fails_it_and_a_retry_publishes_it(
    broker: Broker, amqp: aiormq.abc.AbstractChannel, queue_name: str, publishing_path: str
) -> None:
    await amqp.queue_declare(queue_name, durable=True)
    name = f"ingest-{queue_name}"
    batch = [
        OutgoingMessage(b"%06d" % i + b"." * 1000, queue_name, message_id=f"id-{i}")
        for i in range(10_000)
    ]
    async with Publisher(broker.amqp_url, connection_name=name) as publisher:
        [connection] = await connections_named(broker, name)
        publishing = asyncio.create_task(publisher.publish_batch(batch))
        await asyncio.sleep(0.01)  # written, or being written
        await broker.api_async("DELETE", f"connections/{urllib.parse.quote(connection, safe='')}")
        with pytest.raises(PublishError, match=r"not confirmed|failed"):
            await publishing
        assert await queue_depth(amqp, queue_name) < len(batch)  # closed mid-batch indeed
        await publisher.publish_batch(batch)  # reconnects
    # Every message, those the broker had taken before the close twice.
    taken = await consumed(amqp, queue_name)
    assert {m.header.properties.message_id for m in taken} == {m.message_id for m in batch}
    assert len(batch) <= len(taken) < 2 * len(batch)


async def connections_named(broker: Broker, name: str) -> list[str]:
    """The broker's names of the connections with this client-provided name (the
    management API lists a new connection within its stats interval, ~5 s)."""
    for _ in range(75):
        connections = await broker.api_async("GET", "connections?columns=name,client_properties")
        ours = [
            c["name"]
            for c in connections
            if c.get("client_properties", {}).get("connection_name") == name
        ]
        if ours:
            return ours
        await asyncio.sleep(0.2)
    raise AssertionError(f"the broker lists no connection named {name!r}")
