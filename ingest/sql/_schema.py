"""The window store's four tables, the same on PostgreSQL and SQLite.

Times are float seconds since the epoch (`time.time()`), as the `WindowStore` contract
has them, so that replicas and the store agree without time zones."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = ["DONE", "KEYS", "MESSAGES", "WINDOWS", "metadata"]

metadata = MetaData()

# One row per batch key of a batcher: its open window. `pending` counts the key's messages
# in no closed window yet and `opened_at` is when the oldest of them came, so that finding
# the due windows reads this small table, never the messages.
KEYS = Table(
    "ingest_window_keys",
    metadata,
    Column("batcher", Text, primary_key=True),
    Column("batch_key", Text, primary_key=True),
    Column("opened_at", Double, nullable=False),
    Column("pending", BigInteger, nullable=False),
    # A key whose window closed keeps its row with pending 0; the due ones are few.
    Index(
        "ingest_window_keys_due",
        "batcher",
        "opened_at",
        postgresql_where=text("pending > 0"),
        sqlite_where=text("pending > 0"),
    ),
)

# Every stored message, open (window_id NULL) or a member of a closed window. `seq` orders
# a key's messages as they were appended: a window's members are its key's oldest.
MESSAGES = Table(
    "ingest_window_messages",
    metadata,
    # INTEGER PRIMARY KEY on SQLite (the rowid itself: BIGINT would not be), AUTOINCREMENT
    # so that a seq is never reused and `seq >` a value read at a transaction's start
    # names exactly the rows it inserted; BIGSERIAL on PostgreSQL.
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("batcher", Text, nullable=False),
    Column("batch_key", Text, nullable=False),
    Column("window_id", Text, nullable=True),
    Column("message_id", Text, nullable=True),
    Column("data", Text, nullable=False),
    Column("metadata", Text, nullable=False),
    Column("appended_at", Double, nullable=False),
    # A redelivered message (same id) is skipped on append; messages without an id are
    # NULLs here, which never conflict.
    UniqueConstraint("batcher", "message_id", name="ingest_window_messages_message_id"),
    # A key's open messages in order: what closing a window takes, and its successor's
    # open time. Partial, so it stays as small as the open windows.
    Index(
        "ingest_window_messages_open",
        "batcher",
        "batch_key",
        "seq",
        postgresql_where=text("window_id IS NULL"),
        sqlite_where=text("window_id IS NULL"),
    ),
    Index("ingest_window_messages_window", "window_id"),
    sqlite_autoincrement=True,
)

# Closed windows, until done: members fixed, an id that every attempt of it shares.
WINDOWS = Table(
    "ingest_window_windows",
    metadata,
    Column("id", Text, primary_key=True),
    Column("batcher", Text, nullable=False),
    Column("batch_key", Text, nullable=False),
    Column("opened_at", Double, nullable=False),
    Column("closed_at", Double, nullable=False),
    Column("trigger", Text, nullable=False),  # 'size' | 'timeout'
    Column("size", Integer, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("not_before", Double, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    # Claims take the ready windows of a batcher, earliest retry time first.
    Index("ingest_window_windows_ready", "batcher", "not_before", "opened_at"),
)

# The ids of messages whose window was done, for a while (SqlWindowStore's remember_done):
# a redelivery of one (its acknowledgement was lost, or its publisher sent it again) joins
# no second window.
DONE = Table(
    "ingest_window_done",
    metadata,
    Column("batcher", Text, primary_key=True),
    Column("message_id", Text, primary_key=True),
    Column("done_at", Double, nullable=False),
    Index("ingest_window_done_at", "batcher", "done_at"),
)
