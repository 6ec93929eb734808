"""The producer interface: what feeds messages into a pipeline."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

from ingest.message import Message
from ingest.options import Batcher, Processors


class Sink(Protocol):
    """Where a producer puts messages: the pipeline's bounded intake."""

    async def push(self, messages: Sequence[Message]) -> None:
        """Hand messages to the processors; waits while their buffers are full."""
        ...

    def push_nowait(self, messages: Sequence[Message]) -> bool:
        """Hand messages over if they all fit now (they always do for a producer whose
        `bind` declared how many it holds); False, and nothing taken, if not."""
        ...

    def spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run one of the producer's tasks under the pipeline's supervisor: an exception
        escaping it crashes the pipeline (which is then restarted), never silently. The
        producer's `close()` cancels its tasks; the supervisor awaits them."""
        ...


@runtime_checkable
class Producer(Protocol):
    """Feeds a pipeline. The pipeline calls, in this order:

    - `start(sink)` once, when it starts: begin delivering into `sink`;
    - `drain()` at shutdown: stop receiving (e.g. basic.cancel); messages already pushed
      are still processed and acknowledged;
    - `close()` last, when every message that could be settled was: release resources
      (e.g. close the channel, so the broker redelivers what is left unacknowledged) and
      cancel the tasks it spawned.

    After a crash the pipeline calls `close()`, then `start(sink)` again with a new sink:
    a producer must be able to start again after it was closed.
    """

    async def start(self, sink: Sink) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class PausableProducer(Protocol):
    """A producer that can stop taking messages in and take them again without stopping
    (RabbitMQ: basic.cancel, then basic.consume); what it delivered before goes on through
    the pipeline. Paused, it stays paused across a restart (close, start) until resumed."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


@runtime_checkable
class LimitingProducer(Protocol):
    """A pausable producer that can also take in fewer unsettled messages at once than its
    own bound (RabbitMQ: a smaller prefetch). The circuit breaker probes a dependency with
    a few messages while half-open; with this the others wait where they were (in the
    queue) instead of being delivered and held back by the pipeline's intake."""

    async def limit(self, messages: int | None) -> None:
        """Hold at most `messages` unsettled messages at once from now on (None: as many
        as the producer's own bound again), across pauses and restarts."""
        ...


# When a producer bounds what it leaves unacknowledged (a broker's prefetch), the oldest
# open batch closes early once open batches hold this share of the bound (the batcher
# stage), so that many dynamic batch keys cannot take it all and stall the pipeline. This
# object is the one place that arithmetic lives.
HOLD_SHARE = Fraction(3, 4)


@dataclass(frozen=True, slots=True)
class PipelineShape:
    """What a producer may need to know of the pipeline it feeds, and the arithmetic of a
    bound on unacknowledged messages (a prefetch) against the batch sizes::

        shape.check_bound(500, "prefetch_count")  # ValueError saying what to raise
        shape.hold_limit(500)                     # 375: open batches close early there
    """

    name: str
    processors: Processors
    batchers: Mapping[str, Batcher]
    partitioned: bool

    def batch_sizes(self) -> int:
        """The unacknowledged messages one full batch of every batcher holds (custom
        sizes: their cap; durable windows: none, they are acknowledged once stored)."""
        return sum(batcher.holds_deliveries or 0 for batcher in self.batchers.values())

    def bound_for_full_batches(self) -> int:
        """The smallest bound on unacknowledged messages with which one batch of every
        batcher can fill (by size) before the open batches reach HOLD_SHARE of it."""
        return math.ceil(self.batch_sizes() / HOLD_SHARE)

    def default_bound(self) -> int:
        """A bound to pick when none is given: room for a batch in every batch processor
        and one more filling in every batcher, and for every processor's demand, and
        twice as much again for messages done but not yet acknowledged: a connector may
        hold their acks a moment so that one frame settles many (RabbitMQ's, until the
        messages of older batches are done too), and they count against the bound
        meanwhile. Measured with three batchers of 50-100 (bench/service.py,
        docs/PERFORMANCE.md, issue 23): with as much again, half of it was often pending
        and 7-15 % of the acks went one frame each; with twice as much, under 3 %."""
        processors = self.processors
        in_flight = sum(
            (batcher.concurrency + 1) * (batcher.holds_deliveries or 0)
            for batcher in self.batchers.values()
        )
        return min(65535, max(50, 3 * (in_flight + processors.concurrency * processors.max_demand)))

    def check_bound(self, bound: int, option: str) -> None:
        """ValueError, naming `option` and the number to raise it to, when one batch of
        every batcher cannot fill (by size) within `bound` unacknowledged messages."""
        needed = self.bound_for_full_batches()
        if bound >= needed:
            return
        sizes = ", ".join(
            f"{name} ({options.holds_deliveries})"
            for name, options in self.batchers.items()
            if options.holds_deliveries
        )
        raise ValueError(
            f"pipeline {self.name!r}: {option} {bound} is too small for the batchers {sizes} "
            f"to fill one batch each (open batches close early once they hold {HOLD_SHARE} "
            f"of it); raise {option} to at least {needed} (more for throughput) or lower the "
            f"batch sizes"
        )

    def hold_limit(self, bound: int) -> int:
        """How many messages open batches may hold, under a bound of `bound`
        unacknowledged messages, before the oldest closes early."""
        return max(1, math.floor(bound * HOLD_SHARE))


@runtime_checkable
class BoundProducer(Protocol):
    """A producer that checks the pipeline it is given (e.g. RabbitMQ's prefetch against
    the batch sizes) when the pipeline is built."""

    def bind(self, shape: PipelineShape) -> int | None:
        """Raise ValueError on a pipeline this producer cannot feed well; return how many
        unacknowledged messages it may hold at once, if bounded, so that the pipeline's
        intake can hold them all."""
        ...


# -- what a host may ask of a producer ---------------------------------------------------
# Optional capabilities, each a small protocol: a host (the service's page, metrics,
# readiness, dead-letter commands) checks them once, when it takes a pipeline in, and
# never asks which class a producer is.


@runtime_checkable
class ConsumingProducer(Protocol):
    """A producer fed by connections that can be down (a broker's consumers): `ready`
    while every one consumes, and each one's state."""

    @property
    def ready(self) -> bool: ...

    @property
    def consumers_ready(self) -> list[bool]: ...


class Counters(Protocol):
    """What a producer counted: its acknowledgement actions (`ack`, `reject`, ...) and
    its other events (reconnects, ...), by name."""

    def acknowledgements(self) -> dict[str, int]: ...

    def events(self) -> dict[str, int]: ...


@runtime_checkable
class CountingProducer(Protocol):
    """A producer that counts what it did (the service shows the counters as metrics)."""

    @property
    def stats(self) -> Counters: ...


@runtime_checkable
class QueueProducer(Protocol):
    """A producer consuming named queues: `work_queues()` those it consumes (where a
    dead letter is replayed to, where `ingest publish` sends), `queues()` those and the
    ones beside them that hold its messages for a while (retries, dead letters)."""

    def work_queues(self) -> list[str]: ...

    def queues(self) -> list[str]: ...


@runtime_checkable
class PrefetchingProducer(Protocol):
    """A producer that holds at most `prefetch` unacknowledged messages at once, known
    once the pipeline is built (see `BoundProducer`)."""

    @property
    def prefetch(self) -> int: ...


@runtime_checkable
class FiniteProducer(Protocol):
    """A producer whose input ends (a file): `finished` is set once every message it
    made was settled."""

    @property
    def finished(self) -> asyncio.Event: ...
