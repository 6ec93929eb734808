"""The tickets database: users, tickets (one per booking message) and the notifications
already sent, with SQLAlchemy 2 async Core (SQLite by default, PostgreSQL in compose)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ingest.exceptions import StartupError
from ingest.service import tracing
from pipelines.group_commit import GroupCommit, Statement

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("email", String(320), nullable=False),
)

tickets = Table(
    "tickets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("event", String(100), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

notifications_sent = Table(
    "notifications_sent",
    metadata,
    Column("message_id", String(255), primary_key=True),
    Column("recipient", String(320), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# The book's three users.
SEED_USERS = (
    {"id": 1, "email": "foo@email.com"},
    {"id": 2, "email": "bar@email.com"},
    {"id": 3, "email": "baz@email.com"},
)


# Any constant that other applications sharing the database do not use for their locks.
SCHEMA_LOCK_KEY = 0x1E57_71C4
# An id past 64 bits is in no integer column; asked for, the driver would fail the query.
INT64 = range(-(2**63), 2**63)


@dataclass(frozen=True, slots=True)
class Dialect:
    """One database's SQL. The per-batch queries are fixed text in the driver's own
    parameter style, run with `exec_driver_sql`: SQLAlchemy compiles nothing and the driver
    prepares each once per connection whatever the batch size. (A multi-row VALUES, or an
    IN list, is a new statement for every row count: compiled, prepared, and capped at
    32,767 parameters.)"""

    insert: Any  # the dialect's INSERT construct, for the seed
    schema_lock: str  # makes schema creation exclusive until the transaction ends
    engine_options: Mapping[str, Any]
    transaction_options: Mapping[str, Any]  # what start() needs for a real transaction
    insert_tickets: str
    emails_of: str
    record_sent: str
    sent: str
    rows: Callable[[list[tuple[Any, ...]]], Any]  # rows -> the parameters of one call
    listed: Callable[[list[Any]], tuple[Any, ...]]  # a list -> the one parameter


def _columns(rows: list[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    return tuple(list(column) for column in zip(*rows, strict=True))


POSTGRESQL = Dialect(
    insert=postgresql.insert,
    schema_lock=f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})",
    # Autocommit: each query below is one statement, atomic on its own. In a transaction,
    # a call would also pay BEGIN and COMMIT: three round trips instead of one. No
    # pre-ping either (a round trip and a fifth of this module's CPU per call): a
    # connection the server dropped is found on use instead (Database._execute).
    engine_options={"isolation_level": "AUTOCOMMIT"},
    transaction_options={"isolation_level": "READ COMMITTED"},
    # One array per column: one statement and one round trip for any number of rows.
    insert_tickets="INSERT INTO tickets (message_id, user_id, event)"
    " SELECT * FROM unnest($1::text[], $2::int[], $3::text[])"
    " ON CONFLICT (message_id) DO NOTHING",
    emails_of="SELECT id, email FROM users WHERE id = ANY($1::bigint[])",
    record_sent="INSERT INTO notifications_sent (message_id, recipient)"
    " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (message_id) DO NOTHING",
    sent="SELECT message_id FROM notifications_sent WHERE message_id = ANY($1::text[])",
    rows=_columns,
    listed=lambda values: (values,),
)

SQLITE = Dialect(
    insert=sqlite.insert,
    schema_lock="BEGIN IMMEDIATE",  # the write lock, for the busy timeout
    # No pre-ping: the connection is a file this process holds, with no server to lose;
    # the ping would cost four calls through aiosqlite's thread on every checkout.
    engine_options={},
    transaction_options={},
    # executemany: one statement, prepared once and stepped per row, in one transaction.
    insert_tickets="INSERT INTO tickets (message_id, user_id, event) VALUES (?, ?, ?)"
    " ON CONFLICT (message_id) DO NOTHING",
    # A list is one JSON parameter: SQLite has no arrays.
    emails_of="SELECT id, email FROM users WHERE id IN (SELECT value FROM json_each(?))",
    record_sent="INSERT INTO notifications_sent (message_id, recipient) VALUES (?, ?)"
    " ON CONFLICT (message_id) DO NOTHING",
    sent="SELECT message_id FROM notifications_sent"
    " WHERE message_id IN (SELECT value FROM json_each(?))",
    rows=lambda rows: rows,
    listed=lambda values: (json.dumps(values),),
)

DIALECTS = {"postgresql": POSTGRESQL, "sqlite": SQLITE}

SQLITE_CACHE_KIB = 256
SQLITE_SWITCH_INTERVAL = 0.0005  # seconds


def _configure_sqlite(connection: Any, record: Any) -> None:
    """Each new SQLite connection:

    - a small page cache: SQLite keeps one in the process for each pooled connection, 2 MB
      by default; with a dozen connections over a growing tickets table a service that
      runs for long grows by tens of MB. 256 KB each keeps it bounded; the operating
      system caches the file anyway;
    - write-ahead logging: a commit is one append and one fsync of the log (instead of a
      rollback journal written, synced and deleted), and the user lookups read while a
      batch's INSERT writes. `synchronous = FULL` keeps every commit durable, as the
      acknowledgement after it promises."""
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


@dataclass(frozen=True, slots=True)
class TicketRow:
    message_id: str
    user_id: int
    event: str


class Database:
    """The queries the pipelines need, each one statement.

    On PostgreSQL the engine runs in autocommit (see POSTGRESQL): `engine.begin()` there
    is no transaction; code that needs one sets an isolation level first, as start() does."""

    def __init__(self, url: str, connections: int | None = None) -> None:
        """`connections`: how many the pool keeps (PostgreSQL), opened by `start()`: as
        many as the hooks that query at once (the durable windows' claims hold theirs
        for a whole flush); SQLAlchemy's default else (5, opened as needed). Beyond it
        the pool opens up to 10 more, closed again when given back."""
        self.url = url
        parsed = make_url(url)
        dialect = parsed.get_backend_name()
        self.connections = connections if dialect == "postgresql" else None
        if dialect not in DIALECTS:
            raise ValueError(
                f"unsupported database {dialect!r}: use sqlite+aiosqlite or postgresql+asyncpg"
            )
        self._sql = DIALECTS[dialect]
        if dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        pool = {"pool_size": connections} if connections and dialect == "postgresql" else {}
        self.engine: AsyncEngine = create_async_engine(url, **self._sql.engine_options, **pool)
        tracing.instrument_database(self.engine)
        self._group_commit: GroupCommit | None = None
        if dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _configure_sqlite)
            self._group_commit = GroupCommit(self._commit_in_one_transaction)
            # aiosqlite runs each step of a statement (cursor, execute, fetch, close,
            # commit) in its connection's thread, and the thread then waits for the GIL
            # while the event loop runs, up to the switch interval each time (5 ms by
            # default). 0.5 ms: bookings on SQLite 6,851 -> 8,181 msgs/s, 93 -> 79 µs of
            # CPU per message (docs/PERFORMANCE.md).
            sys.setswitchinterval(min(sys.getswitchinterval(), SQLITE_SWITCH_INTERVAL))

    async def start(self) -> None:
        """Create the schema and seed the users (both idempotent); StartupError, naming the
        database without its password, if it cannot be reached.

        Several processes may start at once (`ingest run --workers N`, or pipelines started
        side by side): each takes a lock for the whole transaction first, so one creates
        the tables and the others find them, instead of racing on CREATE TABLE."""
        try:
            async with self.engine.connect() as connection:
                await connection.execution_options(**self._sql.transaction_options)
                async with connection.begin():
                    await connection.exec_driver_sql(self._sql.schema_lock)
                    await connection.run_sync(metadata.create_all)
                    await connection.execute(self._insert_ignoring(users, ["id"], SEED_USERS))
            await self._warm()
        except Exception as exc:
            where = make_url(self.url).render_as_string(hide_password=True)
            raise StartupError(
                f"database unreachable at {where} ({type(exc).__name__}: {exc})"
            ) from exc

    async def _warm(self) -> None:
        """Open the pool's connections now, side by side, rather than one by one under
        the first load (an asyncpg connection costs a few milliseconds of handshake)."""
        if not self.connections:
            return
        async with contextlib.AsyncExitStack() as held:
            await asyncio.gather(
                *(held.enter_async_context(self.engine.connect()) for _ in range(self.connections))
            )

    async def close(self) -> None:
        if self._group_commit is not None:
            await self._group_commit.close()
        await self.engine.dispose()

    async def emails_of(self, user_ids: Iterable[int]) -> dict[int, str]:
        """The emails of these users, in one query; unknown ids are simply absent."""
        ids = list({i for i in user_ids if i in INT64})
        if not ids:
            return {}
        rows = await self._execute(self._sql.emails_of, self._sql.listed(ids))
        return {row.id: row.email for row in rows}

    async def insert_tickets(self, rows: Sequence[TicketRow]) -> None:
        """Insert the tickets in one statement; a message_id already there is skipped, so a
        redelivered booking creates no second ticket."""
        if rows:
            values = [(r.message_id, r.user_id, r.event) for r in rows]
            await self._write(self._sql.insert_tickets, self._sql.rows(values))

    async def sent(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these notifications were already sent."""
        ids = list(set(message_ids))
        if not ids:
            return set()
        rows = await self._execute(self._sql.sent, self._sql.listed(ids))
        return {row.message_id for row in rows}

    async def record_sent(self, recipient: str, message_ids: Iterable[str]) -> None:
        values = [(m, recipient) for m in set(message_ids)]
        if values:
            await self._write(self._sql.record_sent, self._sql.rows(values))

    async def _write(self, sql: str, parameters: Any) -> None:
        """A write: on SQLite, committed together with the others waiting (GroupCommit);
        PostgreSQL groups the commits of concurrent connections itself."""
        if self._group_commit is None:
            await self._execute(sql, parameters)
        else:
            await self._group_commit.write(sql, parameters)

    async def _commit_in_one_transaction(self, statements: Sequence[Statement]) -> None:
        async with self.engine.begin() as connection:
            for sql, parameters in statements:
                await connection.exec_driver_sql(sql, parameters)

    async def _execute(self, sql: str, parameters: Any) -> Sequence[Row[Any]]:
        """One statement, committed (on PostgreSQL in autocommit: no BEGIN, no COMMIT).

        The pool does not ping a connection before handing it out: one the server dropped
        (a restart, an idle timeout, a proxy) fails on first use instead, SQLAlchemy then
        discards the pool's connections, and the statement, idempotent like every one
        here, runs once more on a new connection."""
        try:
            return await self._execute_once(sql, parameters)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        return await self._execute_once(sql, parameters)

    async def _execute_once(self, sql: str, parameters: Any) -> Sequence[Row[Any]]:
        async with self.engine.begin() as connection:
            result = await connection.exec_driver_sql(sql, parameters)
            return result.fetchall() if result.returns_rows else []

    async def count_tickets(self) -> int:
        async with self.engine.connect() as connection:
            return int(
                (await connection.execute(select(func.count()).select_from(tickets))).scalar_one()
            )

    def _insert_ignoring(
        self, table: Table, keys: list[str], rows: Sequence[Mapping[str, Any]]
    ) -> Any:
        """One multi-row INSERT of `rows` that skips those whose `keys` are already there."""
        return (
            self._sql.insert(table).values(list(rows)).on_conflict_do_nothing(index_elements=keys)
        )
