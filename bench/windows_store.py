"""Window store micro-benchmark: `SqlWindowStore` on SQLite and PostgreSQL, appending
100,000 messages in chunks of 500 over 1,000 batch keys, then closing, claiming and
completing every window as a flusher does (20 at a time).

CPU is this process's (`time.process_time`, so aiosqlite's thread is in it; PostgreSQL's
server is not): the figures to compare are cpu_us_per_message. PostgreSQL runs in a
database made for the run and dropped after it. One JSON line per database and phase:

    python bench/windows_store.py [--messages 100000] [--appenders 1] [--database sqlite ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from _common import scratch_database

from ingest.sql import SqlWindowStore
from ingest.windows import StoredMessage, WindowRule

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CHUNK = 500  # messages per append: a consumer's chunk
KEYS = 1_000
CLAIM_LIMIT = 20  # DurableWindows' default claim_limit
RULE = WindowRule(size=75, timeout=10.0)
BATCHER = "bench"


@asynccontextmanager
async def window_store(kind: str) -> AsyncIterator[SqlWindowStore]:
    """A started store on an empty SQLite file or a fresh PostgreSQL database."""
    async with scratch_database(kind, os.environ.get("INGEST_DATABASE_URL") or POSTGRES_URL) as url:
        store = SqlWindowStore(url)
        await store.start()
        try:
            yield store
        finally:
            await store.close()


def chunks(count: int) -> list[list[StoredMessage]]:
    """Messages of a booking's size, each for one of KEYS keys at random, with an id."""
    rng = random.Random(19)
    run = uuid.uuid4().hex[:8]
    messages = [
        StoredMessage(
            f"user-{rng.randrange(KEYS)}",
            json.dumps({"user_id": n % 997, "event": "cinema", "seats": [n % 40, n % 41]}),
            json.dumps({"message_id": f"{run}-{n}", "routing_key": "bookings", "attempt": 1}),
            f"{run}-{n}",
        )
        for n in range(count)
    ]
    return [messages[start : start + CHUNK] for start in range(0, count, CHUNK)]


async def measure(phase: Callable[[], Awaitable[int]], messages: int) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    calls = await phase()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "messages": messages,
        "calls": calls,
        "wall_s": round(wall, 3),
        "messages_per_s": round(messages / wall),
        "cpu_us_per_message": round(cpu * 1e6 / messages, 1),
    }


async def append_all(
    store: SqlWindowStore, batches: list[list[StoredMessage]], appenders: int
) -> int:
    """`appenders` tasks appending the chunks in turn, as batchers' intakes would."""
    queue = iter(batches)

    async def appender() -> None:
        for batch in queue:
            await store.append(BATCHER, batch, RULE, time.time())

    async with asyncio.TaskGroup() as group:
        for _ in range(appenders):
            group.create_task(appender())
    return len(batches)


async def flush_all(store: SqlWindowStore) -> int:
    """One flusher: close up to CLAIM_LIMIT due windows, claim up to CLAIM_LIMIT, complete
    them; until nothing is left (past every timeout, so all windows are due)."""
    calls = 0
    later = time.time() + 3600
    while True:
        closed = await store.close_due(BATCHER, RULE, later, CLAIM_LIMIT)
        async with store.claim(BATCHER, later, CLAIM_LIMIT) as claim:
            for window in claim.windows:
                claim.done(window)
        calls += 2
        if not closed and not claim.windows:
            return calls


async def run(kind: str, count: int, appenders: int) -> None:
    batches = chunks(count)
    async with window_store(kind) as store:
        # Warm up: the pool's connections and the statements each prepares.
        await store.append("warm", batches[0][:10], RULE, time.time())
        await store.close_due("warm", RULE, time.time() + 3600, CLAIM_LIMIT)
        async with store.claim("warm", time.time() + 3600, CLAIM_LIMIT) as claim:
            for window in claim.windows:
                claim.done(window)
        result = await measure(lambda: append_all(store, batches, appenders), count)
        print(json.dumps({"database": kind, "phase": "append", "appenders": appenders, **result}))
        result = await measure(lambda: flush_all(store), count)
        print(json.dumps({"database": kind, "phase": "close+claim+done", **result}))
        left = await store.open_windows(BATCHER)
        if left.messages or left.closed:
            raise SystemExit(f"{kind}: windows left after the flush: {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--appenders", type=int, default=1)
    parser.add_argument(
        "--database", action="append", choices=("sqlite", "postgresql"), default=None
    )
    args = parser.parse_args()
    for kind in args.database or ["sqlite", "postgresql"]:
        asyncio.run(run(kind, args.messages, args.appenders))


if __name__ == "__main__":
    main()
