"""The tickets service end to end: bookings published through the management API, the
real broker, database and SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiormq
import pytest

from ingest.rabbitmq import REASON_HEADER
from pipelines.db import Database
from tests.support import postgres_through_a_proxy

from .conftest import Broker, drain_queue, eventually, queue_depth
from .service import (
    Inbox,
    RunningService,
    metric,
    publish_from_ui,
    running_service,
    tickets_service,
)


@pytest.fixture
def queues(queue_name: str) -> dict[str, str]:
    return {"bookings": f"{queue_name}-bookings", "notifications": f"{queue_name}-notifications"}


@pytest.fixture
async def service(
    broker: Broker, queues: dict[str, str], database_url: str
) -> AsyncIterator[tuple[RunningService, Inbox]]:
    async with tickets_service(broker, queues, database_url) as running:
        yield running


async def tickets(running: RunningService) -> list[tuple[str, int, str]]:
    db = running.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]
    from sqlalchemy import select

    from pipelines.db import tickets as table

    async with db.engine.connect() as connection:
        rows = await connection.execute(select(table.c.message_id, table.c.user_id, table.c.event))
        return sorted((r.message_id, r.user_id, r.event) for r in rows)


async def test_bookings_become_tickets_and_one_digest_per_recipient(
    broker: Broker, queues: dict[str, str], service: tuple[RunningService, Inbox]
) -> None:
    running, inbox = service
    bookings = [
        ("musical,1", "b-1"),
        ("cinema,1", "b-2"),
        ('{"event": "comedy", "user_id": 2}', "b-3"),
    ]
    for payload, message_id in bookings:
        assert publish_from_ui(broker, queues["bookings"], payload, message_id)
    await eventually(lambda: _len_is(tickets(running), 3), timeout=15)
    assert await tickets(running) == [
        ("b-1", 1, "musical"),
        ("b-2", 1, "cinema"),
        ("b-3", 2, "comedy"),
    ]
    await eventually(lambda: _true(len(inbox.messages) == 2), timeout=15)
    [foo] = inbox.to("foo@email.com")
    [bar] = inbox.to("bar@email.com")
    assert foo["Subject"] == "Your 2 ticket notifications"
    assert "your musical ticket is booked (ref b-1/notification)" in foo.get_payload()
    assert "your cinema ticket is booked (ref b-2/notification)" in foo.get_payload()
    assert "your comedy ticket is booked" in bar.get_payload()


async def test_a_redelivered_booking_makes_no_second_ticket_and_no_second_notification(
    broker: Broker, queues: dict[str, str], service: tuple[RunningService, Inbox]
) -> None:
    running, inbox = service
    for _ in range(3):
        publish_from_ui(broker, queues["bookings"], "cinema,3", "same-id")
    publish_from_ui(broker, queues["bookings"], "cinema,3", "other-id")
    await eventually(lambda: _processed(running, "bookings", 4), timeout=15)
    await eventually(lambda: _processed(running, "notifications", 4), timeout=15)
    assert [t[0] for t in await tickets(running)] == ["other-id", "same-id"]

    def body() -> str:
        return "".join(d.get_payload() for d in inbox.to("baz@email.com"))

    # Acknowledged once stored: the digests follow within their window (0.5 s).
    await eventually(
        lambda: _true(all(f"{b}/notification" in body() for b in ("same-id", "other-id"))),
        timeout=15,
    )
    await asyncio.sleep(1.5)  # a second digest with a copy would be there by now
    assert body().count("same-id/notification") == 1
    assert body().count("other-id/notification") == 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("spectaculars,1", "bookings-closed"),
        ("cinema", "expected 'event,user_id', got 1 fields"),
        ("cinema,abc", "user_id must be a positive integer"),
        ('{"event": "cinema"', "invalid JSON: Expecting ',' delimiter at position 18"),
        ('["cinema", 1]', "JSON payload must be an object with event and user_id"),
        ("cinema,99", "unknown user 99"),
        ("", "empty payload"),
    ],
    ids=[
        "closed-event",
        "one-field",
        "bad-user-id",
        "broken-json",
        "json-array",
        "unknown-user",
        "empty",
    ],
)
async def test_bad_bookings_are_dead_lettered_with_their_reason(
    broker: Broker,
    queues: dict[str, str],
    service: tuple[RunningService, Inbox],
    amqp: aiormq.abc.AbstractChannel,
    payload: str,
    reason: str,
) -> None:
    running, _ = service
    publish_from_ui(broker, queues["bookings"], payload, "bad-1")
    dlq = f"{queues['bookings']}.dlq"
    await eventually(lambda: _depth(amqp, dlq, 1), timeout=15)
    [dead] = await drain_queue(amqp, dlq)
    assert dead.header.properties.headers[REASON_HEADER] == reason
    assert dead.header.properties.message_id == "bad-1"
    assert await tickets(running) == []


async def test_the_metrics_move(
    broker: Broker, queues: dict[str, str], service: tuple[RunningService, Inbox]
) -> None:
    running, _ = service
    publish_from_ui(broker, queues["bookings"], "cinema,1", "m-1")
    publish_from_ui(broker, queues["bookings"], "nonsense", "m-2")
    await eventually(lambda: _processed(running, "notifications", 1), timeout=15)
    status, text = await running.get_async("/metrics")
    assert status == 200
    assert metric(text, "ingest_messages_received_total", pipeline="bookings") == 2
    assert (
        metric(text, "ingest_messages_processed_total", pipeline="bookings", status="successful")
        == 1
    )
    assert (
        metric(text, "ingest_messages_processed_total", pipeline="bookings", status="failed") == 1
    )
    assert metric(text, "ingest_acks_total", pipeline="bookings", action="dead_letter") == 1
    assert (
        metric(
            text, "ingest_batches_total", pipeline="bookings", batcher="cinema", trigger="timeout"
        )
        == 1
    )
    assert metric(text, "ingest_batch_size_count", pipeline="bookings", batcher="cinema") == 1
    assert metric(text, "ingest_handle_message_seconds_count", pipeline="bookings") == 1
    assert metric(text, "ingest_broker_connected", pipeline="bookings") == 1
    assert metric(text, "ingest_in_flight_messages", pipeline="bookings") == 0


async def test_health_and_readiness(service: tuple[RunningService, Inbox]) -> None:
    running, _ = service
    assert await running.get_async("/healthz") == (200, "ok\n")
    status, body = await running.get_async("/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": {"bookings": True, "notifications": True}}
    assert (await running.get_async("/nope"))[0] == 404


async def _processed(running: RunningService, pipeline: str, count: int) -> bool:
    _, text = await running.get_async("/metrics")
    done = sum(
        metric(text, "ingest_messages_processed_total", pipeline=pipeline, status=status)
        for status in ("successful", "failed")
    )
    return done >= count


async def _len_is(rows: Any, count: int) -> bool:
    return len(await rows) == count


async def _depth(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    return await queue_depth(channel, queue) == count


async def _true(value: bool) -> bool:
    await asyncio.sleep(0)
    return value


def quick_retries(
    broker: Broker, queues: dict[str, str], database_url: str, tmp_path: Any
) -> AbstractAsyncContextManager[RunningService]:
    """The service with bookings retried every 0.3 s (20 attempts) and an outbox."""
    return running_service(
        amqp_url=broker.amqp_url,
        database_url=database_url,
        mail_outbox=tmp_path / "outbox",
        pipelines={
            "bookings": {
                "queue": queues["bookings"],
                "retry_delays": [0.3],
                "retry_max_attempts": 20,
            },
            "notifications": {
                "queue": queues["notifications"],
                "batchers": {"email": {"batch_timeout": 0.2}},
            },
        },
    )


@pytest.fixture
async def quick_retry_service(
    broker: Broker, queues: dict[str, str], database_url: str, tmp_path: Any
) -> AsyncIterator[RunningService]:
    async with quick_retries(broker, queues, database_url, tmp_path) as running:
        yield running


async def test_a_database_outage_is_retried_with_delay_until_it_ends(
    broker: Broker, queues: dict[str, str], quick_retry_service: RunningService, tmp_path: Any
) -> None:
    from sqlalchemy import text

    running = quick_retry_service
    engine = running.hosted["bookings"].pipeline.handlers.db.engine  # type: ignore[attr-defined]
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE tickets RENAME TO tickets_away"))
    publish_from_ui(broker, queues["bookings"], "cinema,2", "outage-1")
    await eventually(lambda: _retried(running, 2), timeout=15)
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE tickets_away RENAME TO tickets"))
    await eventually(lambda: _len_is(tickets(running), 1), timeout=15)
    assert await tickets(running) == [("outage-1", 2, "cinema")]
    # The default mailer writes the digest to the outbox directory.
    await eventually(lambda: _true(len(list((tmp_path / "outbox").glob("*.eml"))) == 1), timeout=10)
    [email] = (tmp_path / "outbox").glob("*.eml")
    assert b"To: bar@email.com" in email.read_bytes()


async def test_a_database_server_going_away_is_retried_until_it_returns(
    broker: Broker, queues: dict[str, str], database_url: str, tmp_path: Any
) -> None:
    """The connection-level outage: PostgreSQL refuses connections and the pooled ones
    are cut (through a proxy), then it comes back. The pool reconnects; nothing is lost."""
    proxy, proxied = await postgres_through_a_proxy(database_url)
    async with quick_retries(broker, queues, proxied, tmp_path) as running:
        direct = Database(database_url)  # the test's own view, not through the proxy

        async def ticketed(count: int) -> bool:
            return await direct.count_tickets() == count

        try:
            publish_from_ui(broker, queues["bookings"], "cinema,1", "before")
            await eventually(lambda: ticketed(1), timeout=15)
            await proxy.cut()
            publish_from_ui(broker, queues["bookings"], "musical,2", "during")
            await eventually(lambda: _retried(running, 2), timeout=15)
            assert await ticketed(1)
            await proxy.resume()
            await eventually(lambda: ticketed(2), timeout=30)
            assert sorted(await tickets(running)) == [
                ("before", 1, "cinema"),
                ("during", 2, "musical"),
            ]
        finally:
            await direct.close()
    await proxy.cut()


async def _retried(running: RunningService, count: int) -> bool:
    _, text = await running.get_async("/metrics")
    return metric(text, "ingest_acks_total", pipeline="bookings", action="retry") >= count


async def test_a_broker_down_at_start_up_is_waited_for_with_readiness_false(
    database_url: str, tmp_path: Any
) -> None:
    from ingest.service.hosting import build, serve
    from ingest.service.settings import Settings
    from tests.support import free_port

    settings = Settings(
        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",
        database_url=database_url,
        mail_outbox=tmp_path / "outbox",
        http_host="127.0.0.1",
        http_port=free_port(),
    )
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(settings, build(settings), stop=stop, started=started))
    await asyncio.wait_for(started.wait(), 20)
    running = RunningService(settings, {}, stop, task)
    await asyncio.sleep(1.5)  # a few reconnect attempts
    assert not task.done()
    assert (await running.get_async("/healthz"))[0] == 200
    status, body = await running.get_async("/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": {"bookings": False, "notifications": False},
        "not_ready": {
            "bookings": "not consuming: no broker connection",
            "notifications": "not consuming: no broker connection",
        },
    }
    stop.set()
    await asyncio.wait_for(task, 30)
