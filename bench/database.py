"""Database micro-benchmark: the bookings pipeline's two queries, `Database.insert_tickets`
in batches of 75 and `Database.emails_of` in chunks of 50, on SQLite and PostgreSQL.

CPU is this process's (`time.process_time`, so aiosqlite's thread is in it; PostgreSQL's
server is not); the figure to compare is cpu_s_per_100k_rows. PostgreSQL runs in a database
made for the run and dropped after it. One JSON line per database and operation:

    python bench/database.py [--rows 100000] [--database sqlite|postgresql ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from _common import scratch_database
from sqlalchemy import event

from pipelines.db import Database, TicketRow

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
INSERT_BATCH = 75  # the bookings pipeline's cinema batcher (musical 100, default 50)
LOOKUP_CHUNK = 50  # the processors' max_demand: one emails_of per chunk


@asynccontextmanager
async def database(kind: str) -> AsyncIterator[Database]:
    """A started Database on an empty SQLite file or a fresh PostgreSQL database."""
    async with scratch_database(kind, os.environ.get("INGEST_DATABASE_URL") or POSTGRES_URL) as url:
        db = Database(url)
        await db.start()
        try:
            yield db
        finally:
            await db.close()


async def measure(
    db: Database, calls: Sequence[Callable[[], Awaitable[Any]]], rows: int
) -> dict[str, Any]:
    """Run `calls` one after the other (as one batch processor does), counting the
    statements that reach the driver."""
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    cpu, wall = time.process_time(), time.perf_counter()
    for call in calls:
        await call()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    event.remove(db.engine.sync_engine, "before_cursor_execute", count)
    return {
        "rows": rows,
        "calls": len(calls),
        "statements_seen_by_sqlalchemy": statements,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "cpu_s_per_100k_rows": round(cpu * 100_000 / rows, 3),
        "rows_per_s": round(rows / wall),
    }


async def run(kind: str, rows: int) -> None:
    async with database(kind) as db:
        # Warm up: the pool's connections and whatever each path caches per statement.
        await db.insert_tickets([TicketRow(f"warm-{i}", 1, "cinema") for i in range(INSERT_BATCH)])
        await db.emails_of(range(1, LOOKUP_CHUNK + 1))
        run_id = uuid.uuid4().hex[:8]
        batches = [
            [
                TicketRow(f"{run_id}-{i}", i % 3 + 1, ("cinema", "musical", "default")[i % 3])
                for i in range(start, min(start + INSERT_BATCH, rows))
            ]
            for start in range(0, rows, INSERT_BATCH)
        ]
        inserts = [partial(db.insert_tickets, batch) for batch in batches]
        result = await measure(db, inserts, rows)
        print(json.dumps({"database": kind, "operation": "insert_tickets", **result}))
        # Redelivered: every message_id is there already, nothing is inserted.
        result = await measure(db, inserts, rows)
        print(json.dumps({"database": kind, "operation": "insert_tickets_redelivered", **result}))
        # A chunk names the three users and, now and then, one that does not exist.
        chunks = [
            [i % 3 + 1 if i % 97 else 1_000 + i for i in range(start, start + LOOKUP_CHUNK)]
            for start in range(0, rows, LOOKUP_CHUNK)
        ]
        lookups = [partial(db.emails_of, chunk) for chunk in chunks]
        result = await measure(db, lookups, rows)
        print(json.dumps({"database": kind, "operation": "emails_of", **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--database", action="append", choices=("sqlite", "postgresql"), default=None
    )
    args = parser.parse_args()
    for kind in args.database or ["sqlite", "postgresql"]:
        asyncio.run(run(kind, args.rows))


if __name__ == "__main__":
    main()
