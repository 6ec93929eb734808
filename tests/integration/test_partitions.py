"""A partitioned notifications pipeline on the local broker, in one process: published
through the exchange by recipient, one digest per recipient, and its dead letters (one
queue per partition) shown and replayed like any pipeline's."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ingest.rabbitmq import Publisher
from pipelines.notifications import partitions_of
from tests.integration.service import call, local_service
from tests.support import Broker, eventually

TOKEN = "partitions-token"


async def test_a_partitioned_pipeline_mails_and_keeps_its_dead_letters_per_partition(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    async with local_service(
        broker,
        queue_name,
        tmp_path,
        admin_token=TOKEN,
        pipelines={
            "bookings": {"enabled": False},
            "notifications": {
                "partitions": 4,
                "batchers": {"email": {"batch_timeout": 0.5}},
            },
        },
    ) as service:
        partitions = partitions_of(service.settings)
        assert partitions is not None
        assert partitions.exchange == f"{queue_name}-notifications.hash"
        async with Publisher(broker.amqp_url) as publisher:  # the exchange exists by now
            await publisher.publish_batch(
                [
                    partitions.message(f"email,{who}".encode(), who, message_id=f"{who}-{n}")
                    for n in range(3)
                    for who in ("ana@example.com", "bob@example.com")
                ]
                + [partitions.message(b"not a notification", "eve@example.com", message_id="bad")]
            )
        outbox = tmp_path / "outbox"

        async def mailed() -> bool:
            return len(list(outbox.glob("*.eml"))) == 2  # one digest each

        await eventually(mailed, timeout=15)
        url = f"{service.http}/pipelines/notifications/dlq"

        async def dead_lettered() -> bool:
            return (await admin(url, "GET"))[1].get("total") == 1

        await eventually(dead_lettered, timeout=15)
        code, shown = await admin(url, "GET")
        assert code == 200
        [letter] = shown["dead_letters"]
        assert letter["message_id"] == "bad"
        assert letter["queue"].startswith(f"{queue_name}-notifications.p0")  # its partition
        code, replayed = await admin(url + "/replay")
        assert (code, replayed) == (200, {"replayed": 1, "skipped": 0})

        async def back_again() -> bool:  # fails once more, into its partition's dlq
            return (await admin(url, "GET"))[1].get("total") == 1

        await eventually(back_again, timeout=15)


async def admin(url: str, method: str = "POST") -> tuple[int, Any]:
    """An admin call, off the event loop the service answers on."""
    return await asyncio.to_thread(call, url, TOKEN, method)
