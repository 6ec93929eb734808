"""The tickets database on SQLite and PostgreSQL: processes that start at once
(`ingest run --workers N`) on a database without its schema all come up."""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import func, select

from pipelines.db import Database, metadata, users

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
