"""Dead letters against the real broker: `ingest dlq show` lists them with their reasons
and leaves them; `ingest dlq replay --reason` moves the matching ones back (confirmed, with
their message_id, attempts reset) and they become tickets once their cause is fixed;
`ingest dlq purge --yes` empties the queue; the HTTP endpoints do the same under the admin
token."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import pytest
from sqlalchemy import insert

from ingest.rabbitmq import ATTEMPTS_HEADER, REASON_HEADER
from ingest.rabbitmq.dead_letters import DeadLetters
from pipelines.db import users

from .conftest import Broker, eventually, queue_depth
from .service import RunningService, call, local_service, publish_from_ui, run_cli

TOKEN = "dlq-admin-token-16"


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[RunningService]:
    async with local_service(
        broker, queue_name, tmp_path, admin_token=TOKEN, queue_depth_interval=0.2
    ) as running:
        yield running


async def ingest(broker: Broker, queue_name: str, *args: str) -> tuple[int, str]:
    return await run_cli(
        *args,
        INGEST_AMQP_URL=broker.amqp_url,
        INGEST_PIPELINES__BOOKINGS__QUEUE=f"{queue_name}-bookings",
        INGEST_PIPELINES__NOTIFICATIONS__QUEUE=f"{queue_name}-notifications",
    )


async def tickets(running: RunningService) -> set[str]:
    db = running.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]
    from sqlalchemy import select

    from pipelines.db import tickets as table

    async with db.engine.connect() as connection:
        return set((await connection.execute(select(table.c.message_id))).scalars())


async def test_show_replay_and_purge_from_the_command_line(
    broker: Broker,
    queue_name: str,
    service: RunningService,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    queue = f"{queue_name}-bookings"
    dlq = f"{queue}.dlq"
    await dead_lettered(
        broker, amqp, queue, {"bad": "not a booking", "stranger": "cinema,999"}, 3, 2
    )

    code, out = await ingest(broker, queue_name, "dlq", "show", "bookings", "--reason", "unknown")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["reason", "attempts"]
    assert len(lines) == 4  # the header, two dead letters, the summary
    for line, message_id in zip(lines[1:3], ("stranger-0", "stranger-1"), strict=True):
        assert line.startswith("unknown user 999")
        assert " 1  " in line  # attempts
        assert f" {message_id} " in line
        assert line.endswith("cinema,999")
    assert lines[-1] == f"2 shown matching 'unknown', 5 in {dlq} (left there)"
    assert await queue_depth(amqp, dlq) == 5  # untouched

    # The cause is fixed (user 999 exists now); the two come back and become tickets.
    db = service.hosted["bookings"].pipeline.handlers.db  # type: ignore[attr-defined]
    async with db.engine.begin() as connection:
        await connection.execute(insert(users).values(id=999, email="new@email.com"))
    code, out = await ingest(broker, queue_name, "dlq", "replay", "bookings", "--reason", "999")
    assert code == 0, out
    assert out.strip().endswith(
        f"replayed 2 to {queue} (confirmed), 3 left in {dlq} (another reason)"
    )

    async def ticketed() -> bool:
        return {"stranger-0", "stranger-1"} <= await tickets(service)

    await eventually(ticketed, timeout=15)
    assert await queue_depth(amqp, dlq) == 3

    code, out = await ingest(broker, queue_name, "dlq", "purge", "bookings")
    assert code == 2
    assert "add --yes" in out
    code, out = await ingest(broker, queue_name, "dlq", "purge", "bookings", "--yes")
    assert (code, out.strip()) == (0, f"purged 3 dead letter(s) from {dlq}")
    assert await queue_depth(amqp, dlq) == 0


async def test_a_replayed_copy_keeps_its_id_and_body_and_starts_its_attempts_again(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    queue, dlq = f"{queue_name}-work", f"{queue_name}-work.dlq"
    await amqp.queue_declare(queue, durable=True)
    await amqp.queue_declare(dlq, durable=True)
    await amqp.basic_publish(
        b"payload",
        routing_key=dlq,
        properties=aiormq.spec.Basic.Properties(
            message_id="m-1",
            headers={REASON_HEADER: "database down", ATTEMPTS_HEADER: 5, "x-custom": "kept"},
        ),
    )
    async with DeadLetters(broker.amqp_url, queue) as dead:
        [letter] = await dead.show()
        assert (letter.reason, letter.attempts, letter.message_id) == ("database down", 5, "m-1")
        result = await dead.replay()
    assert (result.replayed, result.skipped) == (1, 0)
    copy = await amqp.basic_get(queue, no_ack=True)
    assert copy.body == b"payload"
    assert copy.header.properties.message_id == "m-1"
    assert copy.header.properties.headers == {"x-custom": "kept"}
    assert await queue_depth(amqp, dlq) == 0


async def test_the_http_endpoints_show_replay_and_purge(
    broker: Broker,
    queue_name: str,
    service: RunningService,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    queue = f"{queue_name}-bookings"
    await dead_lettered(broker, amqp, queue, {"bad": "not a booking"}, 4)

    async def exported(name: str, count: float) -> bool:
        """The queue's series is there, with this count."""
        _, text = await service.get_async("/metrics")
        series = f'ingest_queue_messages{{pipeline="bookings",queue="{name}",state="ready"}}'
        return f"{series} {float(count)}" in text.splitlines()

    # The depths of its work, retry and dead-letter queues, next to the service's metrics.
    # One reading goes through the queues in turn: a message still in the work queue when
    # it was read can be in the dead-letter queue when that is read, so each is waited for.
    await eventually(lambda: exported(f"{queue}.dlq", 4), timeout=10)
    for empty in (queue, f"{queue}.retry.1000ms", f"{queue}.retry.30000ms"):
        await eventually(functools.partial(exported, empty, 0), timeout=10)
    base = f"{service.http}/pipelines/bookings/dlq"
    status, body = await asyncio.to_thread(call, f"{base}?limit=2", TOKEN, "GET")
    assert status == 200
    assert body["total"] == 4
    assert [row["message_id"] for row in body["dead_letters"]] == ["bad-0", "bad-1"]
    assert body["dead_letters"][0]["payload"] == "not a booking"
    assert (await asyncio.to_thread(call, f"{base}?limit=zero", TOKEN, "GET"))[0] == 400
    status, body = await asyncio.to_thread(call, f"{base}/replay?limit=1", TOKEN)
    assert (status, body) == (200, {"replayed": 1, "skipped": 0})
    # The replayed one fails again (still not a booking) and is dead-lettered again.
    await eventually(lambda: _depth_is(amqp, f"{queue}.dlq", 4), timeout=15)
    status, body = await asyncio.to_thread(call, f"{base}/purge", TOKEN)
    assert (status, body) == (200, {"purged": 4})


