"""Producers shipped with ingest."""

from ingest.producers.memory import InMemoryProducer

__all__ = ["InMemoryProducer"]
