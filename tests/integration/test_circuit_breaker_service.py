"""The circuit breaker in the service: PostgreSQL cut off (through a TCP proxy) for much
longer than the whole retry schedule, during a load. The circuit opens, consuming stops,
what raised meanwhile is released (a copy at the tail of the queue) without counting an
attempt or a delivery; half-open, it probes with a few bookings; when the database is back
every booking becomes exactly one ticket, nothing is dead-lettered and the retry queues are
empty."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiormq

from ingest.rabbitmq.acknowledger import retry_queue_name
from pipelines.db import Database
from tests.support import postgres_through_a_proxy

from .conftest import Broker, eventually, queue_depth
from .service import metric, publish_from_ui, running_service

BOOKINGS = 600
RETRY_DELAYS = [0.5, 1.0, 2.0]  # the whole schedule: 3.5 s
OUTAGE_S = 20.0


async def test_a_database_outage_longer_than_the_retries_dead_letters_nothing(
    broker: Broker,
    queue_name: str,
    database_url: str,
    tmp_path: Any,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    proxy, proxied = await postgres_through_a_proxy(database_url)
    queue = f"{queue_name}-bookings"
    direct = Database(database_url)  # the test's own view, not through the proxy
    try:
        async with running_service(
            amqp_url=broker.amqp_url,
            database_url=proxied,
            mail_outbox=tmp_path / "outbox",
            pipelines={
                "bookings": {
                    "queue": queue,
                    "retry_delays": RETRY_DELAYS,
                    "retry_max_attempts": len(RETRY_DELAYS) + 1,
                    "circuit_breaker": {"open_delay": 1.0, "max_open_delay": 4.0},
                },
                "notifications": {"queue": f"{queue_name}-notifications"},
            },
        ) as running:
            for n in range(BOOKINGS // 2):
                publish_from_ui(broker, queue, f"cinema,{n % 3 + 1}", f"before-{n}")
            await proxy.cut()
            for n in range(BOOKINGS // 2):
                publish_from_ui(broker, queue, f"musical,{n % 3 + 1}", f"during-{n}")

            async def circuit_is(state: float) -> bool:
                _, text = await running.get_async("/metrics")
                return metric(text, "ingest_circuit_state", pipeline="bookings") == state

            await eventually(lambda: circuit_is(2), timeout=15)
            status, body = await running.get_async("/readyz")
            assert status == 503
            assert json.loads(body)["not_ready"]["bookings"] == "circuit open"
            await asyncio.sleep(OUTAGE_S)
            assert await direct.count_tickets() < BOOKINGS
            await proxy.resume()

            async def all_ticketed() -> bool:
                return await direct.count_tickets() == BOOKINGS

            await eventually(all_ticketed, timeout=60)
            await eventually(lambda: circuit_is(0), timeout=30)
            _, text = await running.get_async("/metrics")
            assert metric(text, "ingest_acks_total", pipeline="bookings", action="dead_letter") == 0
            assert metric(text, "ingest_acks_total", pipeline="bookings", action="release") > 0
            assert (
                metric(text, "ingest_acks_total", pipeline="bookings", action="reject_and_requeue")
                == 0
            )
            assert await queue_depth(amqp, f"{queue}.dlq") == 0
            for delay in RETRY_DELAYS:
                assert await queue_depth(amqp, retry_queue_name(queue, delay)) == 0
            assert await queue_depth(amqp, queue) == 0
        assert await direct.count_tickets() == BOOKINGS  # exactly once: message_id is unique
    finally:
        await direct.close()
        await proxy.cut()
