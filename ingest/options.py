"""Validated option values for processors, batchers and rate limiting."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingest.message import Message
from ingest.typing import SizeStep

if TYPE_CHECKING:
    from ingest.windows import DurableWindows


def positive_int(owner: str, name: str, value: object) -> None:
    """ValueError, naming the option, unless `value` is an int >= 1 (and not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


def positive_seconds(owner: str, name: str, value: object) -> None:
    """ValueError, naming the option, unless `value` is a finite number of seconds > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{owner}: {name} must be a number of seconds > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Processors:
    """The processor group: how many workers and how many messages each takes at a time.

    A worker takes up to `max_demand` messages (a chunk, given to `prepare_messages`);
    a producer blocked on a full buffer resumes once `min_demand` places are free::

        Processors(concurrency=4, max_demand=50)
    """

    concurrency: int = 1
    max_demand: int = 10
    min_demand: int | None = None

    def __post_init__(self) -> None:
        positive_int("processors", "concurrency", self.concurrency)
        positive_int("processors", "max_demand", self.max_demand)
        if self.min_demand is not None:
            if (
                isinstance(self.min_demand, bool)
                or not isinstance(self.min_demand, int)
                or self.min_demand < 0
            ):
                raise ValueError(
                    f"processors: min_demand must be an int >= 0, got {self.min_demand!r}"
                )
            if self.min_demand >= self.max_demand:
                raise ValueError(
                    f"processors: min_demand ({self.min_demand}) must be smaller than "
                    f"max_demand ({self.max_demand}); lower min_demand or raise max_demand"
                )

    @property
    def effective_min_demand(self) -> int:
        return self.max_demand // 2 if self.min_demand is None else self.min_demand


@dataclass(frozen=True, slots=True)
class CustomBatchSize:
    """A batch size decided per message, Broadway's `{initial_acc, fun}`.

    `step(message, acc)` returns `(emit_now, acc)`; see `byte_budget` for the usual case.
    """

    initial: Any
    step: SizeStep


def byte_budget(
    max_bytes: int, measure: Callable[[Message], int] = lambda m: len(m.data)
) -> CustomBatchSize:
    """Close a batch once its messages weigh `max_bytes` or more::

    Batcher(batch_size=byte_budget(64_000))
    """
    positive_int("byte_budget", "max_bytes", max_bytes)

    def step(message: Message, acc: int) -> tuple[bool, int]:
        acc += measure(message)
        return (acc >= max_bytes, acc)

    return CustomBatchSize(0, step)


@dataclass(frozen=True, slots=True)
class Batcher:
    """One static batcher: its batches close at `batch_size`, or `batch_timeout` seconds
    after their first message, whichever comes first; `concurrency` batch processors run
    `handle_batch`::

        Batcher(batch_size=75, batch_timeout=1.0, concurrency=2)

    With `windows` (`ingest.windows.DurableWindows`) its open batches live in a store and
    each message is acknowledged once stored: the broker's prefetch no longer bounds them.
    """

    batch_size: int | CustomBatchSize = 100
    batch_timeout: float = 1.0
    concurrency: int = 1
    windows: DurableWindows | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, CustomBatchSize):
            positive_int("batcher", "batch_size", self.batch_size)
        positive_seconds("batcher", "batch_timeout", self.batch_timeout)
        positive_int("batcher", "concurrency", self.concurrency)
        if self.windows is not None:
            from ingest.windows import DurableWindows  # ingest.windows imports this module

            if not isinstance(self.windows, DurableWindows):
                raise TypeError(
                    f"batcher: windows must be an ingest.windows.DurableWindows, "
                    f"got {type(self.windows)!r}"
                )
            if not isinstance(self.batch_size, int):
                raise ValueError(
                    "batcher: a batcher with durable windows needs an int batch_size (the "
                    "store counts messages); a custom size cannot be stored"
                )

    @property
    def max_messages(self) -> int | None:
        """The most messages one batch can hold, when it is known."""
        return self.batch_size if isinstance(self.batch_size, int) else None

    @property
    def holds_deliveries(self) -> int | None:
        """The most unacknowledged deliveries one of its batches holds (None: unknown, a
        custom size); 0 with durable windows, which acknowledge once stored."""
        return 0 if self.windows is not None else self.max_messages


@dataclass(frozen=True, slots=True)
class RateLimiting:
    """At most `allowed_messages` enter the processors per `interval` seconds, pipeline-wide::

    RateLimiting(allowed_messages=1000, interval=1.0)
    """

    allowed_messages: int
    interval: float = 1.0

    def __post_init__(self) -> None:
        positive_int("rate_limiting", "allowed_messages", self.allowed_messages)
        positive_seconds("rate_limiting", "interval", self.interval)


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Stop consuming while a dependency is down, instead of failing every message::

        CircuitBreaker(failure_ratio=0.5, min_messages=20, window=10.0)

    It counts the messages settled within the last `window` seconds and those of them that
    failed because a hook raised (not those failed on purpose, `message.failed(reason)`).
    Once at least `min_messages` were settled and `failure_ratio` of them raised, it opens:
    the pipeline holds its intake (basic.cancel) and finishes what it has. After
    `open_delay` seconds (doubling at each new opening, up to `max_open_delay`) it is
    half-open: it lets in `probes` messages and holds the others back (a RabbitMQ consumer
    takes them with a prefetch of `probes`; the rest stay in the queue). The probes
    succeeding close it; one raising opens it again. Whatever raises while it is open or
    half-open goes back without counting an attempt (RabbitMQ: `release`, a copy at the
    tail of the queue, which a quorum queue's delivery limit does not count either), so an
    outage of any length uses up no message's retries; those that opened it count theirs.
    """

    failure_ratio: float = 0.5
    min_messages: int = 20
    window: float = 10.0
    open_delay: float = 5.0
    max_open_delay: float = 60.0
    probes: int = 5

    def __post_init__(self) -> None:
        ratio = self.failure_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"circuit_breaker: failure_ratio must be in (0, 1], got {ratio!r}")
        positive_int("circuit_breaker", "min_messages", self.min_messages)
        positive_int("circuit_breaker", "probes", self.probes)
        for name in ("window", "open_delay", "max_open_delay"):
            positive_seconds("circuit_breaker", name, getattr(self, name))
        if self.max_open_delay < self.open_delay:
            raise ValueError("circuit_breaker: max_open_delay must be >= open_delay")
