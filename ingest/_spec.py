"""The pipeline spec: a pipeline's declaration, checked once and frozen, and the sizes its
supervisor builds the stages with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ingest.handlers import Handlers, overrides
from ingest.options import Batcher, CircuitBreaker, Processors, RateLimiting, positive_seconds
from ingest.producer import BoundProducer, PausableProducer, PipelineShape, Producer
from ingest.typing import PartitionBy


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSpec:
    """What `Pipeline(...)` declared, valid: the supervisor builds every generation from it
    (stages, buffers, restart intensity) and reads nothing else of the pipeline. Built by
    `pipeline_spec`, which checks every argument."""

    name: str
    handlers: Handlers
    producer: Producer
    processors: Processors
    batchers: Mapping[str, Batcher]  # read-only, in declaration order
    context: Any
    partition_by: PartitionBy | None
    rate_limiting: RateLimiting | None
    circuit_breaker: CircuitBreaker | None
    shutdown_timeout: float
    handler_timeout: float | None
    # OTP's restart intensity: more than `max_restarts` crashes within `max_seconds` and
    # the pipeline fails.
    max_restarts: int
    max_seconds: float
    shape: PipelineShape
    # How many unacknowledged messages the producer may hold at once (a broker's prefetch),
    # as it said when bound to the shape; None when nothing bounds it.
    producer_holds: int | None

    @property
    def hold_limit(self) -> int | None:
        """How many messages open batches may hold before the oldest closes early (see
        BatcherStage); None when the producer's holds are unbounded."""
        holds = self.producer_holds
        return self.shape.hold_limit(holds) if holds else None

    @property
    def inboxes(self) -> int:
        """How many processor inboxes: one shared, or one per processor when partitioned
        (a partition keeps its processor)."""
        return 1 if self.partition_by is None else self.processors.concurrency

    @property
    def inbox_capacity(self) -> int:
        """What one processor inbox holds. A producer that holds N unacknowledged messages
        (a broker's prefetch) can always hand them all over: they are bounded by it, and
        the broker waits for acks."""
        processors = self.processors
        holds = self.producer_holds or 0
        if self.partition_by is None:
            return max(processors.concurrency * processors.max_demand, holds)
        return max(processors.max_demand, holds)

    @property
    def inbox_resume_at(self) -> int:
        """The free places a full processor inbox waits for before a producer goes on."""
        return self.processors.max_demand - self.processors.effective_min_demand

    def batcher_capacity(self, options: Batcher) -> int:
        """What a batcher's inbox holds: a few batches' worth of messages (a durable one's:
        what one append takes)."""
        processors = self.processors
        batch = 1_000 if options.windows is not None else (options.max_messages or 1_000)
        return max(processors.concurrency * processors.max_demand, batch)


def pipeline_spec(
    name: str,
    handlers: Handlers,
    producer: Producer,
    *,
    processors: Processors | None,
    batchers: Mapping[str, Batcher] | None,
    context: Any,
    partition_by: PartitionBy | None,
    rate_limiting: RateLimiting | None,
    circuit_breaker: CircuitBreaker | None,
    shutdown_timeout: float,
    handler_timeout: float | None,
    max_restarts: int,
    max_seconds: float,
) -> PipelineSpec:
    """Check every argument of `Pipeline(...)`, in order, with an error that says what to
    change; then bind a `BoundProducer` to the pipeline's shape (it may refuse it)."""
    _check_parts(name, handlers, producer)
    declared = _checked_batchers(handlers, batchers)
    if partition_by is not None and not callable(partition_by):
        raise TypeError("partition_by must be a callable taking a message, returning an int")
    positive_seconds("pipeline", "shutdown_timeout", shutdown_timeout)
    if handler_timeout is not None:
        positive_seconds("pipeline", "handler_timeout", handler_timeout)
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"pipeline: max_restarts must be an int >= 0, got {max_restarts!r}")
    positive_seconds("pipeline", "max_seconds", max_seconds)
    if circuit_breaker is not None and not isinstance(producer, PausableProducer):
        raise TypeError(
            f"a circuit breaker pauses the producer: {type(producer).__name__} cannot pause"
        )
    processors = processors or Processors()
    frozen = MappingProxyType(declared)
    shape = PipelineShape(name, processors, frozen, partition_by is not None)
    return PipelineSpec(
        name=name,
        handlers=handlers,
        producer=producer,
        processors=processors,
        batchers=frozen,
        context=context,
        partition_by=partition_by,
        rate_limiting=rate_limiting,
        circuit_breaker=circuit_breaker,
        shutdown_timeout=float(shutdown_timeout),
        handler_timeout=handler_timeout,
        max_restarts=max_restarts,
        max_seconds=float(max_seconds),
        shape=shape,
        producer_holds=producer.bind(shape) if isinstance(producer, BoundProducer) else None,
    )


def _check_parts(name: str, handlers: Handlers, producer: Producer) -> None:
    """The pipeline's name, its handlers and its producer."""
    if not isinstance(name, str) or not name:
        raise ValueError("pipeline name must be a non-empty string")
    if not isinstance(handlers, Handlers):
        raise TypeError(f"handlers must subclass ingest.Handlers, got {type(handlers)!r}")
    if not overrides(handlers, "handle_message"):
        raise TypeError(f"{type(handlers).__name__} must define handle_message")
    if not isinstance(producer, Producer):
        raise TypeError(
            f"producer must implement ingest.Producer (start, drain, close), got {type(producer)!r}"
        )


def _checked_batchers(
    handlers: Handlers, batchers: Mapping[str, Batcher] | None
) -> dict[str, Batcher]:
    """The batchers declared (a copy), each a named `Batcher`, with a `handle_batch` to
    run on their batches."""
    declared = dict(batchers or {})
    for batcher_name, options in declared.items():
        if not isinstance(batcher_name, str) or not batcher_name:
            raise ValueError(f"batcher names must be non-empty strings, got {batcher_name!r}")
        if not isinstance(options, Batcher):
            raise TypeError(f"batcher {batcher_name!r} must be an ingest.Batcher")
    if declared and not overrides(handlers, "handle_batch"):
        raise TypeError(
            f"{type(handlers).__name__} declares batchers "
            f"({', '.join(declared)}) but does not define handle_batch"
        )
    return declared
