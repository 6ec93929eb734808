"""SqliteWindows: the window store on SQLite (aiosqlite), each write one short transaction.

SQLite has one writer at a time: each write takes the write lock from its first
statement (BEGIN IMMEDIATE), so that what it reads is what it changes, and the writes of
this process queue on an asyncio lock rather than in SQLite's busy handler (a sleeping
poll). Reads never wait: the database runs in WAL mode. Claims hold no transaction —
appends go on while a window is flushed — and are made exclusive by the flush lock
between processes and by a set of held window ids between the tasks of this one."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ingest.sql._claim import HeldWindows, trigger_of
from ingest.sql._flush_lock import FlushLock
from ingest.sql._schema import metadata
from ingest.windows import Claim, OpenWindows, StoredMessage, StoredWindow, WindowRule

__all__ = ["SqliteWindows"]

# How many times start() tries a database that is locked while others open it too.
START_ATTEMPTS = 10

# No seq is past it: the bound of a key with fewer open messages than a window holds.
LAST_SEQ_EVER = 2**63 - 1

# AUTOINCREMENT: the rows a transaction holding the write lock inserts are those past the
# largest seq it saw first.
LAST_SEQ = "SELECT coalesce(max(seq), 0) FROM ingest_window_messages"

# executemany: one statement, prepared once and stepped per row, in the append's
# transaction; a message id already stored for the batcher, or done not long ago, is
# skipped.
INSERT_MESSAGES = """
INSERT INTO ingest_window_messages
    (batcher, batch_key, message_id, data, metadata, appended_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6
WHERE NOT EXISTS (SELECT 1 FROM ingest_window_done WHERE batcher = ?1 AND message_id = ?3)
ON CONFLICT (batcher, message_id) DO NOTHING
"""

# Each key's pending count raised by what the append really inserted; a key with none
# pending opens its window now. (The WHERE keeps SQLite's parser from taking ON CONFLICT
# for a join's ON.)
COUNT_APPENDED = """
INSERT INTO ingest_window_keys (batcher, batch_key, opened_at, pending)
SELECT ?, batch_key, ?, count(*) FROM ingest_window_messages WHERE seq > ?
GROUP BY batch_key
ON CONFLICT (batcher, batch_key) DO UPDATE SET
    opened_at = CASE WHEN pending > 0 THEN opened_at ELSE excluded.opened_at END,
    pending = pending + excluded.pending
RETURNING pending
"""

# Due keys, oldest first, each with the seq of its `size`-th open message (NULL when it
# has fewer): the last member of the window it closes into.
PICK_DUE = """
SELECT k.batch_key, (
    SELECT m.seq FROM ingest_window_messages m
    WHERE m.batcher = k.batcher AND m.batch_key = k.batch_key AND m.window_id IS NULL
    ORDER BY m.seq LIMIT 1 OFFSET ?
) FROM ingest_window_keys k
WHERE k.batcher = ? AND k.pending > 0 AND (k.pending >= ? OR k.opened_at <= ?)
ORDER BY k.opened_at LIMIT ?
"""

# Per picked key (executemany), its open messages up to the last member, by the index
# of open messages. (One UPDATE joining the keys as JSON would scan every open message of
# the batcher: SQLite puts the virtual table inside the loop.)
ASSIGN = """
UPDATE ingest_window_messages SET window_id = ?
WHERE batcher = ? AND batch_key = ? AND window_id IS NULL AND seq <= ?
"""

# A window for each id that got members (the picked keys as one JSON parameter, [batch
# key, window id, last seq] each), opened when its key's window was.
CLOSE = """
INSERT INTO ingest_window_windows
    (id, batcher, batch_key, opened_at, closed_at, trigger, size, attempts, not_before)
SELECT m.window_id, k.batcher, k.batch_key, k.opened_at, ?,
    CASE WHEN count(*) >= ? THEN 'size' ELSE 'timeout' END, count(*), 0, 0
FROM json_each(?) AS p
JOIN ingest_window_messages m ON m.window_id = json_extract(p.value, '$[1]')
JOIN ingest_window_keys k ON k.batcher = m.batcher AND k.batch_key = m.batch_key
WHERE true
GROUP BY m.window_id
RETURNING batch_key, size
"""

# The key's pending count lowered by what its window took; the next window opens with
# the oldest message left.
REOPEN = """
UPDATE ingest_window_keys SET
    opened_at = CASE WHEN pending > ? THEN coalesce((
        SELECT appended_at FROM ingest_window_messages
        WHERE batcher = ? AND batch_key = ? AND window_id IS NULL
        ORDER BY seq LIMIT 1
    ), ?) ELSE opened_at END,
    pending = pending - ?
WHERE batcher = ? AND batch_key = ?
"""

# Ready windows but those this process's claims hold (a JSON list of ids).
READY = """
SELECT id, batch_key, opened_at, trigger, attempts FROM ingest_window_windows
WHERE batcher = ? AND not_before <= ? AND id NOT IN (SELECT value FROM json_each(?))
ORDER BY not_before, opened_at LIMIT ?
"""

MEMBERS = """
SELECT window_id, message_id, data, metadata FROM ingest_window_messages
WHERE window_id IN (SELECT value FROM json_each(?)) ORDER BY seq
"""

REMEMBER_DONE = """
INSERT INTO ingest_window_done (batcher, message_id, done_at)
SELECT batcher, message_id, ? FROM ingest_window_messages
WHERE window_id IN (SELECT value FROM json_each(?)) AND message_id IS NOT NULL
    AND message_id NOT IN (SELECT value FROM json_each(?))
ON CONFLICT DO NOTHING
"""

FORGET = "DELETE FROM ingest_window_done WHERE batcher = ? AND done_at < ?"

DELETE_MEMBERS = (
    "DELETE FROM ingest_window_messages WHERE window_id IN (SELECT value FROM json_each(?))"
)
DELETE_WINDOWS = "DELETE FROM ingest_window_windows WHERE id IN (SELECT value FROM json_each(?))"
RETRY = """
UPDATE ingest_window_windows SET attempts = attempts + 1, not_before = ?, last_error = ?
WHERE id = ?
"""

OPEN_WINDOWS = """
SELECT count(*), coalesce(sum(pending), 0), min(opened_at),
    (SELECT count(*) FROM ingest_window_windows WHERE batcher = ?)
FROM ingest_window_keys WHERE batcher = ? AND pending > 0
"""

BUSIEST = """
SELECT batch_key, pending FROM ingest_window_keys
WHERE batcher = ? AND pending > 0
ORDER BY pending DESC, batch_key LIMIT ?
"""


class SqliteWindows:
    """The `WindowStore` calls on SQLite. Transactions are begun and ended here with
    SQL of their own, so the engine's isolation level (autocommit or not) is no matter.

    `one_connection`: the engine hands every caller the same connection (an in-memory
    database lives in one), so reads wait for writes too: a read's rollback as the
    connection goes back to the pool would end a write's transaction halfway."""

    def __init__(self, engine: AsyncEngine, flush_lock: FlushLock, one_connection: bool) -> None:
        self._engine = engine
        self._flush_lock = flush_lock
        self._writing = asyncio.Lock()
        self._reading: AbstractAsyncContextManager[object] = (
            self._writing if one_connection else nullcontext()
        )
        self._claiming = asyncio.Lock()  # makes "select ready, mark held" one step
        self._held: set[str] = set()

    async def start(self) -> None:
        """Create the tables and indexes if missing, holding the write lock, so that
        processes starting at once create them once. Connections opening a new database
        at once may be told "database is locked" without waiting (its switch to WAL takes
        an exclusive lock, for which SQLite's busy handler does not always wait): tried
        again, a little later each time."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                async with self._immediate() as connection:
                    await connection.run_sync(metadata.create_all)
                return
            except OperationalError as error:
                if "locked" not in str(error) or attempt == START_ATTEMPTS:
                    raise
            await asyncio.sleep(0.05 * attempt)

    async def close(self) -> None:
        self._flush_lock.release()

    async def append(
        self, batcher: str, messages: Sequence[StoredMessage], rule: WindowRule, now: float
    ) -> int:
        if not messages:
            return 0
        rows = [(batcher, m.batch_key, m.message_id, m.data, m.metadata, now) for m in messages]
        async with self._immediate() as connection:
            last_seq = (await connection.exec_driver_sql(LAST_SEQ)).scalar_one()
            await connection.exec_driver_sql(INSERT_MESSAGES, rows)
            result = await connection.exec_driver_sql(COUNT_APPENDED, (batcher, now, last_seq))
            pending = result.scalars().all()
        return sum(count >= rule.size for count in pending)

    async def close_due(self, batcher: str, rule: WindowRule, now: float, limit: int) -> int:
        async with self._immediate() as connection:
            due = await connection.exec_driver_sql(
                PICK_DUE, (rule.size - 1, batcher, rule.size, now - rule.timeout, limit)
            )
            keys: Sequence[Any] = due.fetchall()
            picked = [
                [batch_key, uuid.uuid4().hex, LAST_SEQ_EVER if last is None else last]
                for batch_key, last in keys
            ]
            if not picked:
                return 0
            await connection.exec_driver_sql(
                ASSIGN, [(window_id, batcher, key, last) for key, window_id, last in picked]
            )
            closed = await connection.exec_driver_sql(CLOSE, (now, rule.size, json.dumps(picked)))
            sizes: Sequence[Any] = closed.fetchall()
            if sizes:  # always, unless a picked key had no open message after all
                await connection.exec_driver_sql(
                    REOPEN,
                    [(size, batcher, key, now, size, batcher, key) for key, size in sizes],
                )
        return len(sizes)

    @asynccontextmanager
    async def claim(self, batcher: str, now: float, limit: int) -> AsyncIterator[Claim]:
        """Windows for this process's claims only while it holds the flush lock; none
        for the others. Outcomes are applied in one short transaction at exit."""
        if not self._flush_lock.held():
            yield HeldWindows([])
            return
        async with self._claiming:
            windows = await self._ready(batcher, now, limit)
            self._held.update(window.id for window in windows)
        try:
            claim = HeldWindows(windows)
            yield claim
            if claim.done_ids or claim.retries:
                await self._apply(claim)
        finally:
            self._held.difference_update(window.id for window in windows)

    async def forget(self, batcher: str, before: float) -> None:
        """Forget the ids of messages done before `before`."""
        async with self._immediate() as connection:
            await connection.exec_driver_sql(FORGET, (batcher, before))

    async def open_windows(self, batcher: str, busiest: int = 5) -> OpenWindows:
        async with self._reading, self._engine.connect() as connection:
            result = await connection.exec_driver_sql(OPEN_WINDOWS, (batcher, batcher))
            figures: Sequence[Any] = result.one()
            largest: Sequence[Any] = (
                await connection.exec_driver_sql(BUSIEST, (batcher, busiest))
            ).all()
        windows, messages, oldest, closed = figures
        return OpenWindows(
            windows=windows,
            messages=messages,
            oldest_opened_at=oldest,
            closed=closed,
            busiest=tuple((key, pending) for key, pending in largest),
        )

    async def _ready(self, batcher: str, now: float, limit: int) -> list[StoredWindow]:
        """The ready windows no claim of this process holds, with their members."""
        async with self._reading, self._engine.connect() as connection:
            result = await connection.exec_driver_sql(
                READY, (batcher, now, json.dumps(sorted(self._held)), limit)
            )
            rows: Sequence[Any] = result.fetchall()
            if not rows:
                return []
            ids = json.dumps([row[0] for row in rows])
            members: Sequence[Any] = (await connection.exec_driver_sql(MEMBERS, (ids,))).fetchall()
        return _windows(rows, members)

    async def _apply(self, claim: HeldWindows) -> None:
        done = json.dumps(claim.done_ids)
        async with self._immediate() as connection:
            dead_lettered = json.dumps(claim.dead_lettered)
            await connection.exec_driver_sql(REMEMBER_DONE, (time.time(), done, dead_lettered))
            await connection.exec_driver_sql(DELETE_MEMBERS, (done,))
            await connection.exec_driver_sql(DELETE_WINDOWS, (done,))
            if claim.retries:
                await connection.exec_driver_sql(
                    RETRY, [(r.not_before, r.reason, r.window_id) for r in claim.retries]
                )

    @asynccontextmanager
    async def _immediate(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends and rolled back if it
        raises. BEGIN IMMEDIATE takes the write lock at once: a transaction that read
        first and then wrote would fail (SQLITE_BUSY) if another process wrote between."""
        async with self._writing, self._engine.connect() as connection:
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
            # Left by an exception, the connection rolls back as it goes back to the pool.
            yield connection
            await connection.exec_driver_sql("COMMIT")


def _windows(rows: Sequence[Any], members: Sequence[Any]) -> list[StoredWindow]:
    """Windows from their rows, each with its members (read in seq order) in that order."""
    messages: dict[str, list[StoredMessage]] = {row[0]: [] for row in rows}
    batch_keys = {row[0]: row[1] for row in rows}
    for window_id, message_id, data, metadata_ in members:
        messages[window_id].append(
            StoredMessage(batch_keys[window_id], data, metadata_, message_id)
        )
    return [
        StoredWindow(
            window_id, batch_key, opened_at, trigger_of(trigger), attempts, messages[window_id]
        )
        for window_id, batch_key, opened_at, trigger, attempts in rows
    ]
