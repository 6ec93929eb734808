"""The producer interface: what feeds messages into a pipeline."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Producer(Protocol):
    """Feeds a pipeline. The pipeline calls, in this order:

    - `start(sink)` once, when it starts: begin delivering into `sink`;
    - `drain()` at shutdown: stop receiving (e.g. basic.cancel); messages already pushed
      are still processed and acknowledged;
    - `close()` last, when every message that could be settled was: release resources
      (e.g. close the channel, so the broker redelivers what is left unacknowledged).
    """

    async def start(self, sink: Sink) -> None: ...

    async def drain(self) -> None: ...

    async def close(self) -> None: ...


# When a producer bounds what it leaves unacknowledged (a broker's prefetch), the oldest
# open batch closes early once open batches hold this share of the bound (BatcherStage),
# so that many dynamic batch keys cannot take it all and stall the pipeline.
HOLD_SHARE = Fraction(3, 4)


@dataclass(frozen=True, slots=True)
class PipelineShape:
    """What a producer may need to know of the pipeline it feeds."""

    name: str
    processors: Processors
    batchers: Mapping[str, Batcher]
    partitioned: bool

    def batch_sizes(self) -> int:
        """The messages one full batch of every batcher holds (custom sizes: their cap)."""
        return sum(batcher.max_messages or 0 for batcher in self.batchers.values())

    def bound_for_full_batches(self) -> int:
        """The smallest bound on unacknowledged messages with which one batch of every
        batcher can fill (by size) before the open batches reach HOLD_SHARE of it."""
        return math.ceil(self.batch_sizes() / HOLD_SHARE)


@runtime_checkable
class BoundProducer(Protocol):
    """A producer that checks the pipeline it is given (e.g. RabbitMQ's prefetch against
    the batch sizes) when the pipeline is built."""

    def bind(self, shape: PipelineShape) -> int | None:
        """Raise ValueError on a pipeline this producer cannot feed well; return how many
        unacknowledged messages it may hold at once, if bounded, so that the pipeline's
        intake can hold them all."""
        ...
