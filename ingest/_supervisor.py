"""The supervisor: a pipeline's stages and producer tasks under one task group, restarted
after a crash (Broadway's supervisor, OTP's restart intensity)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, Literal

import structlog

from ingest._batch_processor import run_batch_processor
from ingest._batcher import BatcherStage
from ingest._buffer import Buffer
from ingest._circuit import Circuit
from ingest._durable_batcher import DurableBatcherStage, Flusher
from ingest._intake import Intake
from ingest._processor import PROCESSOR_STAGE, run_processor
from ingest._rate_limiter import RateLimiter
from ingest._runtime import Batch, Runtime
from ingest._spec import PipelineSpec
from ingest._terminator import Stages, shut_down
from ingest.events import Event, EventBus
from ingest.exceptions import PipelineFailed, StageCrashed
from ingest.message import Message
from ingest.options import Batcher
from ingest.waiting import close_within

logger = structlog.get_logger("ingest")

State = Literal["new", "running", "restarting", "failed", "stopping", "stopped"]

# Restarts wait a little longer each time (0.5, 1, 2, 4, 5, 5 ... s), so that a pipeline
# crashing at once on start does not spin; the restart limit still applies.
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 5.0


class Supervisor:
    """Runs one pipeline: a *generation* is a runtime, its buffers and every stage and
    producer task, all children of one `asyncio.TaskGroup`. A drain ends a generation
    normally. An exception escaping any task crashes it: the task group cancels the rest,
    the producer is closed (a broker redelivers what was not acknowledged; nothing is
    acknowledged unprocessed), and a new generation starts after a delay — unless the
    pipeline crashed more than `max_restarts` times within `max_seconds`, when it fails.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        events: EventBus,
        rate_limiter: RateLimiter | None,
        circuit: Circuit | None,
    ) -> None:
        # What it builds each generation from: the pipeline's declaration, and the parts
        # that outlive a generation (events' subscribers, the rate limiter's current
        # limits, the circuit breaker's state).
        self.spec = spec
        self.events = events
        self.rate_limiter = rate_limiter
        self.circuit = circuit
        self.state: State = "new"
        self.crashes = 0
        self.failure: BaseException | None = None
        self._runtime: Runtime | None = None
        self._stages: Stages | None = None
        # The live generation's batcher stages.
        self.batchers: dict[str, BatcherStage | DurableBatcherStage] = {}
        self._task: asyncio.Task[None] | None = None
        self._intake: Intake | None = None  # the live generation's
        self._crash: StageCrashed | None = None
        self._stop_requested = asyncio.Event()
        self._log = logger.bind(pipeline=spec.name)

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    async def start(self) -> None:
        """Start the first generation; raise what prevented it (e.g. the producer's
        `start` raising), and the pipeline is then failed."""
        started = asyncio.get_running_loop().create_future()
        self.state = "running"
        self._task = asyncio.create_task(self._supervise(started), name=self.spec.name)
        self._task.add_done_callback(self._ended)
        try:
            await started
        except BaseException:
            await asyncio.wait([self._task])
            raise

    async def stop(self) -> None:
        """Drain the live generation, if any, and end supervision."""
        self._stop_requested.set()
        if self.state == "running":
            await self._drain()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self.state != "failed":
            self.state = "stopped"

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Supervision never ends silently: if the supervisor itself was cancelled or
        raised (a bug here), the pipeline is failed and says so."""
        error: BaseException | None
        if task.cancelled():
            error = asyncio.CancelledError("the supervisor was cancelled")
        else:
            error = task.exception()
        if error is None or self.state == "failed":
            return
        self.state = "failed"
        self.failure = error
        self._log.error("pipeline supervisor ended", error=repr(error), exc_info=error)

    async def _drain(self) -> None:
        self.state = "stopping"
        assert self._runtime is not None
        assert self._stages is not None
        await shut_down(self._runtime, self.spec.producer, self._stages, self.spec.shutdown_timeout)

    async def wait(self) -> None:
        """Return once supervision ended: stopped, or failed past the restart limit.
        Cancelling a waiter leaves the supervisor running (`asyncio.wait`, not `gather`)."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def _supervise(self, started: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        recent: deque[float] = deque()
        while True:
            try:
                await self._run_generation(started)
                return  # drained by stop()
            except BaseExceptionGroup as group:
                error = self._crash or _first(group)
            except asyncio.CancelledError:
                # Not how a pipeline stops (stop() drains it): hand back what it holds.
                await close_within(self.spec.producer.close(), self._log, "producer close")
                raise
            self.crashes += 1
            self.failure = error
            self._on_crash(error)
            producer = self.spec.producer
            await close_within(producer.close(), self._log, "producer close after a crash")
            if not started.done():
                self.state = "failed"
                started.set_exception(error)
                return
            if self._stop_requested.is_set():
                return
            now = loop.time()
            recent.append(now)
            while recent and recent[0] < now - self.spec.max_seconds:
                recent.popleft()
            if len(recent) > self.spec.max_restarts:
                self._give_up(error, len(recent))
                return
            self.state = "restarting"
            delay = min(_FIRST_DELAY_S * 2 ** (len(recent) - 1), _MAX_DELAY_S)
            self._log.warning("restarting the pipeline", delay=delay, crashes=self.crashes)
            try:
                async with asyncio.timeout(delay):
                    await self._stop_requested.wait()
                return  # stopped while waiting to restart
            except TimeoutError:
                pass

    async def _run_generation(self, started: asyncio.Future[None]) -> None:
        self._crash = None
        self._intake = None
        try:
            await self._generation(started)
        finally:
            self._end_intake()

    def _end_intake(self) -> None:
        """A push still waiting for the circuit breaker to let it in (an in-memory
        producer's caller) is told that its generation is over."""
        if self._intake is not None:
            self._intake.end()

    async def _generation(self, started: asyncio.Future[None]) -> None:
        spec = self.spec
        async with asyncio.TaskGroup() as group:

            def spawn(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
                task = group.create_task(coroutine, name=f"{spec.name}.{name}")
                task.add_done_callback(lambda task: self._note_crash(task, name))
                return task

            self._intake = intake = self._build(spawn)
            if self.events:
                self.events.emit(Event("pipeline.start", spec.name, "pipeline", "pipeline"))
            await spec.producer.start(intake)
            if not started.done():
                started.set_result(None)
            if self._stop_requested.is_set():
                # stop() came while this generation was starting after a crash.
                await self._drain()
                return
            self.state = "running"
            self._log.info(
                "pipeline started",
                processors=spec.processors.concurrency,
                batchers=list(spec.batchers),
                generation=self.crashes,
            )

    def _note_crash(self, task: asyncio.Task[None], stage: str) -> None:
        """Name the first task of a generation that ended with an exception (what escapes a
        stage; hooks' failures never do): the others are its consequences."""
        if self._crash is not None or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self._crash = StageCrashed(self.spec.name, stage, error)
            self._crash.__cause__ = error

    def _on_crash(self, error: BaseException) -> None:
        # The traceback is logged here, once; /readyz and the metrics say it too.
        self._log.error(
            "pipeline crashed; unacknowledged messages are left to the producer",
            error=str(error),
            crashes=self.crashes,
            exc_info=error,
        )
        if self.events:
            self.events.emit(
                Event("pipeline.crash", self.spec.name, "pipeline", "pipeline", exception=error)
            )

    def _give_up(self, error: BaseException, crashes: int) -> None:
        spec = self.spec
        self.state = "failed"
        self.failure = PipelineFailed(
            f"pipeline {spec.name!r} crashed {crashes} times within "
            f"{spec.max_seconds:g}s (max_restarts={spec.max_restarts}); last: {error}"
        )
        self.failure.__cause__ = error
        self._log.error("pipeline failed: restart limit reached", error=str(self.failure))

    def _build(self, spawn: Any) -> Intake:
        """A new runtime, its buffers and every stage, spawned; the intake for the producer."""
        spec = self.spec
        processors = spec.processors
        rt = Runtime(
            pipeline=spec.name,
            handlers=spec.handlers,
            context=spec.context,
            events=self.events,
            handler_timeout=spec.handler_timeout,
            partition_by=spec.partition_by,
            rate_limiter=self.rate_limiter,
            circuit=self.circuit,
            # Batches close early rather than hold most of the producer's unacknowledged
            # messages: see BatcherStage.
            hold_limit=spec.hold_limit,
        )
        inboxes = [
            Buffer[Message](spec.inbox_capacity, spec.inbox_resume_at) for _ in range(spec.inboxes)
        ]
        stages = Stages(intake=inboxes)
        for name, options in spec.batchers.items():
            self._build_batcher(rt, stages, name, options, spawn)
        for index in range(processors.concurrency):
            worker = f"{PROCESSOR_STAGE}{index}"
            inbox = inboxes[index if spec.partition_by else 0]
            stages.processors.append(
                spawn(run_processor(rt, worker, inbox, processors.max_demand), worker)
            )
        if self.circuit is not None:
            stages.timers.append(spawn(self.circuit.run(), "circuit"))
        self._runtime, self._stages = rt, stages
        return Intake(rt, inboxes, processors.concurrency, spawn)

    def _build_batcher(
        self, rt: Runtime, stages: Stages, name: str, options: Batcher, spawn: Any
    ) -> None:
        """One batcher stage and its batch processors, with a closed batch waiting for each
        (one per partition when partitioned: a partition keeps its batch processor)."""
        if options.windows is not None:
            self._build_durable_batcher(rt, stages, name, options, spawn)
            return
        capacity = self.spec.batcher_capacity(options)
        inbox = Buffer[Message](capacity, capacity // 2)
        rt.batcher_inboxes[name] = inbox
        stages.batcher_inboxes.append(inbox)
        partitioned = self.spec.partition_by is not None
        outboxes = [
            Buffer[Batch](1 if partitioned else options.concurrency)
            for _ in range(options.concurrency if partitioned else 1)
        ]
        batcher = BatcherStage(rt, name, options, inbox, outboxes)
        self.batchers[name] = batcher
        stages.batchers.append(spawn(batcher.run(), f"batcher_{name}"))
        for index in range(options.concurrency):
            worker = f"batch_processor_{name}_{index}"
            outbox = outboxes[index if partitioned else 0]
            stages.batch_processors.append(spawn(run_batch_processor(rt, worker, outbox), worker))

    def _build_durable_batcher(
        self, rt: Runtime, stages: Stages, name: str, options: Batcher, spawn: Any
    ) -> None:
        """A batcher with durable windows: its stage appends to the store (and then
        acknowledges), its `concurrency` flushers take the batch processors' place."""
        capacity = self.spec.batcher_capacity(options)
        inbox = Buffer[Message](capacity, capacity // 2)
        rt.batcher_inboxes[name] = inbox
        stages.batcher_inboxes.append(inbox)
        batcher = DurableBatcherStage(rt, name, options, inbox)
        self.batchers[name] = batcher
        stages.batchers.append(spawn(batcher.run(), f"batcher_{name}"))
        for index in range(options.concurrency):
            worker = f"batch_processor_{name}_{index}"
            flusher = Flusher(batcher, worker, keeps_view=index == 0)
            stages.batch_processors.append(spawn(flusher.run(), worker))


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a group: what the body of a generation raised (a producer
    whose `start` raised), when no task did."""
    error = group.exceptions[0]
    return _first(error) if isinstance(error, BaseExceptionGroup) else error
