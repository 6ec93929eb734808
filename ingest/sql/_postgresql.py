"""PostgresWindows: the window store on PostgreSQL (asyncpg), each call one statement.

The SQL is fixed text in asyncpg's own parameter style, run with `exec_driver_sql`:
SQLAlchemy compiles nothing and asyncpg prepares each statement once per connection,
whatever the number of messages (lists travel as arrays, spread by `unnest`).

Between replicas, row locks do the work: appends lock their keys' rows in one order (no
deadlock), closing takes keys `FOR UPDATE SKIP LOCKED` (two replicas never close the same
key at once, and neither waits for the other), and a claim holds its windows' rows locked
in a transaction for as long as it lasts — a process that dies takes its locks with it,
and its windows are claimable again."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ingest.sql._claim import HeldWindows, trigger_of
from ingest.sql._schema import metadata
from ingest.windows import Claim, OpenWindows, StoredMessage, StoredWindow, WindowRule

__all__ = ["PostgresWindows"]

# Any constant that other applications sharing the database do not use for their locks.
SCHEMA_LOCK_KEY = 0x1E57_3A11

# Messages in, duplicates (by id: stored, or done not long ago) skipped, and each touched
# key's pending count raised by what was really inserted; a key with none pending opens
# its window now. The keys are upserted in batch_key order, so that appends touching the
# same keys lock their rows in the same order and never deadlock. Returns how many
# touched keys are due by size.
APPEND = """
WITH given AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS given (batch_key, message_id, data, metadata, position)
), inserted AS (
    INSERT INTO ingest_window_messages
        (batcher, batch_key, message_id, data, metadata, appended_at)
    SELECT $1::text, batch_key, message_id, data, metadata, $2::float8
    FROM given g
    WHERE g.message_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM ingest_window_done d
        WHERE d.batcher = $1::text AND d.message_id = g.message_id
    )
    ORDER BY position
    ON CONFLICT (batcher, message_id) DO NOTHING
    RETURNING batch_key
), added AS (
    SELECT batch_key, count(*) AS added FROM inserted GROUP BY batch_key
), touched AS (
    INSERT INTO ingest_window_keys AS k (batcher, batch_key, opened_at, pending)
    SELECT $1::text, batch_key, $2::float8, added FROM added ORDER BY batch_key
    ON CONFLICT (batcher, batch_key) DO UPDATE SET
        opened_at = CASE WHEN k.pending > 0 THEN k.opened_at ELSE excluded.opened_at END,
        pending = k.pending + excluded.pending
    RETURNING pending
)
SELECT count(*) FROM touched WHERE pending >= $7::bigint
"""

# Due keys, locked or skipped; for each a window of its oldest open messages. Under READ
# COMMITTED a key row locked here can be newer than this statement's snapshot (an append
# committed meanwhile): its messages are then not all visible, and an UPDATE skips a
# message another closer assigned since the snapshot (`window_id IS NULL` is checked
# again on the newest row). So the key's pending drops by what was really assigned, and
# a window is made only from assigned messages. The key's next window opens with its
# oldest message left, or now when those left are not visible yet.
CLOSE_DUE = """
WITH picked AS (
    SELECT batch_key, opened_at, replace(gen_random_uuid()::text, '-', '') AS id
    FROM ingest_window_keys
    WHERE batcher = $1::text AND pending > 0
        AND (pending >= $2::bigint OR opened_at <= $3::float8)
    ORDER BY opened_at
    LIMIT $4::bigint
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT p.id, oldest.seq FROM picked p CROSS JOIN LATERAL (
        SELECT m.seq FROM ingest_window_messages m
        WHERE m.batcher = $1::text AND m.batch_key = p.batch_key AND m.window_id IS NULL
        ORDER BY m.seq LIMIT $2::bigint
    ) oldest
), assigned AS (
    UPDATE ingest_window_messages m SET window_id = c.id
    FROM chosen c
    WHERE m.seq = c.seq AND m.window_id IS NULL
    RETURNING m.window_id, m.seq
), counted AS (
    SELECT window_id, count(*) AS size, max(seq) AS last_seq
    FROM assigned GROUP BY window_id
), closed AS (
    INSERT INTO ingest_window_windows
        (id, batcher, batch_key, opened_at, closed_at, trigger, size, attempts, not_before)
    SELECT c.window_id, $1::text, p.batch_key, p.opened_at, $5::float8,
        CASE WHEN c.size >= $2::bigint THEN 'size' ELSE 'timeout' END, c.size, 0, 0
    FROM counted c JOIN picked p ON p.id = c.window_id
    RETURNING id
), reopened AS (
    UPDATE ingest_window_keys k SET
        pending = k.pending - c.size,
        opened_at = CASE WHEN k.pending > c.size THEN coalesce((
            SELECT m.appended_at FROM ingest_window_messages m
            WHERE m.batcher = $1::text AND m.batch_key = p.batch_key
                AND m.window_id IS NULL AND m.seq > c.last_seq
            ORDER BY m.seq LIMIT 1
        ), $5::float8) ELSE k.opened_at END
    FROM counted c JOIN picked p ON p.id = c.window_id
    WHERE k.batcher = $1::text AND k.batch_key = p.batch_key
)
SELECT count(*) FROM closed
"""

# Ready windows, locked for this transaction or skipped (held by another claim), each
# with its members as arrays in append order: one row per window, one round trip.
CLAIM = """
WITH claimed AS (
    SELECT id, batch_key, opened_at, trigger, attempts, not_before
    FROM ingest_window_windows
    WHERE batcher = $1::text AND not_before <= $2::float8
    ORDER BY not_before, opened_at
    LIMIT $3::bigint
    FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.batch_key, c.opened_at, c.trigger, c.attempts,
    members.message_ids, members.data, members.metadata
FROM claimed c CROSS JOIN LATERAL (
    SELECT array_agg(m.message_id ORDER BY m.seq) AS message_ids,
        array_agg(m.data ORDER BY m.seq) AS data,
        array_agg(m.metadata ORDER BY m.seq) AS metadata
    FROM ingest_window_messages m WHERE m.window_id = c.id
) members
ORDER BY c.not_before, c.opened_at
"""

# A claim's outcomes, in the transaction that holds its windows; the ids of the done
# windows' messages are remembered, but those dead-lettered (a replay must get through).
APPLY = """
WITH finished AS (
    DELETE FROM ingest_window_windows WHERE id = ANY($1::text[])
), members AS (
    DELETE FROM ingest_window_messages WHERE window_id = ANY($1::text[])
    RETURNING batcher, message_id
), remembered AS (
    INSERT INTO ingest_window_done (batcher, message_id, done_at)
    SELECT batcher, message_id, $5::float8 FROM members
    WHERE message_id IS NOT NULL AND message_id <> ALL($6::text[])
    ON CONFLICT DO NOTHING
)
UPDATE ingest_window_windows w SET
    attempts = w.attempts + 1, not_before = r.not_before, last_error = r.reason
FROM unnest($2::text[], $3::float8[], $4::text[]) AS r (id, not_before, reason)
WHERE w.id = r.id
"""

FORGET = "DELETE FROM ingest_window_done WHERE batcher = $1::text AND done_at < $2::float8"

OPEN_WINDOWS = """
SELECT count(*), coalesce(sum(pending), 0), min(opened_at),
    (SELECT count(*) FROM ingest_window_windows WHERE batcher = $1::text)
FROM ingest_window_keys WHERE batcher = $1::text AND pending > 0
"""

BUSIEST = """
SELECT batch_key, pending FROM ingest_window_keys
WHERE batcher = $1::text AND pending > 0
ORDER BY pending DESC, batch_key LIMIT $2::bigint
"""


class PostgresWindows:
    """The `WindowStore` calls on PostgreSQL. `engine` may be at any isolation level: a
    single statement runs in autocommit (one round trip, atomic on its own), and what
    needs a transaction sets READ COMMITTED on its connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # The same pool, its connections switched to autocommit while checked out (a flag
        # in the driver: no round trip). In a transaction each call would also pay BEGIN
        # and COMMIT: three round trips instead of one.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def start(self) -> None:
        """Create the tables and indexes if missing. Several processes may start at once:
        each takes a lock for the whole transaction first, so one creates the schema and
        the others find it, instead of racing on CREATE TABLE."""
        async with self._transaction() as connection:
            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
            await connection.run_sync(metadata.create_all)

    async def close(self) -> None:
        """Nothing is held between calls: a claim's locks end with its transaction."""

    async def append(
        self, batcher: str, messages: Sequence[StoredMessage], rule: WindowRule, now: float
    ) -> int:
        if not messages:
            return 0
        parameters = (
            batcher,
            now,
            [message.batch_key for message in messages],
            [message.message_id for message in messages],
            [message.data for message in messages],
            [message.metadata for message in messages],
            rule.size,
        )
        # Not repeated on a dropped connection, unlike the calls below: the statement may
        # have been committed, and messages without an id would be stored twice.
        async with self._autocommit.connect() as connection:
            result = await connection.exec_driver_sql(APPEND, parameters)
            return int(result.scalar_one())

    async def close_due(self, batcher: str, rule: WindowRule, now: float, limit: int) -> int:
        parameters = (batcher, rule.size, now - rule.timeout, limit, now)
        rows = await self._execute(CLOSE_DUE, parameters)
        return int(rows[0][0])

    @asynccontextmanager
    async def claim(self, batcher: str, now: float, limit: int) -> AsyncIterator[Claim]:
        """The windows stay locked by this claim's transaction while its context runs;
        outcomes are applied and committed at exit, or the transaction is rolled back
        (an exception, a cancellation) and the windows are as they were."""
        async with self._transaction() as connection:
            result = await connection.exec_driver_sql(CLAIM, (batcher, now, limit))
            claim = HeldWindows([_window(row) for row in result.fetchall()])
            yield claim
            done, retries = claim.done_ids, claim.retries
            if done or retries:
                await connection.exec_driver_sql(
                    APPLY,
                    (
                        done,
                        [retry.window_id for retry in retries],
                        [retry.not_before for retry in retries],
                        [retry.reason for retry in retries],
                        time.time(),
                        claim.dead_lettered,
                    ),
                )

    async def forget(self, batcher: str, before: float) -> None:
        """Forget the ids of messages done before `before`."""
        await self._execute(FORGET, (batcher, before))

    async def open_windows(self, batcher: str, busiest: int = 5) -> OpenWindows:
        windows, messages, oldest, closed = (await self._execute(OPEN_WINDOWS, (batcher,)))[0]
        largest = await self._execute(BUSIEST, (batcher, busiest))
        return OpenWindows(
            windows=int(windows),
            messages=int(messages),
            oldest_opened_at=oldest,
            closed=int(closed),
            busiest=tuple((key, int(pending)) for key, pending in largest),
        )

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction at READ COMMITTED, whatever the engine's own level: row locks
        that skip what others hold, and statements that see what others committed."""
        async with self._engine.connect() as connection:
            await connection.execution_options(isolation_level="READ COMMITTED")
            async with connection.begin():
                yield connection

    async def _execute(self, sql: str, parameters: tuple[Any, ...]) -> Sequence[Any]:
        """One statement in autocommit, run once more on a new connection if the pooled
        one was dropped by the server (a restart, an idle timeout): no pre-ping is paid
        on every call for that, and these statements are safe to repeat."""
        try:
            return await self._execute_once(sql, parameters)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        return await self._execute_once(sql, parameters)

    async def _execute_once(self, sql: str, parameters: tuple[Any, ...]) -> Sequence[Any]:
        async with self._autocommit.connect() as connection:
            result = await connection.exec_driver_sql(sql, parameters)
            return result.fetchall() if result.returns_rows else []


def _window(row: Sequence[Any]) -> StoredWindow:
    window_id, batch_key, opened_at, trigger, attempts, ids, data, metadata_ = row
    members = (
        [
            StoredMessage(batch_key, datum, meta, message_id)
            for message_id, datum, meta in zip(ids, data, metadata_, strict=True)
        ]
        if ids is not None  # closing never makes an empty window; were there one, it can
        else []  # still be handed out and done
    )
    return StoredWindow(window_id, batch_key, opened_at, trigger_of(trigger), attempts, members)
