"""Faults in the middle of a load — SIGTERM, SIGKILL, connections closed by the broker,
a broker restart, the mail server and the database going away, the database server cut
off for longer than every retry and every open delay of the circuit breaker — and the
ledger after: every booking has exactly one ticket and its notification, and the queues
(dead-letter queues included) are empty."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import urllib.parse
import uuid

import pytest

from tests.integration.service import SmtpServer
from tests.reliability.harness import (
    CLEAN,
    SCALE,
    BaseLedger,
    Ledger,
    PostgresLedger,
    ServiceProcess,
    publish_bookings,
    record_outcome,
    scaled,
    settle,
    wait_for,
)
from tests.support import Broker, postgres_through_a_proxy


def booking_ids(count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{run}-{i}" for i in range(count)]


async def until_tickets(
    service: ServiceProcess, count: int, ledger: BaseLedger | None = None
) -> None:
    ledger = ledger or Ledger(service.database)

    async def enough() -> bool:
        return await ledger.tickets() >= count

    await wait_for(enough, 120, f"{count} tickets")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_signals_in_the_middle_of_a_load_lose_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer, signum: int
) -> None:
    ids = booking_ids(scaled(3000))
    await publish_bookings(broker, service.bookings_queue, ids)
    await service.start()
    exits: list[tuple[int, float]] = []
    for round_ in range(1, 4):
        await until_tickets(service, len(ids) * round_ // 5)
        exits.append(await service.stop(signum))
        await service.start()
    restarted = time.monotonic()
    outcome = await settle(service, broker, ids)
    recovery = time.monotonic() - restarted
    if signum == signal.SIGTERM:
        # A drain: status 0, well within the 20 s shutdown timeout.
        assert all(code == 0 and seconds < 20 for code, seconds in exits), exits
    else:
        assert all(code == -signal.SIGKILL for code, _ in exits)
    assert outcome == CLEAN
    record_outcome(
        f"{signal.Signals(signum).name} x3 mid-load",
        f"3 x {signal.Signals(signum).name}, restarted",
        ids,
        outcome,
        smtp.inbox,
        recovery,
        service,
    )


async def test_connections_closed_by_the_broker_lose_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer
) -> None:
    ids = booking_ids(scaled(3000))
    await service.start()
    await publish_bookings(broker, service.bookings_queue, ids)
    readiness: list[bool] = []
    closed: set[str] = set()
    for round_ in range(1, 4):
        await until_tickets(service, len(ids) * round_ // 5)
        assert service.process is not None
        names = await _service_connections(broker, service.process.pid, closed)
        for name in names:
            await broker.api_async("DELETE", f"connections/{urllib.parse.quote(name, safe='')}")
        closed.update(names)

        async def not_ready() -> bool:
            return not await service.ready()

        await wait_for(not_ready, 10, "readiness false")
        readiness.append(False)
        await wait_for(service.ready, 30, "readiness true again")
        readiness.append(True)
    restarted = time.monotonic()
    outcome = await settle(service, broker, ids)
    assert readiness == [False, True] * 3
    assert outcome == CLEAN
    record_outcome(
        "connections closed by the broker",
        "3 x the service's connections closed (management API)",
        ids,
        outcome,
        smtp.inbox,
        time.monotonic() - restarted,
        service,
    )


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs the local broker's rabbitmqctl"
)
async def test_a_broker_restart_loses_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer
) -> None:
    if not broker.amqp_url.startswith("amqp://guest:guest@127.0.0.1:5672"):
        pytest.skip("restarts only the local broker")
    ids = booking_ids(scaled(3000))
    await service.start()
    await publish_bookings(broker, service.bookings_queue, ids)
    await until_tickets(service, len(ids) // 4)
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "stop_app"], check=True)
    stopped = time.monotonic()
    try:
        await asyncio.sleep(2)
        assert not await service.ready()
        assert await service.alive()
    finally:
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "start_app"], check=True)
        await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", "await_startup"], check=True)
        # The management API answers a little after the broker: the teardown and the next
        # tests need it.
        await wait_for(broker.answers, 60, "the management API after the restart")
    await wait_for(service.ready, 60, "readiness after the broker restart")
    outcome = await settle(service, broker, ids)
    assert outcome == CLEAN
    record_outcome(
        "broker restart",
        "rabbitmqctl stop_app, 2 s, start_app",
        ids,
        outcome,
        smtp.inbox,
        time.monotonic() - stopped,
        service,
    )


async def test_the_mail_server_and_the_database_going_away_lose_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer
) -> None:
    ids = booking_ids(scaled(2000))
    await service.start()
    await publish_bookings(broker, service.bookings_queue, ids[: len(ids) // 2])
    await until_tickets(service, len(ids) // 4)
    # The mail server goes away: digests fail and are retried with delay.
    smtp.stop()
    await asyncio.sleep(2)
    # The database goes away too: tickets cannot be inserted; bookings are retried.
    await asyncio.to_thread(_block_database, service.database)
    await publish_bookings(broker, service.bookings_queue, ids[len(ids) // 2 :])
    await asyncio.sleep(2)
    assert await service.alive()
    await asyncio.to_thread(_unblock_database, service.database)
    smtp.start()
    restored = time.monotonic()
    outcome = await settle(service, broker, ids)
    assert outcome == CLEAN
    record_outcome(
        "mail server and database down",
        "SMTP server stopped 4 s; tickets table gone 2 s",
        ids,
        outcome,
        smtp.inbox,
        time.monotonic() - restored,
        service,
    )


async def test_a_database_outage_longer_than_every_retry_dead_letters_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer
) -> None:
    """The tickets table gone for 20 s, six times the whole retry schedule (3 attempts,
    3.5 s), with bookings arriving: the circuit breaker opens and holds the backlog in the
    work queue; nothing is dead-lettered (settle() checks the dead-letter queues)."""
    service.extra.update(
        {
            "INGEST_PIPELINES__BOOKINGS__RETRY_MAX_ATTEMPTS": "3",
            "INGEST_PIPELINES__BOOKINGS__CIRCUIT_BREAKER__OPEN_DELAY": "1",
            "INGEST_PIPELINES__BOOKINGS__CIRCUIT_BREAKER__MAX_OPEN_DELAY": "4",
        }
    )
    ids = booking_ids(scaled(3000))
    await service.start()
    await publish_bookings(broker, service.bookings_queue, ids[: len(ids) // 3])
    await until_tickets(service, len(ids) // 6)
    await asyncio.to_thread(_block_database, service.database)
    await publish_bookings(broker, service.bookings_queue, ids[len(ids) // 3 :])

    await wait_for(lambda: circuit_is(service, OPEN), 30, "the circuit to open")
    await asyncio.sleep(OUTAGE_S)
    assert await service.alive()
    await asyncio.to_thread(_unblock_database, service.database)
    restored = time.monotonic()
    outcome = await settle(service, broker, ids)
    assert outcome == CLEAN
    record_outcome(
        "database down longer than the retries",
        f"tickets table gone {OUTAGE_S:g} s (retry schedule 3.5 s, 3 attempts)",
        ids,
        outcome,
        smtp.inbox,
        time.monotonic() - restored,
        service,
    )


OUTAGE_S = 20.0
# Longer than the whole retry schedule (3.5 s) twenty times over, and than the circuit
# breaker's longest open delay: it probes again and again while the server is away.
LONG_OUTAGE_S = 75.0
OPEN = 2  # ingest_circuit_state: 0 closed, 1 half-open, 2 open


@pytest.mark.timeout(150 + 90 * SCALE)
async def test_a_database_server_cut_off_for_over_a_minute_dead_letters_nothing(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer, database_url: str
) -> None:
    """PostgreSQL cut off by a TCP proxy for 75 s with bookings arriving, the bookings'
    retries 3 attempts over 3.5 s: the circuit opens and probes every 1, 2, 4, 4 ... s with
    a few bookings, which fail and go back to the queue without counting an attempt or a
    delivery, until the server answers again. Nothing is dead-lettered, lost or ticketed
    twice (settle() checks the dead-letter queues)."""
    proxy, proxied = await postgres_through_a_proxy(database_url)
    ledger = PostgresLedger(database_url)
    service.database_url = proxied
    service.extra.update(
        {
            "INGEST_PIPELINES__BOOKINGS__RETRY_MAX_ATTEMPTS": "3",
            "INGEST_PIPELINES__BOOKINGS__CIRCUIT_BREAKER__OPEN_DELAY": "1",
            "INGEST_PIPELINES__BOOKINGS__CIRCUIT_BREAKER__MAX_OPEN_DELAY": "4",
        }
    )
    ids = booking_ids(scaled(3000))
    try:
        await service.start()
        await publish_bookings(broker, service.bookings_queue, ids[: len(ids) // 3])
        await until_tickets(service, len(ids) // 6, ledger)
        await proxy.cut()
        await publish_bookings(broker, service.bookings_queue, ids[len(ids) // 3 :])
        await wait_for(lambda: circuit_is(service, OPEN), 30, "the circuit to open")
        await asyncio.sleep(LONG_OUTAGE_S)
        assert await service.alive()
        assert await ledger.tickets() < len(ids)
        await proxy.resume()
        restored = time.monotonic()
        outcome = await settle(service, broker, ids, ledger=ledger)
    finally:
        await proxy.cut()
    assert outcome == CLEAN
    record_outcome(
        "database server cut off for over a minute",
        f"PostgreSQL behind a TCP proxy cut {LONG_OUTAGE_S:g} s (retry schedule 3.5 s, 3 attempts)",
        ids,
        outcome,
        smtp.inbox,
        time.monotonic() - restored,
        service,
    )


async def circuit_is(service: ServiceProcess, state: int) -> bool:
    """Whether the bookings' circuit breaker is in `state`, as /metrics says."""
    _, text = await service.get("/metrics")
    return f'ingest_circuit_state{{pipeline="bookings"}} {float(state)}' in text


def _block_database(path: object) -> None:
    import sqlite3

    with sqlite3.connect(str(path), timeout=10) as db:
        db.execute("ALTER TABLE tickets RENAME TO tickets_away")


def _unblock_database(path: object) -> None:
    import sqlite3

    with sqlite3.connect(str(path), timeout=10) as db:
        db.execute("ALTER TABLE tickets_away RENAME TO tickets")


async def _service_connections(broker: Broker, pid: int, exclude: set[str]) -> list[str]:
    """The service's connections, once the management API lists both consumers'."""
    for _ in range(150):
        connections = await broker.api_async("GET", "connections?columns=name,client_properties")
        ours = {
            c["name"]: str(c.get("client_properties", {}).get("connection_name", ""))
            for c in connections
            if str(c.get("client_properties", {}).get("connection_name", "")).endswith(
                f"pid {pid})"
            )
            and c["name"] not in exclude
        }
        roles = {name.split(" ")[0] for name in ours.values()}
        if {"ingest-bookings", "ingest-notifications"} <= roles:
            return list(ours)
        await asyncio.sleep(0.2)
    raise AssertionError("the service's connections never appeared in the management API")
