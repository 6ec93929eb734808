"""The reliability harness: the real service as a subprocess, the load, the ledger that
says what was lost or duplicated, and the report the figures go to."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
from sqlalchemy.engine import make_url

from ingest.rabbitmq.acknowledger import retry_queue_name
from ingest.service.settings import PipelineSettings
from tests.support import Broker, free_port, queue_depth

SCALE = float(os.environ.get("INGEST_RELIABILITY_SCALE", "1"))
REPORT = os.environ.get("INGEST_RELIABILITY_REPORT")
RETRY_DELAYS = (0.5, 1, 2)  # seconds; the service's retry queues hold a message this long


def scaled(count: int) -> int:
    """The CI count, times INGEST_RELIABILITY_SCALE (bench/reliability.py raises it)."""
    return max(1, int(count * SCALE))


@dataclass
class Result:
    scenario: str
    messages: int
    faults: str
    lost: int
    duplicate_tickets: int
    duplicate_emails: int
    recovery_s: float
    peak_rss_mb: float


@dataclass
class Outcome:
    """What the ledger and the queues say once a run has settled (see `settle`)."""

    lost: int
    duplicate_tickets: int
    unexpected_tickets: int
    left_in_queues: dict[str, int]  # the queues that are not empty, and their depth


CLEAN = Outcome(lost=0, duplicate_tickets=0, unexpected_tickets=0, left_in_queues={})


def record(result: Result) -> None:
    """Append a scenario's figures to the report file, when one is asked for."""
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as file:
            file.write(json.dumps(asdict(result)) + "\n")


def record_outcome(
    scenario: str,
    faults: str,
    ids: list[str],
    outcome: Outcome,
    inbox: Any,
    recovery_s: float,
    service: ServiceProcess,
) -> None:
    """Record a fault scenario from the ledger's outcome (see `settle`)."""
    record(
        Result(
            scenario,
            len(ids),
            faults,
            outcome.lost,
            outcome.duplicate_tickets,
            duplicate_emails(inbox),
            round(recovery_s, 1),
            round(service.peak_rss_mb, 1),
        )
    )


def duplicate_emails(inbox: Any) -> int:
    """Notifications that appeared in more than one digest."""
    refs: Counter[str] = Counter()
    for message in inbox.messages:
        refs.update(re.findall(r"\(ref (\S+)\)", message.get_payload()))
    return sum(count - 1 for count in refs.values() if count > 1)


