"""The publisher: confirms, persistence, message ids, returns, reconnect."""

from __future__ import annotations

import aiormq
import pytest

from ingest.rabbitmq import OutgoingMessage, Publisher, PublishError, Unroutable
from ingest.rabbitmq.options import Backoff

from .conftest import Broker, drain_queue


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
