"""Window stores shipped with the engine (the SQL one is `ingest.sql`)."""

from ingest.stores.memory import MemoryWindowStore

__all__ = ["MemoryWindowStore"]
