"""Fixtures for the engine's unit tests: pipelines on the in-memory producer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ingest import Handlers, InMemoryProducer, Pipeline

MakePipeline = Callable[..., Awaitable[Pipeline]]


@pytest.fixture
async def make_pipeline() -> AsyncIterator[MakePipeline]:
    """Build and start pipelines on an InMemoryProducer; every one is stopped afterwards."""
    started: list[Pipeline] = []

    async def make(handlers: Handlers, **options: Any) -> Pipeline:
        options.setdefault("shutdown_timeout", 5.0)
        pipeline = Pipeline("test", handlers, InMemoryProducer(), **options)
        await pipeline.start()
        started.append(pipeline)
        return pipeline

    yield make
    for pipeline in started:
        await pipeline.stop()
