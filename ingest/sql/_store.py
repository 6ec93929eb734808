"""SqlWindowStore: durable windows in PostgreSQL or SQLite, with SQLAlchemy's async engine."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ingest.exceptions import StartupError
from ingest.options import positive_seconds
from ingest.sql._flush_lock import FlushLock
from ingest.sql._postgresql import PostgresWindows
from ingest.sql._sqlite import SqliteWindows
from ingest.windows import Claim, OpenWindows, StoredMessage, WindowRule

__all__ = ["SqlWindowStore"]

# The SQL is written for these drivers' parameter styles ($1 and ?).
DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}

# Flushers and appenders of one process at once, with room to spare: the pool's size.
POSTGRES_POOL_SIZE = 10

# How long the ids of done messages are remembered, and how often older ones are dropped.
REMEMBER_DONE_S = 7 * 24 * 3600.0
FORGET_EVERY_S = 600.0

SQLITE_CACHE_KIB = 256
SQLITE_SWITCH_INTERVAL = 0.0005  # seconds


class SqlWindowStore:
    """The `ingest.windows.WindowStore` contract on PostgreSQL (asyncpg) or SQLite
    (aiosqlite), shared by every process that opens the same database::

        store = SqlWindowStore("postgresql+asyncpg://ingest@db/ingest")
        await store.start()  # creates its tables (ingest_window_*) if missing
        Batcher(batch_size=75, batch_timeout=10.0, windows=DurableWindows(store, sink))
        await store.close()

    Given a URL, the store makes its engine and disposes of it on close; given an engine,
    it leaves it to its owner and does not rely on its isolation level. On PostgreSQL,
    replicas flush side by side (row locks keep each window to one claim). On SQLite one
    process flushes at a time: the one holding a lock on `<database>.windows.lock`, next
    to the database file or in `lock_dir`; the others append, close windows, and take the
    lock over when its holder ends.

    The ids of the messages of a done window are kept `remember_done` seconds (a week),
    so that a redelivery of one in that time joins no second window: a message
    redelivered after its window was handled is not handled again.

    `engine` is the store's engine, for a look at its tables (`ingest_window_*`).
    """

    def __init__(
        self,
        engine_or_url: AsyncEngine | str,
        *,
        lock_dir: Path | None = None,
        remember_done: float = REMEMBER_DONE_S,
    ) -> None:
        positive_seconds("window store", "remember_done", remember_done)
        self.remember_done = remember_done
        self._forgotten_at: dict[str, float] = {}  # per batcher, monotonic
        url = engine_or_url if isinstance(engine_or_url, str) else engine_or_url.url
        self._url = make_url(url)
        dialect = _dialect(self._url)
        self._owns_engine = isinstance(engine_or_url, str)
        self.engine = (
            _make_engine(self._url, dialect) if isinstance(engine_or_url, str) else engine_or_url
        )
        self._windows: PostgresWindows | SqliteWindows = (
            PostgresWindows(self.engine)
            if dialect == "postgresql"
            else SqliteWindows(
                self.engine,
                FlushLock(_lock_path(self._url, lock_dir)),
                one_connection=_in_memory(self._url),
            )
        )

    async def start(self) -> None:
        """Create the tables and indexes if missing (idempotent, and safe for processes
        starting at once); StartupError, naming the database without its password, if it
        cannot be reached."""
        try:
            await self._windows.start()
        except Exception as exc:
            where = self._url.render_as_string(hide_password=True)
            raise StartupError(
                f"window store unreachable at {where} ({type(exc).__name__}: {exc})"
            ) from exc

    async def close(self) -> None:
        """Let another process flush (SQLite), and dispose of the engine if it is ours."""
        await self._windows.close()
        if self._owns_engine:
            await self.engine.dispose()

    async def append(
        self, batcher: str, messages: Sequence[StoredMessage], rule: WindowRule, now: float
    ) -> int:
        return await self._windows.append(batcher, messages, rule, now)

    async def close_due(self, batcher: str, rule: WindowRule, now: float, limit: int) -> int:
        if time.monotonic() - self._forgotten_at.get(batcher, -FORGET_EVERY_S) >= FORGET_EVERY_S:
            self._forgotten_at[batcher] = time.monotonic()
            await self._windows.forget(batcher, now - self.remember_done)
        return await self._windows.close_due(batcher, rule, now, limit)

    def claim(self, batcher: str, now: float, limit: int) -> AbstractAsyncContextManager[Claim]:
        return self._windows.claim(batcher, now, limit)

    async def open_windows(self, batcher: str, busiest: int = 5) -> OpenWindows:
        return await self._windows.open_windows(batcher, busiest)


def _dialect(url: URL) -> str:
    dialect, driver = url.get_backend_name(), url.get_driver_name()
    if DRIVERS.get(dialect) != driver:
        raise ValueError(
            f"window store: unsupported database {url.drivername!r}: use "
            "postgresql+asyncpg://... or sqlite+aiosqlite:///..."
        )
    return dialect


def _make_engine(url: URL, dialect: str) -> AsyncEngine:
    if dialect == "postgresql":
        # Autocommit: each call but a claim is one statement, atomic on its own; in a
        # transaction it would also pay BEGIN and COMMIT, three round trips instead of one.
        return create_async_engine(url, isolation_level="AUTOCOMMIT", pool_size=POSTGRES_POOL_SIZE)
    if not _in_memory(url):
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", _configure_sqlite)
    # aiosqlite runs each step of a statement in its connection's thread, which then
    # waits for the GIL while the event loop runs, up to the switch interval each time
    # (5 ms by default); docs/PERFORMANCE.md measures what 0.5 ms saves.
    sys.setswitchinterval(min(sys.getswitchinterval(), SQLITE_SWITCH_INTERVAL))
    return engine


def _configure_sqlite(connection: Any, _record: Any) -> None:
    """Each new SQLite connection: write-ahead logging, so that a commit is one append and
    one fsync of the log and claims read while appends write; `synchronous = FULL`, so
    that a commit is durable, as an append promises before the message is acknowledged;
    and a small page cache per pooled connection (the operating system caches the file)."""
    cursor = connection.cursor()
    cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


def _in_memory(url: URL) -> bool:
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def _lock_path(url: URL, lock_dir: Path | None) -> Path | None:
    """Where the flush lock of a SQLite database is: None for one in memory, which no
    other process can open."""
    if _in_memory(url):
        return None
    database = Path(str(url.database))
    return (lock_dir or database.parent) / f"{database.name}.windows.lock"
