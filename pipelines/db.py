"""The tickets database: users, tickets (one per booking message) and the notifications
already sent, with SQLAlchemy 2 async Core (SQLite by default, PostgreSQL in compose)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ingest.exceptions import StartupError

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
# Per database: its INSERT with ON CONFLICT DO NOTHING, and the statement that makes schema
# creation exclusive until the transaction ends (`ingest run --workers N` starts at once).
DIALECTS: dict[str, tuple[Any, str]] = {
    "postgresql": (postgresql.insert, f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"),
    "sqlite": (sqlite.insert, "BEGIN IMMEDIATE"),  # the write lock, for the busy timeout
}

SQLITE_CACHE_KIB = 256


def _small_page_cache(connection: Any, record: Any) -> None:
    """SQLite keeps a page cache in the process for each pooled connection, 2 MB by
    default: with a dozen connections over a growing tickets table, a service that runs
    for long grows by tens of MB. 256 KB each keeps it bounded and small; the operating
    system caches the file anyway."""
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    cursor.close()


@dataclass(frozen=True, slots=True)
class TicketRow:
    message_id: str
    user_id: int
    event: str


class Database:
    """The queries the pipelines need, each one statement."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        dialect = parsed.get_backend_name()
        if dialect not in DIALECTS:
            raise ValueError(
                f"unsupported database {dialect!r}: use sqlite+aiosqlite or postgresql+asyncpg"
            )
        self._insert, self._schema_lock = DIALECTS[dialect]
        if dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, pool_pre_ping=True)
        if dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _small_page_cache)

    async def start(self) -> None:
        """Create the schema and seed the users (both idempotent); StartupError, naming the
        database without its password, if it cannot be reached.

        Several processes may start at once (`ingest run --workers N`, or pipelines started
        side by side): each takes a lock for the whole transaction first, so one creates
        the tables and the others find them, instead of racing on CREATE TABLE."""
        try:
            async with self.engine.begin() as connection:
                await connection.exec_driver_sql(self._schema_lock)
                await connection.run_sync(metadata.create_all)
                await connection.execute(self._insert_ignoring(users, ["id"], SEED_USERS))
        except Exception as exc:
            where = make_url(self.url).render_as_string(hide_password=True)
            raise StartupError(
                f"database unreachable at {where} ({type(exc).__name__}: {exc})"
            ) from exc

    async def close(self) -> None:
        await self.engine.dispose()

    async def emails_of(self, user_ids: Iterable[int]) -> dict[int, str]:
        """The emails of these users, in one query; unknown ids are simply absent."""
        ids = sorted(set(user_ids))
        if not ids:
            return {}
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(users.c.id, users.c.email).where(users.c.id.in_(ids))
            )
            return {row.id: row.email for row in result}

    async def insert_tickets(self, rows: Sequence[TicketRow]) -> None:
        """Insert the tickets in one statement; a message_id already there is skipped, so a
        redelivered booking creates no second ticket."""
        if not rows:
            return
        values = [
            {"message_id": r.message_id, "user_id": r.user_id, "event": r.event} for r in rows
        ]
        async with self.engine.begin() as connection:
            await connection.execute(self._insert_ignoring(tickets, ["message_id"], values))

    async def sent(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these notifications were already sent."""
        ids = list(set(message_ids))
        if not ids:
            return set()
        async with self.engine.connect() as connection:
            result = await connection.execute(
                select(notifications_sent.c.message_id).where(
                    notifications_sent.c.message_id.in_(ids)
                )
            )
            return {row.message_id for row in result}

    async def record_sent(self, recipient: str, message_ids: Iterable[str]) -> None:
        values = [{"message_id": m, "recipient": recipient} for m in set(message_ids)]
        if values:
            async with self.engine.begin() as connection:
                await connection.execute(
                    self._insert_ignoring(notifications_sent, ["message_id"], values)
                )

    async def count_tickets(self) -> int:
        async with self.engine.connect() as connection:
            return int(
                (await connection.execute(select(func.count()).select_from(tickets))).scalar_one()
            )

    def _insert_ignoring(
        self, table: Table, keys: list[str], rows: Sequence[Mapping[str, Any]]
    ) -> Any:
        """One multi-row INSERT of `rows` that skips those whose `keys` are already there."""
        return self._insert(table).values(list(rows)).on_conflict_do_nothing(index_elements=keys)