@dataclass
class ServiceProcess:
    """`python -m ingest run` with its own queues, database and ports."""

    directory: Path
    broker: Broker
    queue_prefix: str
    smtp_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    database_url: str | None = None  # None: SQLite, in `database`
    http_port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    peak_rss_mb: float = 0.0
    starts: int = 0
    _sampler: asyncio.Task[None] | None = None

    @property
    def database(self) -> Path:
        return self.directory / "tickets.db"

    @property
    def bookings_queue(self) -> str:
        return f"{self.queue_prefix}-bookings"

    @property
    def notifications_queue(self) -> str:
        return f"{self.queue_prefix}-notifications"

    @property
    def work_queues(self) -> list[str]:
        """The queues a message waits in before it is done: both pipelines' queues and
        their retry queues."""
        return [
            name
            for queue in (self.bookings_queue, self.notifications_queue)
            for name in (queue, *(retry_queue_name(queue, delay) for delay in RETRY_DELAYS))
        ]

    @property
    def dead_letter_queues(self) -> list[str]:
        return [f"{self.bookings_queue}.dlq", f"{self.notifications_queue}.dlq"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
        env.update(
            {
                "INGEST_CONFIG": str(self.directory / "none.toml"),
                "INGEST_AMQP_URL": self.broker.amqp_url,
                "INGEST_DATABASE_URL": self.database_url or f"sqlite+aiosqlite:///{self.database}",
                "INGEST_MAIL_OUTBOX": str(self.directory / "outbox"),
                "INGEST_HTTP_PORT": str(self.http_port),
                "INGEST_LOG_FORMAT": "json",
                "INGEST_SHUTDOWN_TIMEOUT": "20",
                "INGEST_PIPELINES__BOOKINGS__QUEUE": self.bookings_queue,
                "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": self.notifications_queue,
                "INGEST_PIPELINES__BOOKINGS__RETRY_DELAYS": json.dumps(RETRY_DELAYS),
                "INGEST_PIPELINES__BOOKINGS__RETRY_MAX_ATTEMPTS": "50",
                "INGEST_PIPELINES__NOTIFICATIONS__RETRY_DELAYS": json.dumps(RETRY_DELAYS),
                "INGEST_PIPELINES__NOTIFICATIONS__RETRY_MAX_ATTEMPTS": "50",
                "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": "0.5",
            }
        )
        if self.smtp_port is not None:
            env["INGEST_SMTP_URL"] = f"smtp://127.0.0.1:{self.smtp_port}"
        env.update(self.extra)
        return env

    async def start(self, ready_timeout: float = 60) -> None:
        self.starts += 1
        path = self.directory / f"service-{self.starts}.log"
        with path.open("wb") as log:  # the child keeps its own descriptor
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ingest",
                "run",
                env=self.environment(),
                stdout=log,
                stderr=log,
            )
        self._sampler = asyncio.create_task(self._sample_rss(self.process.pid))
        deadline = time.monotonic() + ready_timeout
        while not await self.ready():
            if self.process.returncode is not None:
                raise AssertionError(
                    f"the service exited with {self.process.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the service was not ready within {ready_timeout}s: {self.log()}"
                )
            await asyncio.sleep(0.1)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 40) -> tuple[int, float]:
        """Signal the service; its exit code and how long it took to exit."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signum)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._sampler is not None:
            self._sampler.cancel()
        return code, time.monotonic() - started

    async def ready(self) -> bool:
        return (await self.get("/readyz"))[0] == 200

    async def alive(self) -> bool:
        return (await self.get("/healthz"))[0] == 200

    async def get(self, path: str) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                url = f"http://127.0.0.1:{self.http_port}{path}"
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()
            except OSError:
                return 0, ""

        return await asyncio.to_thread(fetch)

    def log(self) -> str:
        return (self.directory / f"service-{self.starts}.log").read_text()[-3000:]

    async def _sample_rss(self, pid: int) -> None:
        while True:
            peak = await asyncio.to_thread(peak_rss_mb, pid)
            if peak is None:
                return
            self.peak_rss_mb = max(self.peak_rss_mb, peak)
            await asyncio.sleep(0.2)


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class BaseLedger:
    """What the database says happened to each booking; `_query` says how to ask it."""

    async def _query(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def tickets(self) -> int:
        rows = await self._query("select count(*) from tickets")
        return int(rows[0][0]) if rows else 0

    async def ticket_ids(self) -> list[str]:
        return [row[0] for row in await self._query("select message_id from tickets")]

    async def notified_ids(self) -> set[str]:
        """Notifications mailed: those of windows done (durable windows, the default: done
        once the mail server accepted the digest) and those recorded as sent (in-memory)."""
        return {
            row[0]
            for table in ("ingest_window_done", "notifications_sent")
            for row in await self._query(f"select message_id from {table}")
        }


class Ledger(BaseLedger):
    """The ledger of the service's SQLite file."""

    def __init__(self, database: Path) -> None:
        self.database = database

    async def _query(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.database.exists():
            return []
        with sqlite3.connect(self.database, timeout=10) as db:
            try:
                return db.execute(sql).fetchall()
            except sqlite3.OperationalError:  # the schema is not there yet
                return []


class PostgresLedger(BaseLedger):
    """The ledger of a PostgreSQL database, read directly (not through the proxy a
    scenario cuts the service off with)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)

    async def _query(self, sql: str) -> list[tuple[Any, ...]]:
        url = self.url
        connection = await asyncpg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            password=url.password,
            database=url.database,
        )
        try:
            return [tuple(row) for row in await connection.fetch(sql)]
        except asyncpg.UndefinedTableError:  # the schema is not there yet
            return []
        finally:
            await connection.close()


async def publish_bookings(broker: Broker, queue: str, ids: list[str]) -> None:
    """Publish valid bookings (users 1-3, open events), persistent and confirmed."""
    connection = await aiormq.connect(broker.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    # Declared as the service declares it (a quorum queue, by default).
    declare = PipelineSettings().queue_declare(queue)
    await channel.queue_declare(queue, durable=True, arguments=dict(declare.arguments))
    events = ("cinema", "musical", "comedy")
    window: list[Any] = []
    for index, message_id in enumerate(ids):
        body = f"{events[index % 3]},{index % 3 + 1}".encode()
        window.append(
            channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(delivery_mode=2, message_id=message_id),
            )
        )
        if len(window) == 500:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)
    await connection.close()


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.1)


async def settle(
    service: ServiceProcess,
    broker: Broker,
    ids: list[str],
    timeout: float = 120,
    ledger: BaseLedger | None = None,
) -> Outcome:
    """Wait for every booking's ticket and notification, stop the service cleanly and
    check the queues are empty: what is left unacknowledged would be back in them. The
    ledger is the service's SQLite file unless another is given."""
    ledger = ledger or Ledger(service.database)
    wanted = set(ids)

    async def complete() -> bool:
        return (
            wanted <= set(await ledger.ticket_ids())
            and {f"{i}/notification" for i in wanted} <= await ledger.notified_ids()
        )

    connection = await aiormq.connect(broker.amqp_url)
    channel = await connection.channel()

    async def depths(queues: list[str]) -> dict[str, int]:
        return {queue: await queue_depth(channel, queue) for queue in queues}

    try:
        await wait_for(complete, timeout, "every ticket and notification")
    except AssertionError as error:
        # Say where the missing ones are: a dead-letter queue is the usual answer.
        missing = len(wanted - set(await ledger.ticket_ids()))
        queues = await depths(service.work_queues + service.dead_letter_queues)
        raise AssertionError(
            f"{error}: {missing} of {len(wanted)} bookings have no ticket; queues: "
            f"{ {queue: count for queue, count in queues.items() if count} }"
        ) from None

    # Redeliveries after a fault may still bring repeated work (a booking whose ack the
    # broker lost, retried because the publisher was still reconnecting): let it pass. The
    # queues must stay empty for longer than the longest retry delay, since a retried
    # message is out of sight while it waits in its retry queue.
    quiet_since: float | None = None

    async def drained() -> bool:
        nonlocal quiet_since
        if any((await depths(service.work_queues)).values()):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        return quiet_since is not None and time.monotonic() - quiet_since > max(RETRY_DELAYS) + 1

    await wait_for(drained, timeout, "the work and retry queues drained")
    code, _ = await service.stop()
    assert code == 0, service.log()
    left = await depths(service.work_queues + service.dead_letter_queues)
    await connection.close()
    tickets = await ledger.ticket_ids()
    return Outcome(
        lost=len(wanted - set(tickets)),
        duplicate_tickets=len(tickets) - len(set(tickets)),
        unexpected_tickets=len(set(tickets) - wanted),
        left_in_queues={queue: count for queue, count in left.items() if count},
    )
