"""The pipeline spec: the declaration, checked once and frozen, and the sizes the supervisor
builds every generation's stages with."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from ingest import Batcher, BatchInfo, Handlers, InMemoryProducer, Message, Pipeline, Processors
from ingest._spec import PipelineSpec, pipeline_spec
from ingest.producer import PipelineShape
from ingest.stores.memory import MemoryWindowStore
from ingest.windows import DurableWindows


class Batching(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        return messages


class NoDeadLetters:
    async def dead_letter(self, messages: Sequence[Message]) -> None:
        raise AssertionError("nothing is flushed here")


class Prefetching(InMemoryProducer):
    """A producer bound by a prefetch, as a broker's consumer is."""

    def __init__(self, prefetch: int) -> None:
        super().__init__()
        self.prefetch = prefetch
        self.shapes: list[PipelineShape] = []

    def bind(self, shape: PipelineShape) -> int:
        self.shapes.append(shape)
        return self.prefetch


def spec(producer: InMemoryProducer | None = None, **options: Any) -> PipelineSpec:
    arguments: dict[str, Any] = {
        "processors": None,
        "batchers": None,
        "context": None,
        "partition_by": None,
        "rate_limiting": None,
        "circuit_breaker": None,
        "shutdown_timeout": 30.0,
        "handler_timeout": None,
        "max_restarts": 3,
        "max_seconds": 5.0,
    }
    arguments.update(options)
    return pipeline_spec("test", Batching(), producer or InMemoryProducer(), **arguments)


def test_the_declaration_cannot_change_once_checked() -> None:
    batchers = {"default": Batcher(batch_size=10)}
    pipeline = Pipeline("test", Batching(), InMemoryProducer(), batchers=batchers)
    batchers["late"] = Batcher()  # the caller's dict was copied
    assert list(pipeline.batchers) == ["default"]
    with pytest.raises(TypeError):
        pipeline.batchers["late"] = Batcher()  # type: ignore[index]
    with pytest.raises(AttributeError):
        pipeline.shutdown_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec().max_restarts = 10  # type: ignore[misc]


def test_a_bound_producer_is_bound_once_to_the_pipelines_shape() -> None:
    producer = Prefetching(500)
    built = spec(producer, batchers={"default": Batcher(batch_size=100)}, partition_by=hash)
    assert producer.shapes == [built.shape]
    assert built.shape.partitioned
    assert built.producer_holds == 500
    assert built.hold_limit == 375  # 3/4 of the prefetch


def test_without_a_bound_nothing_closes_batches_early() -> None:
    built = spec(batchers={"default": Batcher(batch_size=100)})
    assert built.producer_holds is None
    assert built.hold_limit is None
    pipeline = Pipeline("test", Batching(), Prefetching(500), batchers={"default": Batcher()})
    assert pipeline.close_early_at == 375


@pytest.mark.parametrize(
    ("prefetch", "partitioned", "inboxes", "capacity"),
    [
        (None, False, 1, 4 * 50),  # one shared inbox: every processor's demand
        (1_000, False, 1, 1_000),  # ... or the whole prefetch, when it is more
        (None, True, 4, 50),  # one inbox per processor: its demand
        (1_000, True, 4, 1_000),  # ... each able to take the whole prefetch
    ],
    ids=["shared", "shared-prefetch", "partitioned", "partitioned-prefetch"],
)
def test_processor_inboxes_can_take_what_the_producer_holds(
    prefetch: int | None, partitioned: bool, inboxes: int, capacity: int
) -> None:
    producer = InMemoryProducer() if prefetch is None else Prefetching(prefetch)
    built = spec(
        producer,
        processors=Processors(concurrency=4, max_demand=50, min_demand=10),
        partition_by=hash if partitioned else None,
    )
    assert (built.inboxes, built.inbox_capacity) == (inboxes, capacity)
    assert built.inbox_resume_at == 40  # max_demand - min_demand


def test_a_batchers_inbox_holds_a_few_batches() -> None:
    built = spec(processors=Processors(concurrency=4, max_demand=50))
    assert built.batcher_capacity(Batcher(batch_size=5_000)) == 5_000
    assert built.batcher_capacity(Batcher(batch_size=10)) == 200  # the processors' demand
    windows = DurableWindows(MemoryWindowStore(), NoDeadLetters())
    assert built.batcher_capacity(Batcher(batch_size=5_000, windows=windows)) == 1_000
