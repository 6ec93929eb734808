"""Durable windows in SQL: the `ingest.windows.WindowStore` contract on PostgreSQL and
SQLite, with SQLAlchemy's async engine. Its own layer: it uses the engine's contract and
nothing of the connector or the service."""

from ingest.sql._store import SqlWindowStore

__all__ = ["SqlWindowStore"]
