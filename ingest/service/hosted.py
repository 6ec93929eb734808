"""The hosted-pipeline contract: what the service needs of a pipeline it runs, and how an
installed pipeline is built (`PipelineFactory`, under the `ingest.pipelines` entry points).

The service names no pipeline: a pipeline declares its settings model, its start-up and
shutdown hooks, its sample payloads, the uploads it takes, and how `ingest publish`
reaches it; what its producer can do (readiness, counters, queues, prefetch, an end of
input) is asked of the producer's capability protocols (ingest.producer), once, here."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict, Unpack, runtime_checkable

from ingest.pipeline import Pipeline
from ingest.producer import (
    ConsumingProducer,
    Counters,
    CountingProducer,
    FiniteProducer,
    PrefetchingProducer,
    QueueProducer,
)
from ingest.rabbitmq.options import AfterConnect
from ingest.rabbitmq.publisher import OutgoingMessage

if TYPE_CHECKING:
    from ingest.service.settings import PipelineSettings, Settings
    from ingest.service.uploads import FileProcessing


class Hooks(TypedDict, total=False):
    """What a pipeline brings to its hosting beside the pipeline: see HostedPipeline."""

    startup: Callable[[], Awaitable[None]] | None
    shutdown: Callable[[], Awaitable[None]] | None
    samples: Callable[[int], list[bytes]] | None
    uploads: FileProcessing | None
    route: Route | None


@dataclass
class HostedPipeline:
    """A pipeline as the service runs it, with what it needs around it.

    `startup` runs before the pipeline starts (create the schema, check the database:
    raise StartupError if it cannot work) and `shutdown` after it stopped. `finished`
    (file producers) stops the service once set. `samples(n)` makes n example payloads for
    `ingest publish --count`. `ready` says whether the producer consumes (a broker
    connection is up); `not_ready()` covers the pipeline's own state too. `uploads`, when
    the pipeline takes uploaded files (`POST /uploads/<name>`), processes them. `route`,
    when set, is how `ingest publish` reaches it (else: its queue). `work_queues` are the
    queues it consumes (its dead letters go back there), `queues` those and their retry
    and dead-letter queues (the queue depths), `prefetch` how many unacknowledged messages
    its producer may hold.
    """

    pipeline: Pipeline
    queue: str | None
    ready: Callable[[], bool]
    stats: Counters | None = None
    startup: Callable[[], Awaitable[None]] | None = None
    shutdown: Callable[[], Awaitable[None]] | None = None
    samples: Callable[[int], list[bytes]] | None = None
    finished: asyncio.Event | None = None
    uploads: FileProcessing | None = None
    route: Route | None = None
    work_queues: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    prefetch: int | None = None

    def not_ready(self) -> str | None:
        """Why the pipeline is not ready (for /readyz), or None while it is running and
        consuming."""
        pipeline = self.pipeline
        state = pipeline.state
        if state == "running" and pipeline.holds:
            return ", ".join(sorted(pipeline.holds))  # "paused", "circuit open"
        if state == "running":
            return None if self.ready() else "not consuming: no broker connection"
        if state in ("restarting", "failed"):
            return f"{state}: {pipeline.failure}"
        return state

    @classmethod
    def of(cls, pipeline: Pipeline, queue: str | None, **hooks: Unpack[Hooks]) -> HostedPipeline:
        """Host `pipeline`, reading what its producer offers off its capability
        protocols: a consuming producer is ready while it consumes, any other always;
        a finite one (a file) ends the service once it is done."""
        producer = pipeline.producer
        consuming = producer if isinstance(producer, ConsumingProducer) else None
        from_queues = producer if isinstance(producer, QueueProducer) else None
        return cls(
            pipeline=pipeline,
            queue=queue,
            ready=(lambda: consuming.ready) if consuming else (lambda: True),
            stats=producer.stats if isinstance(producer, CountingProducer) else None,
            finished=producer.finished if isinstance(producer, FiniteProducer) else None,
            work_queues=from_queues.work_queues() if from_queues else [],
            queues=from_queues.queues() if from_queues else [],
            prefetch=producer.prefetch if isinstance(producer, PrefetchingProducer) else None,
            **hooks,
        )


@dataclass(frozen=True)
class Route:
    """How `ingest publish` reaches a pipeline that is not fed by its queue alone (a
    partitioned one): the message for a payload, and what to declare before publishing
    (`Publisher(after_connect=...)`). `target` names where it goes, for people."""

    message: Callable[[bytes], OutgoingMessage]
    after_connect: AfterConnect
    target: str


class PipelineFactory(Protocol):
    """Builds a hosted pipeline from the settings, without I/O (that is `startup`'s).
    With `source`, the pipeline reads that file instead of its queue."""

    def __call__(self, settings: Settings, *, source: Path | None = None) -> HostedPipeline: ...


@runtime_checkable
class DeclaresSettings(Protocol):
    """A factory whose pipeline has settings of its own beside the common ones
    (`INGEST_PIPELINES__<NAME>__...`): `settings_model`, a PipelineSettings subclass, is
    how they are read and checked."""

    @property
    def settings_model(self) -> type[PipelineSettings]: ...
