"""The tickets database on SQLite and PostgreSQL: processes that start at once
(`ingest run --workers N`) on a database without its schema all come up; a batch is one
statement."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select, text

from pipelines.db import SQLITE_CACHE_KIB, Database, TicketRow, metadata, users

START = (
    "import asyncio, sys; from pipelines.db import Database; "
    "asyncio.run(Database(sys.argv[1]).start())"
)


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


async def test_a_batch_of_tickets_is_one_insert_and_a_repeated_one_adds_nothing(
    database_url: str,
) -> None:
    db = Database(database_url)
    await db.start()
    statements: list[tuple[str, bool]] = []

    def record(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        statements.append((statement.split()[0].upper(), many))

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        first = [TicketRow(f"m-{i}", i % 3 + 1, "cinema") for i in range(75)]
        await db.insert_tickets(first)
        assert statements == [("INSERT", False)]
        # A redelivered batch, partly new: only the new tickets are added.
        await db.insert_tickets([*first[:50], TicketRow("m-new", 1, "musical")])
        assert await db.count_tickets() == 76
        statements.clear()
        assert await db.emails_of([1, 2, 3, 4, 2]) == {
            1: "foo@email.com",
            2: "bar@email.com",
            3: "baz@email.com",
        }
        assert statements == [("SELECT", False)]
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)
        await db.close()


async def test_sqlite_connections_keep_a_small_page_cache(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/tickets.db")
    try:
        async with db.engine.connect() as connection:
            pages = await connection.scalar(text("PRAGMA cache_size"))
        assert pages == -SQLITE_CACHE_KIB  # negative: a size in KiB rather than in pages
    finally:
        await db.close()
