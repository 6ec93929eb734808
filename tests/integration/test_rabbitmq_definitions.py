"""The compose broker's definitions, imported into a real RabbitMQ: the user can log in
with the password from .env and the queues are there as the pipelines declare them."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from pathlib import Path

import aiormq

from ingest.rabbitmq.definitions import password_hash, with_user
from ingest.rabbitmq.queues import quorum
from ingest.service.settings import Settings

from .conftest import Broker

ROOT = Path(__file__).resolve().parents[2]


def test_the_password_hash_is_rabbitmqs() -> None:
    # A known vector: salt 908DC60A, password "test12".
    assert password_hash("test12", bytes.fromhex("908DC60A")) == (
        "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    )


async def test_imported_definitions_give_a_working_user_and_the_queues(broker: Broker) -> None:
    vhost = f"test-{uuid.uuid4().hex[:8]}"
    user, password = f"user-{vhost}", "s3cret-from-env"
    template = json.loads((ROOT / "config" / "rabbitmq" / "definitions.json").read_text())
    template["vhosts"] = [{"name": vhost}]
    for queue in template["queues"]:
        queue["vhost"] = vhost
    await broker.api_async("POST", "definitions", with_user(template, user, password))
    try:
        url = urllib.parse.urlsplit(broker.amqp_url)
        host = f"{url.hostname}:{url.port or 5672}"
        quoted = urllib.parse.quote(vhost, safe="")
        connection = await aiormq.connect(f"amqp://{user}:{password}@{host}/{quoted}")
        channel = await connection.channel()
        # As the service declares them (quorum): the same arguments, so no error.
        bookings = quorum("bookings_queue.dlq", Settings().pipeline("bookings").delivery_limit)
        ok = await channel.queue_declare(
            "bookings_queue", durable=True, arguments=dict(bookings.arguments)
        )
        assert ok.message_count == 0
        await channel.queue_declare(
            "bookings_queue.dlq", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.queue_declare(
            "bookings_queue.retry.1000ms",
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": "bookings_queue",
            },
        )
        await connection.close()
    finally:
        await broker.api_async("DELETE", f"vhosts/{urllib.parse.quote(vhost, safe='')}")
        await broker.api_async("DELETE", f"users/{urllib.parse.quote(user, safe='')}")
