"""Poison and fuzz: thousands of bad payloads (random bytes, invalid UTF-8, empty, over the
size limit, JSON of the wrong shape, unknown users) mixed with valid bookings. Each bad one
ends in the dead-letter queue with its reason, once; the valid ones become tickets; the
service stays up."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aiormq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.service import SmtpServer
from tests.reliability.harness import (
    Ledger,
    Result,
    ServiceProcess,
    duplicate_emails,
    record,
    scaled,
    wait_for,
)
from tests.support import Broker, drain_queue, queue_depth

LIMIT = 65536

valid = st.builds(
    lambda event, user, as_json: (
        json.dumps({"event": event, "user_id": user}) if as_json else f"{event},{user}"
    ).encode(),
    st.sampled_from(["cinema", "musical", "comedy", "opera"]),
    st.integers(1, 3),
    st.booleans(),
)
# (payload, what must become of it): None, a ticket; a text, dead-lettered with a reason
# that contains it ("" for any reason); "?", either (random bytes may spell a booking).
cases = st.one_of(
    valid.map(lambda body: (body, None)),
    st.binary(max_size=300).map(lambda body: (body, "?")),
    st.binary(max_size=100).map(lambda body: (b"\xff" + body, "payload is not valid UTF-8")),
    st.sampled_from([b"", b"   ", b"\n\t"]).map(lambda body: (body, "empty payload")),
    st.integers(LIMIT + 1, LIMIT + 5000).map(lambda n: (b"x" * n, "exceeds the limit")),
    st.one_of(
        st.lists(st.integers(), max_size=5),
        st.dictionaries(st.sampled_from(["event", "user", "id"]), st.integers(), max_size=2),
        st.integers(),
    ).map(lambda value: (json.dumps(value).encode(), "")),
    st.integers(4, 10**9).map(lambda user: (f"cinema,{user}".encode(), f"unknown user {user}")),
)


@settings(
    max_examples=scaled(3),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(batch=st.lists(cases, min_size=500, max_size=500))
async def test_bad_payloads_are_dead_lettered_once_with_their_reason(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer, batch: list[tuple[bytes, str | None]]
) -> None:
    if service.process is None:
        await service.start()
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    expected = {f"{run}-{i}": reason for i, (_, reason) in enumerate(batch)}
    connection = await aiormq.connect(broker.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    for (body, _), message_id in zip(batch, expected, strict=True):
        await channel.basic_publish(
            body,
            routing_key=service.bookings_queue,
            properties=aiormq.spec.Basic.Properties(delivery_mode=2, message_id=message_id),
        )
    ledger = Ledger(service.database)
    dlq = f"{service.bookings_queue}.dlq"

    async def accounted() -> bool:
        tickets = sum(1 for t in await ledger.ticket_ids() if t.startswith(run))
        return tickets + await queue_depth(channel, dlq) >= len(batch)

    await wait_for(accounted, 60, "every payload accounted for")
    dead = {m.header.properties.message_id: m for m in await drain_queue(channel, dlq)}
    ticketed = [t for t in await ledger.ticket_ids() if t.startswith(run)]
    tickets = set(ticketed)
    assert len(ticketed) == len(tickets), "a booking ticketed twice"
    assert await queue_depth(channel, service.bookings_queue) == 0
    await connection.close()
    assert not tickets & set(dead), "a booking both ticketed and dead-lettered"
    assert tickets | set(dead) == set(expected), "lost"
    for message_id, reason in expected.items():
        if reason is None:
            assert message_id in tickets, message_id
        elif reason != "?":
            assert message_id in dead, message_id
            assert reason in _header(dead[message_id], "x-ingest-reason")
    for message in dead.values():
        assert _header(message, "x-ingest-reason")
        assert message.header.properties.headers["x-ingest-attempts"] == 1  # never retried
    assert await service.alive()
    record(
        Result(
            "poison and fuzz (hypothesis)",
            len(batch),
            "random bytes, invalid UTF-8, empty, oversized, wrong-shape JSON, unknown users",
            len(set(expected) - tickets - set(dead)),
            len(ticketed) - len(tickets),
            duplicate_emails(smtp.inbox),
            round(time.monotonic() - started, 1),
            round(service.peak_rss_mb, 1),
        )
    )


def _header(message: Any, name: str) -> str:
    value = message.header.properties.headers.get(name)
    return value.decode() if isinstance(value, bytes) else str(value or "")
