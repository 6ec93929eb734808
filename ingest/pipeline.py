"""Pipeline: the declaration of a pipeline, validated once, and its life cycle."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import structlog

from ingest._circuit import CIRCUIT_OPEN, Circuit, CircuitState
from ingest._processor import PROCESSOR_KEY, PROCESSOR_STAGE
from ingest._rate_limiter import RateLimiter
from ingest._spec import pipeline_spec
from ingest._supervisor import State, Supervisor
from ingest.events import Event, EventBus, EventKind
from ingest.exceptions import ConfigurationError
from ingest.handlers import Handlers
from ingest.options import Batcher, CircuitBreaker, Processors, RateLimiting
from ingest.producer import LimitingProducer, PausableProducer, Producer
from ingest.topology import StageGroup, Topology
from ingest.typing import PartitionBy

__all__ = ["CIRCUIT_OPEN", "PAUSED", "CircuitState", "Pipeline", "State"]

logger = structlog.get_logger("ingest.pipeline")

PAUSED = "paused"  # the hold of pause() / resume()


class Pipeline:
    """A producer, a processor group and optional batchers, run with Broadway's semantics::

        pipeline = Pipeline(
            "orders",
            OrderHandlers(),
            producer,
            processors=Processors(concurrency=4),
            batchers={"express": Batcher(batch_size=75)},
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
        circuit_breaker: CircuitBreaker | None = None,
        shutdown_timeout: float = 30.0,
        handler_timeout: float | None = None,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
    ) -> None:
        self._spec = spec = pipeline_spec(
            name,
            handlers,
            producer,
            processors=processors,
            batchers=batchers,
            context=context,
            partition_by=partition_by,
            rate_limiting=rate_limiting,
            circuit_breaker=circuit_breaker,
            shutdown_timeout=shutdown_timeout,
            handler_timeout=handler_timeout,
            max_restarts=max_restarts,
            max_seconds=max_seconds,
        )
        self.events = EventBus()
        self._rate_limiter = RateLimiter(rate_limiting) if rate_limiting else None
        self._stop_called = False
        self._stopped = asyncio.Event()
        self._holds: set[str] = set()
        self._holding = asyncio.Lock()
        self._circuit = (
            Circuit(
                name,
                circuit_breaker,
                lambda: self.hold(CIRCUIT_OPEN),
                lambda: self.release(CIRCUIT_OPEN),
                self._limit_intake,
            )
            if circuit_breaker is not None
            else None
        )
        self._supervisor = Supervisor(spec, self.events, self._rate_limiter, self._circuit)

    # -- the declaration (read-only: the stages are built from it) -----------------------

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def handlers(self) -> Handlers:
        return self._spec.handlers

    @property
    def producer(self) -> Producer:
        return self._spec.producer

    @property
    def processors(self) -> Processors:
        return self._spec.processors

    @property
    def batchers(self) -> Mapping[str, Batcher]:
        return self._spec.batchers

    @property
    def context(self) -> Any:
        """What every hook gets as `context` (a database, a publisher...)."""
        return self._spec.context

    @property
    def partition_by(self) -> PartitionBy | None:
        return self._spec.partition_by

    @property
    def shutdown_timeout(self) -> float:
        return self._spec.shutdown_timeout

    @property
    def handler_timeout(self) -> float | None:
        return self._spec.handler_timeout

    @property
    def max_restarts(self) -> int:
        return self._spec.max_restarts

    @property
    def max_seconds(self) -> float:
        return self._spec.max_seconds

    @property
    def state(self) -> State:
        """`new`, `running`, `restarting` (after a crash), `failed` (past the restart
        limit, or the start raised), `stopping` or `stopped`."""
        return self._supervisor.state

    @property
    def crashes(self) -> int:
        """How many times a stage crashed (each followed by a restart, but the last when
        the pipeline failed)."""
        return self._supervisor.crashes

    @property
    def failure(self) -> BaseException | None:
        """The last crash (while `restarting`), or why the pipeline `failed`."""
        return self._supervisor.failure

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged (by the live generation)."""
        runtime = self._supervisor.runtime
        return runtime.in_flight if runtime else 0

    def open_batches(self) -> dict[str, dict[str, Any]]:
        """Per batcher, its open batches now: `batches`, `messages`, `oldest_s` (the age
        of the oldest) and the `busiest` batch keys with their sizes."""
        return {name: stage.summary() for name, stage in self._supervisor.batchers.items()}

    @property
    def close_early_at(self) -> int | None:
        """How many messages open batches may hold before the oldest closes early (3/4 of
        what the producer may leave unacknowledged), or None when nothing bounds it."""
        return self._spec.hold_limit if self.batchers else None

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

    # -- pause and resume ----------------------------------------------------------------

    @property
    def holds(self) -> frozenset[str]:
        """Why the producer takes no messages in: `paused` (pause()), `circuit open`, ...;
        empty while it takes them."""
        return frozenset(self._holds)

    @property
    def circuit_state(self) -> CircuitState | None:
        """`closed`, `half-open` or `open`; None without a circuit breaker."""
        return self._circuit.state if self._circuit is not None else None

    @property
    def paused(self) -> bool:
        return PAUSED in self._holds

    async def pause(self) -> None:
        """Stop taking messages in (a RabbitMQ consumer cancels with basic.cancel); what
        the pipeline holds goes on and is acknowledged. It stays paused across restarts,
        until resume(). ConfigurationError if the producer cannot pause."""
        await self.hold(PAUSED)

    async def resume(self) -> None:
        await self.release(PAUSED)

    async def hold(self, reason: str) -> None:
        """Stop taking messages in for `reason`. Several reasons may hold at once (an
        operator's pause, an open circuit): messages come in again once none does."""
        producer = self._pausable()
        async with self._holding:
            if reason in self._holds:
                return
            self._holds.add(reason)
            if len(self._holds) == 1:
                await producer.pause()
        logger.info("pipeline holds its intake", pipeline=self.name, reason=reason)
        self._emit_hold("pipeline.pause", reason)

    async def release(self, reason: str) -> None:
        """Drop the hold `reason`; messages come in again once no other holds."""
        producer = self._pausable()
        async with self._holding:
            if reason not in self._holds:
                return
            self._holds.discard(reason)
            if not self._holds:
                await producer.resume()
        logger.info(
            "pipeline releases its intake", pipeline=self.name, reason=reason, still=self.holds
        )
        self._emit_hold("pipeline.resume", reason)

    async def _limit_intake(self, messages: int | None) -> None:
        """Bound how many unsettled messages the producer takes in at once (the circuit
        breaker's probes; None: its own bound), when it can (`LimitingProducer`). The
        intake admits no more than the breaker lets in anyway: this leaves the others in
        the broker's queue rather than delivered and held back."""
        producer = self.producer
        if isinstance(producer, LimitingProducer):
            async with self._holding:
                await producer.limit(messages)

    def _pausable(self) -> PausableProducer:
        if not isinstance(self.producer, PausableProducer):
            raise ConfigurationError(
                f"pipeline {self.name!r}: {type(self.producer).__name__} cannot pause"
            )
        return self.producer

    def _emit_hold(self, kind: EventKind, reason: str) -> None:
        if self.events:
            self.events.emit(Event(kind, self.name, "pipeline", "pipeline", reason=reason))

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
                        # Durable: its batch processors are flushers, each claiming this many.
                        **(
                            {"windows": "stored", "claim_limit": options.windows.claim_limit}
                            if options.windows is not None
                            else {}
                        ),
                    },
                )
                for name, options in self.batchers.items()
            ),
        )

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every stage, then the producer, under the pipeline's supervisor; raise
        what prevented the start (the pipeline is then failed)."""
        if self.state != "new":
            raise RuntimeError(f"pipeline {self.name!r} is {self.state}; a pipeline starts once")
        await self._supervisor.start()

    async def stop(self) -> None:
        """Drain and stop: see `ingest._terminator.shut_down`. Safe to call more than once
        (later calls wait for the first); a pipeline that failed stays `failed`."""
        if self._stop_called:
            await self._stopped.wait()
            return
        self._stop_called = True
        try:
            await self._supervisor.stop()
        finally:
            self._stopped.set()
            if self.events:
                self.events.emit(Event("pipeline.stop", self.name, "pipeline", "pipeline"))

    async def wait(self) -> None:
        """Return once the pipeline stopped, or failed past its restart limit (then
        `state == "failed"` and `failure` says why)."""
        await self._supervisor.wait()

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