async def dead_lettered(
    broker: Broker,
    amqp: aiormq.abc.AbstractChannel,
    queue: str,
    payloads: dict[str, str],
    *counts: int,
) -> None:
    """Publish, as a person does in the management UI, `counts[i]` messages of each
    payload (message ids `<name>-<n>`) that the service dead-letters, and wait until they
    are all in `<queue>.dlq`."""
    for (name, payload), count in zip(payloads.items(), counts, strict=True):
        for n in range(count):
            publish_from_ui(broker, queue, payload, f"{name}-{n}")
    await eventually(lambda: _depth_is(amqp, f"{queue}.dlq", sum(counts)), timeout=15)


async def _depth_is(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    return await queue_depth(channel, queue) == count


async def test_show_lists_the_oldest_first_the_same_every_time(
    broker: Broker, queue_name: str, amqp: aiormq.abc.AbstractChannel
) -> None:
    """A quorum `.dlq` puts back what `show` took in an order of its own: `show` lists by
    when each failed, so looking twice gives the same list, and looking costs nothing."""
    queue = f"{queue_name}-ordered"
    dlq = f"{queue}.dlq"
    await amqp.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    failed_at = 1_764_000_000
    for n in range(300):  # published newest first: the queue's order is not the age's
        await amqp.basic_publish(
            f"payload {n}".encode(),
            routing_key=dlq,
            properties=aiormq.spec.Basic.Properties(
                message_id=f"m-{n:03d}",
                headers={REASON_HEADER: "database down", "x-ingest-failed-at": failed_at - n},
            ),
        )
    await eventually(lambda: _depth_is(amqp, dlq, 300), timeout=15)
    oldest = [f"m-{n:03d}" for n in range(299, 279, -1)]
    async with DeadLetters(broker.amqp_url, queue) as dead:
        for _ in range(3):
            shown = await dead.show(limit=20)
            assert [letter.message_id for letter in shown] == oldest
            assert [letter.failed_at.timestamp() for letter in shown if letter.failed_at] == [
                failed_at - n for n in range(299, 279, -1)
            ]

        async def all_back() -> bool:
            return await dead.count() == 300

        # A quorum queue counts what a closed channel returned a few seconds late (it
        # failed CI once read at once: 0); all 300 must come back, none lost.
        await eventually(all_back, timeout=15)
    await amqp.queue_delete(dlq)
