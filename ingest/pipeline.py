"""Pipeline: the declaration of a pipeline, validated once, and its life cycle."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import structlog

from ingest._batch_processor import run_batch_processor
from ingest._batcher import BatcherStage
from ingest._buffer import Buffer
from ingest._processor import PROCESSOR_KEY, PROCESSOR_STAGE, run_processor
from ingest._rate_limiter import RateLimiter
from ingest._runtime import Batch, Runtime
from ingest._terminator import Stages, shut_down
from ingest.events import Event, EventBus
from ingest.handlers import Handlers, overrides
from ingest.message import Message, fail_with_exception
from ingest.options import Batcher, Processors, RateLimiting, positive_seconds
from ingest.producer import HOLD_SHARE, BoundProducer, PipelineShape, Producer
from ingest.topology import StageGroup, Topology
from ingest.typing import PartitionBy

logger = structlog.get_logger("ingest")

State = Literal["new", "running", "stopping", "stopped"]


class Pipeline:
    """A producer, a processor group and optional batchers, run with Broadway's semantics::

        pipeline = Pipeline(
            "bookings",
            BookingHandlers(),
            producer,
            processors=Processors(concurrency=4),
            batchers={"cinema": Batcher(batch_size=75)},
        )
        async with pipeline:
            ...

    Every option is checked here, so a configuration that cannot work fails before
    anything starts, with a message that says what to change.
    """

    def __init__(
        self,
        name: str,
        handlers: Handlers,
        producer: Producer,
        *,
        processors: Processors | None = None,
        batchers: Mapping[str, Batcher] | None = None,
        context: Any = None,
        partition_by: PartitionBy | None = None,
        rate_limiting: RateLimiting | None = None,
        shutdown_timeout: float = 30.0,
        handler_timeout: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("pipeline name must be a non-empty string")
        if not isinstance(handlers, Handlers):
            raise TypeError(f"handlers must subclass ingest.Handlers, got {type(handlers)!r}")
        if not overrides(handlers, "handle_message"):
            raise TypeError(f"{type(handlers).__name__} must define handle_message")
        if not isinstance(producer, Producer):
            raise TypeError(
                f"producer must implement ingest.Producer (start, drain, close), "
                f"got {type(producer)!r}"
            )
        batchers = dict(batchers or {})
        for batcher_name, options in batchers.items():
            if not isinstance(batcher_name, str) or not batcher_name:
                raise ValueError(f"batcher names must be non-empty strings, got {batcher_name!r}")
            if not isinstance(options, Batcher):
                raise TypeError(f"batcher {batcher_name!r} must be an ingest.Batcher")
        if batchers and not overrides(handlers, "handle_batch"):
            raise TypeError(
                f"{type(handlers).__name__} declares batchers "
                f"({', '.join(batchers)}) but does not define handle_batch"
            )
        if partition_by is not None and not callable(partition_by):
            raise TypeError("partition_by must be a callable taking a message, returning an int")
        positive_seconds("pipeline", "shutdown_timeout", shutdown_timeout)
        if handler_timeout is not None:
            positive_seconds("pipeline", "handler_timeout", handler_timeout)

        self.name = name
        self.handlers = handlers
        self.producer = producer
        self.processors = processors or Processors()
        self.batchers: dict[str, Batcher] = batchers
        self.context = context
        self.partition_by = partition_by
        self.shutdown_timeout = float(shutdown_timeout)
        self.handler_timeout = handler_timeout
        self.events = EventBus()
        self._producer_holds: int | None = None
        if isinstance(producer, BoundProducer):
            self._producer_holds = producer.bind(
                PipelineShape(name, self.processors, batchers, partition_by is not None)
            )
        self._rate_limiter = RateLimiter(rate_limiting) if rate_limiting else None
        self._state: State = "new"
        self._runtime: Runtime | None = None
        self._stages: Stages | None = None
        self._stopped = asyncio.Event()

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged."""
        return self._runtime.in_flight if self._runtime else 0

    # -- rate limiting -------------------------------------------------------------------

    @property
    def rate_limiting(self) -> RateLimiting | None:
        return self._rate_limiter.limits if self._rate_limiter else None

    def update_rate_limiting(
        self, *, allowed_messages: int | None = None, interval: float | None = None
    ) -> None:
        """Change the rate limit while running (Broadway's `update_rate_limiting/2`)."""
        if self._rate_limiter is None:
            raise RuntimeError(f"pipeline {self.name!r} was built without rate_limiting")
        current = self._rate_limiter.limits
        self._rate_limiter.update(
            RateLimiting(
                allowed_messages=current.allowed_messages
                if allowed_messages is None
                else allowed_messages,
                interval=current.interval if interval is None else interval,
            )
        )

    # -- topology ------------------------------------------------------------------------

    def topology(self) -> Topology:
        processors = self.processors
        # A producer made of several consumers says how many (RabbitMQ's `concurrency`).
        producers = getattr(self.producer, "concurrency", 1)
        return Topology(
            pipeline=self.name,
            producer=StageGroup(
                type(self.producer).__name__,
                producers,
                tuple(f"{self.name}.producer_{i}" for i in range(producers)),
            ),
            processors=StageGroup(
                PROCESSOR_KEY,
                processors.concurrency,
                tuple(f"{self.name}.{PROCESSOR_STAGE}{i}" for i in range(processors.concurrency)),
                {"max_demand": processors.max_demand},
            ),
            batchers=tuple(
                StageGroup(
                    name,
                    options.concurrency,
                    tuple(
                        f"{self.name}.batch_processor_{name}_{i}"
                        for i in range(options.concurrency)
                    ),
                    {
                        "batch_size": options.max_messages or "custom",
                        "batch_timeout": options.batch_timeout,
                    },
                )
                for name, options in self.batchers.items()
            ),
        )

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every stage, then the producer."""
        if self._state != "new":
            raise RuntimeError(f"pipeline {self.name!r} is {self._state}; a pipeline starts once")
        self._state = "running"
        processors = self.processors
        rt = Runtime(
            pipeline=self.name,
            handlers=self.handlers,
            context=self.context,
            events=self.events,
            handler_timeout=self.handler_timeout,
            partition_by=self.partition_by,
            rate_limiter=self._rate_limiter,
        )
        resume_at = processors.max_demand - processors.effective_min_demand
        # A producer that holds N unacknowledged messages (a broker's prefetch) can always
        # hand them all over: they are bounded by it, and the broker waits for acks.
        holds = self._producer_holds or 0
        if self.partition_by is None:
            capacity = max(processors.concurrency * processors.max_demand, holds)
            inboxes = [Buffer[Message](capacity, resume_at)]
        else:
            capacity = max(processors.max_demand, holds)
            inboxes = [Buffer[Message](capacity, resume_at) for _ in range(processors.concurrency)]
        if holds:
            # Batches close early rather than hold three quarters of the producer's
            # unacknowledged messages: see BatcherStage.
            rt.hold_limit = max(1, math.floor(holds * HOLD_SHARE))
        stages = Stages(intake=inboxes)
        for name, options in self.batchers.items():
            self._start_batcher(rt, stages, name, options)
        for index in range(processors.concurrency):
            worker = f"{PROCESSOR_STAGE}{index}"
            inbox = inboxes[index if self.partition_by else 0]
            stages.processors.append(
                self._spawn(run_processor(rt, worker, inbox, processors.max_demand), worker)
            )
        self._runtime, self._stages = rt, stages
        if self.events:
            self.events.emit(Event("pipeline.start", self.name, "pipeline"))
        await self.producer.start(_Intake(rt, inboxes, processors.concurrency))
        logger.info(
            "pipeline started",
            pipeline=self.name,
            processors=processors.concurrency,
            batchers=list(self.batchers),
        )

    def _start_batcher(self, rt: Runtime, stages: Stages, name: str, options: Batcher) -> None:
        """One batcher stage and its batch processors, with a closed batch waiting for each
        (one per partition when partitioned: a partition keeps its batch processor)."""
        processors = self.processors
        # A batcher's inbox holds a few batches' worth of messages.
        capacity = max(
            processors.concurrency * processors.max_demand, options.max_messages or 1_000
        )
        inbox = Buffer[Message](capacity, capacity // 2)
        rt.batcher_inboxes[name] = inbox
        stages.batcher_inboxes.append(inbox)
        partitioned = self.partition_by is not None
        outboxes = [
            Buffer[Batch](1 if partitioned else options.concurrency)
            for _ in range(options.concurrency if partitioned else 1)
        ]
        batcher = BatcherStage(rt, name, options, inbox, outboxes)
        stages.batchers.append(self._spawn(batcher.run(), f"batcher_{name}"))
        for index in range(options.concurrency):
            worker = f"batch_processor_{name}_{index}"
            outbox = outboxes[index if partitioned else 0]
            stages.batch_processors.append(
                self._spawn(run_batch_processor(rt, worker, outbox), worker)
            )

    async def stop(self) -> None:
        """Drain and stop: see `ingest._terminator.shut_down`. Safe to call more than once."""
        if self._state in ("new", "stopped"):
            self._state = "stopped"
            self._stopped.set()
            return
        if self._state == "stopping":
            await self._stopped.wait()
            return
        self._state = "stopping"
        assert self._runtime is not None
        assert self._stages is not None
        try:
            await shut_down(self._runtime, self.producer, self._stages, self.shutdown_timeout)
        finally:
            self._state = "stopped"
            self._stopped.set()
            if self.events:
                self.events.emit(Event("pipeline.stop", self.name, "pipeline"))

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, coroutine: Any, worker: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=f"{self.name}.{worker}")
        task.add_done_callback(self._stage_done)
        return task

    def _stage_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Hook failures never get here; this is a bug in the engine, said loudly.
            logger.error(
                "pipeline stage crashed",
                pipeline=self.name,
                stage=task.get_name(),
                exc_info=task.exception(),
            )


class _Intake:
    """The sink producers push into: counts what arrives and routes it to the processors,
    by partition when the pipeline has `partition_by`."""

    def __init__(self, rt: Runtime, inboxes: list[Buffer[Message]], concurrency: int) -> None:
        self._rt = rt
        self._inboxes = inboxes
        self._concurrency = concurrency

    async def push(self, messages: Sequence[Message]) -> None:
        rt = self._rt
        rt.received += len(messages)
        if rt.partition_by is None:
            await self._inboxes[0].put_many(messages)
            return
        for slot, group in self._by_slot(messages).items():
            await self._inboxes[slot].put_many(group)

    def push_nowait(self, messages: Sequence[Message]) -> bool:
        rt = self._rt
        if rt.partition_by is None:
            taken = self._inboxes[0].put_nowait(messages)
        else:
            groups = self._by_slot(messages)
            if any(
                len(self._inboxes[slot]) + len(group) > self._inboxes[slot].capacity
                for slot, group in groups.items()
            ):
                return False
            taken = all(self._inboxes[slot].put_nowait(group) for slot, group in groups.items())
        if taken:
            rt.received += len(messages)
        return taken

    def _by_slot(self, messages: Sequence[Message]) -> dict[int, list[Message]]:
        partition_by = self._rt.partition_by
        assert partition_by is not None
        slots: dict[int, list[Message]] = {}
        for message in messages:
            try:
                slot = partition_by(message) % self._concurrency
            except Exception as exc:
                # Still delivered (to the first processor), as failed: it skips handle_message.
                fail_with_exception(message, exc, "partition_by")
                slot = 0
            slots.setdefault(slot, []).append(message)
        return slots
