"""The tickets database on SQLite and PostgreSQL: processes that start at once
(`ingest run --workers N`) on a database without its schema all come up; a batch is one
statement, the same SQL whatever its size, and costs PostgreSQL one round trip; a
connection the server dropped is replaced without failing the call; redeliveries insert
nothing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import make_url

from pipelines.db import SQLITE_CACHE_KIB, Database, TicketRow, metadata, users
from tests.support import on_the_server

START = (
    "import asyncio, sys; from pipelines.db import Database; "
    "asyncio.run(Database(sys.argv[1]).start())"
)
EMAILS = {1: "foo@email.com", 2: "bar@email.com", 3: "baz@email.com"}


async def test_processes_starting_at_once_create_the_schema_once(database_url: str) -> None:
    db = Database(database_url)
    try:
        for _ in range(3):
            async with db.engine.begin() as connection:
                await connection.run_sync(metadata.drop_all)
            processes = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    START,
                    database_url,
                    stderr=asyncio.subprocess.PIPE,
                )
                for _ in range(4)
            ]
            errors = [(await process.communicate())[1].decode() for process in processes]
            assert [process.returncode for process in processes] == [0] * 4, errors
            async with db.engine.connect() as connection:
                seeded = await connection.scalar(select(func.count()).select_from(users))
            assert seeded == 3
    finally:
        await db.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.start()
    yield database
    await database.close()


class Statements:
    """What SQLAlchemy hands the driver: (SQL, executemany?) per call."""

    def __init__(self, db: Database) -> None:
        self.seen: list[tuple[str, bool]] = []
        self.engine = db.engine.sync_engine

    def __enter__(self) -> list[tuple[str, bool]]:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self.seen

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, _c: Any, _cu: Any, statement: str, _p: Any, _x: Any, many: bool) -> None:
        self.seen.append((statement, many))


def verbs(seen: list[tuple[str, bool]]) -> list[str]:
    return [statement.split()[0].upper() for statement, _ in seen]


def tickets(prefix: str, count: int) -> list[TicketRow]:
    return [TicketRow(f"{prefix}-{i}", i % 3 + 1, "cinema") for i in range(count)]


async def test_a_batch_of_tickets_is_one_insert_and_a_repeated_one_adds_nothing(
    db: Database,
) -> None:
    with Statements(db) as seen:
        first = tickets("m", 75)
        await db.insert_tickets(first)
        # SQLite: one executemany, one statement prepared once and stepped per row, in
        # one transaction; PostgreSQL: one execute with an array per column.
        assert verbs(seen) == ["INSERT"]
        assert [many for _, many in seen] == [db.engine.dialect.name == "sqlite"]
        # A redelivered batch, partly new: only the new tickets are added.
        await db.insert_tickets([*first[:50], TicketRow("m-new", 1, "musical")])
        assert await db.count_tickets() == 76
        seen.clear()
        assert await db.emails_of([1, 2, 3, 4, 2]) == EMAILS
        assert verbs(seen) == ["SELECT"]


async def test_batches_of_any_size_run_the_same_statements(db: Database) -> None:
    with Statements(db) as seen:
        for size in (75, 3, 100):
            await db.insert_tickets(tickets(f"size{size}", size))
            await db.emails_of(range(1, size + 1))
            await db.record_sent("foo@email.com", [f"size{size}-{i}" for i in range(size)])
            await db.sent([f"size{size}-{i}" for i in range(size + 7)])
    per_batch = [statement for statement, _ in seen]
    assert len(per_batch) == 12
    assert per_batch[:4] == per_batch[4:8] == per_batch[8:]


async def test_a_message_twice_in_one_batch_is_one_ticket(db: Database) -> None:
    await db.insert_tickets([TicketRow("twice", 1, "cinema"), TicketRow("twice", 2, "musical")])
    async with db.engine.connect() as connection:
        rows = (await connection.execute(text("SELECT user_id, event FROM tickets"))).all()
    assert [tuple(row) for row in rows] == [(1, "cinema")]


async def test_a_batch_above_the_drivers_parameter_limits_is_one_statement(
    db: Database,
) -> None:
    # 12,000 rows of 3 columns: 36,000 values, past SQLite's 32,766 variables and the
    # PostgreSQL protocol's 32,767 parameters of a multi-row VALUES.
    batch = tickets("big", 12_000)
    with Statements(db) as seen:
        await db.insert_tickets(batch)
        await db.insert_tickets(batch)
    assert verbs(seen) == ["INSERT", "INSERT"]
    assert await db.count_tickets() == 12_000


async def test_user_ids_no_integer_column_holds_are_unknown_users(db: Database) -> None:
    assert await db.emails_of([1, 2**31, 2**63, 10**20, -(2**63) - 1]) == {1: EMAILS[1]}


async def test_notifications_sent_are_recorded_once(db: Database) -> None:
    with Statements(db) as seen:
        await db.record_sent("foo@email.com", ["n-1", "n-2", "n-2"])
        await db.record_sent("bar@email.com", ["n-2", "n-3"])
        assert await db.sent(["n-1", "n-3", "n-4", "n-1"]) == {"n-1", "n-3"}
    assert verbs(seen) == ["INSERT", "INSERT", "SELECT"]
    async with db.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT message_id, recipient FROM notifications_sent")
        )
        assert sorted(tuple(row) for row in rows) == [
            ("n-1", "foo@email.com"),
            ("n-2", "foo@email.com"),
            ("n-3", "bar@email.com"),
        ]


SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class RoundTrips:
    """A proxy in front of PostgreSQL that counts the round trips its clients make: after
    each simple Query, each Sync (the end of an extended-protocol exchange) and each Flush
    (asyncpg's prepare), the client waits for the server, whatever SQLAlchemy and asyncpg
    do above the socket."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.count = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RoundTrips:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(self._count, reader, upstream_writer),
            self._pipe(self._copy, upstream_reader, writer),
        )

    @staticmethod
    async def _pipe(
        direction: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One direction; when it ends, so does the connection (as a closed socket would)."""
        try:
            await direction(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # untyped: SSL or GSS encryption requests, then the startup message
            head = await reader.readexactly(8)
            writer.write(head + await reader.readexactly(int.from_bytes(head[:4], "big") - 8))
            if int.from_bytes(head[4:], "big") not in (SSL_REQUEST, GSSENC_REQUEST):
                break
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
            self.count += head[:1] in (b"Q", b"S", b"H")
            writer.write(head + body)

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)


async def test_on_postgresql_a_call_is_one_round_trip(
    database_url: str,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("round trips to a database server: PostgreSQL")
    url = make_url(database_url)
    async with RoundTrips(url.host or "127.0.0.1", url.port or 5432) as proxy:
        db = Database(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
        calls: dict[str, Callable[[int], Awaitable[Any]]] = {
            "insert_tickets": lambda n: db.insert_tickets(tickets(f"trip{n}", 50 + n)),
            "emails_of": lambda n: db.emails_of([1, 2, 3, 4][: 1 + n]),
            "record_sent": lambda n: db.record_sent("foo@email.com", [f"t{n}", "t"]),
            "sent": lambda n: db.sent([f"t{n}", "t", "u"][: 1 + n]),
        }
        try:
            await db.start()
            trips: dict[str, list[int]] = {}
            for name, call in calls.items():
                await call(0)  # the first call on a connection prepares its statement
                for n in (1, 2):
                    before = proxy.count
                    await call(n)
                    trips.setdefault(name, []).append(proxy.count - before)
        finally:
            await db.close()
    # The statement alone: no ping, no BEGIN or COMMIT, no new statement.
    assert trips == {name: [1, 1] for name in calls}


async def test_connections_the_server_dropped_are_replaced_without_failing_a_call(
    database_url: str,
) -> None:
    """No pre-ping: a pooled connection that PostgreSQL closed (a restart, an idle
    timeout) fails on first use, and the call runs once more on a new one."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a database server that drops connections: PostgreSQL")
    db = Database(database_url)
    try:
        await db.start()
        await asyncio.gather(*(db.emails_of([1]) for _ in range(3)))  # pooled connections
        [dropped] = await on_the_server(
            database_url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert dropped[0] >= 1
        assert await db.emails_of([1, 2]) == {1: EMAILS[1], 2: EMAILS[2]}
        await db.insert_tickets(tickets("after-drop", 3))
        assert await db.count_tickets() == 3
    finally:
        await db.close()


async def test_the_pool_opens_its_connections_at_start_and_keeps_them_under_load(
    database_url: str,
) -> None:
    """As many connections as the hooks that query at once, opened by start(): a load of
    that many concurrent calls opens none more and closes none (SQLAlchemy's default
    pool, 5 and 10 more opened and closed on demand, churned dozens per drain)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a connection pool: PostgreSQL (SQLite keeps one per thread)")

    async def backends() -> set[int]:
        rows = await on_the_server(
            database_url,
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        return {row["pid"] for row in rows}

    db = Database(database_url, connections=8)
    try:
        await db.start()
        opened = await backends()
        assert len(opened) == 8
        for round_ in range(20):
            await asyncio.gather(
                *(db.insert_tickets(tickets(f"pool{round_}-{i}", 5)) for i in range(8))
            )
        assert await backends() == opened, "no connection opened or closed under the load"
    finally:
        await db.close()


async def test_sqlite_connections_keep_a_small_page_cache_and_a_durable_log(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/tickets.db")
    try:
        async with db.engine.connect() as connection:
            pages = await connection.scalar(text("PRAGMA cache_size"))
            journal = await connection.scalar(text("PRAGMA journal_mode"))
            synchronous = await connection.scalar(text("PRAGMA synchronous"))
        assert pages == -SQLITE_CACHE_KIB  # negative: a size in KiB rather than in pages
        assert (journal, synchronous) == ("wal", 2)  # 2: FULL, a sync on every commit
    finally:
        await db.close()
