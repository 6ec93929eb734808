"""Durable windows: the contract between a batcher and a store that keeps its open batches.

A batcher given `DurableWindows` appends each message to its batch key's window in the
store and acknowledges it once stored, so the broker's prefetch no longer bounds a window:
a window is bounded by time and size only (every peer — Broadway's batchers, MassTransit,
celery-batches — holds a window's messages unacknowledged, so the prefetch caps it across
all keys). A due window is *closed* (its members fixed, an id given) and then *claimed* by
exactly one flusher, across processes, which runs `handle_batch` on it and completes it.

The life of a key's window, as the store keeps it::

    open ── size reached, or batch_timeout since its first message ──► closed (id, members)
    closed ── claimed by one flusher ──► handle_batch ──► done (deleted)
                                                     └──► retried later (attempts + 1)

Times are seconds since the epoch (`time.time()`), so that replicas agree on them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ingest.batch_info import BatchTrigger
from ingest.message import Message
from ingest.options import positive_int, positive_seconds

__all__ = [
    "Claim",
    "DeadLetterSink",
    "DurableWindows",
    "OpenWindows",
    "StoredMessage",
    "StoredWindow",
    "WindowRule",
    "WindowStore",
]


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as a store keeps it: JSON text for its data and its metadata.

    `message_id` (when the message has one) makes an append idempotent: a message whose id
    is already in one of the batcher's windows, or was in one done lately (a store says
    how long it remembers), is not added again.
    """

    batch_key: str
    data: str
    metadata: str
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class WindowRule:
    """When a key's open window is due: once it holds `size` messages, or `timeout`
    seconds after its first message (Broadway's batch_size and batch_timeout)::

        WindowRule(size=75, timeout=10.0).is_due(count=3, opened_at=t, now=t + 10)  # True
    """

    size: int
    timeout: float

    def __post_init__(self) -> None:
        positive_int("window", "size", self.size)
        positive_seconds("window", "timeout", self.timeout)

    def due_at(self, opened_at: float) -> float:
        """When a window opened at `opened_at` times out."""
        return opened_at + self.timeout

    def is_due(self, count: int, opened_at: float, now: float) -> bool:
        return count > 0 and (count >= self.size or now >= self.due_at(opened_at))

    def trigger(self, count: int) -> BatchTrigger:
        """Why a due window with `count` messages closes."""
        return "size" if count >= self.size else "timeout"


@dataclass(frozen=True, slots=True)
class StoredWindow:
    """A closed window as a claim hands it out: its id (the same on every attempt, so an
    effect derived from it — an email's Message-ID — is the same when repeated), its
    members in the order they were appended, and how many flushes of it failed before."""

    id: str
    batch_key: str
    opened_at: float
    trigger: BatchTrigger
    attempts: int
    messages: Sequence[StoredMessage]


@dataclass(frozen=True, slots=True)
class OpenWindows:
    """What a batcher's store holds now: open windows and their messages, the open time
    of the oldest, closed windows waiting for a flush, and the busiest keys."""

    windows: int = 0
    messages: int = 0
    oldest_opened_at: float | None = None
    closed: int = 0
    busiest: Sequence[tuple[str, int]] = ()


class Claim(Protocol):
    """Windows held by one flusher until the claim's context exits; no other flusher, in
    this process or another, gets them meanwhile. Outcomes are recorded with `done` and
    `retry`, and applied together when the context exits normally; a window given no
    outcome (or a context left by an exception, or a process killed) is claimable again,
    with its members and id unchanged."""

    @property
    def windows(self) -> Sequence[StoredWindow]: ...

    def done(self, window: StoredWindow, dead_lettered: Collection[str] = ()) -> None:
        """Delete the window and its messages on exit. Their ids are remembered (an
        append of one of them is skipped) but `dead_lettered`'s: a replay of those must
        join a window again."""
        ...

    def retry(self, window: StoredWindow, not_before: float, reason: str) -> None:
        """Count a failed attempt; claimable again from `not_before`."""
        ...


@runtime_checkable
class WindowStore(Protocol):
    """Where a durable batcher keeps its windows. `batcher` names the batcher, so that
    several (of several pipelines) can share one store."""

    async def append(
        self, batcher: str, messages: Sequence[StoredMessage], rule: WindowRule, now: float
    ) -> int:
        """Add each message to the open window of its key, opening one at `now` for a key
        that has none, and return once that is durable (committed). Returns how many of
        the touched windows are now due by size, so that a flusher can be woken."""
        ...

    async def close_due(self, batcher: str, rule: WindowRule, now: float, limit: int) -> int:
        """Close up to `limit` due open windows: each gets an id and, as members, the
        oldest `rule.size` messages of its key; a key's messages left over open its next
        window (opened at the first of them). Returns how many were closed."""
        ...

    def claim(self, batcher: str, now: float, limit: int) -> AbstractAsyncContextManager[Claim]:
        """Up to `limit` closed windows whose retry time has come, oldest first, held by
        this claim alone until its context exits."""
        ...

    async def open_windows(self, batcher: str, busiest: int = 5) -> OpenWindows: ...


class DeadLetterSink(Protocol):
    """Where the messages of a window that failed for good go, each with its failure
    reason (`message.failure_reason`): e.g. the queue's dead-letter queue. It raises if
    they could not be kept; the window is then retried later, nothing is lost."""

    async def dead_letter(self, messages: Sequence[Message]) -> None: ...


@dataclass(frozen=True, slots=True)
class DurableWindows:
    """Keep a batcher's open batches in `store` instead of in unacknowledged deliveries::

        Batcher(
            batch_size=75,
            batch_timeout=10.0,
            concurrency=5,  # flushers, each handling its claim's windows at once
            windows=DurableWindows(store, dead_letters),
        )

    A message is acknowledged once its window holds it durably. `handle_batch` gets a
    due window's messages back from the store (data and metadata as JSON values), with
    `BatchInfo.window` set to the window's id. If it raises (or fails a message with an
    exception), the whole window is tried again after `delays` (the last one repeating),
    up to `max_attempts` in all; then its failed messages go to `dead_letters`. Messages
    failed on purpose (`message.failed(reason)`) go there at once. Each of the batcher's
    `concurrency` flushers claims `claim_limit` windows at a time and handles them side by
    side (so up to concurrency x claim_limit `handle_batch` calls at once); other
    processes' windows are looked for every `poll_interval` seconds (a window due by size
    in this process wakes its flushers at once).
    """

    store: WindowStore
    dead_letters: DeadLetterSink
    max_attempts: int = 5
    delays: tuple[float, ...] = field(default=(2.0, 10.0, 30.0, 60.0))
    claim_limit: int = 20
    poll_interval: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.store, WindowStore):
            raise TypeError(
                "windows: store must implement ingest.windows.WindowStore "
                f"(append, close_due, claim, open_windows), got {type(self.store)!r}"
            )
        if not callable(getattr(self.dead_letters, "dead_letter", None)):
            raise TypeError("windows: dead_letters must have an async dead_letter(messages)")
        positive_int("windows", "max_attempts", self.max_attempts)
        positive_int("windows", "claim_limit", self.claim_limit)
        positive_seconds("windows", "poll_interval", self.poll_interval)
        if not self.delays:
            raise ValueError("windows: delays must name at least one delay in seconds")
        for delay in self.delays:
            positive_seconds("windows", "delays", delay)

    def delay(self, attempts: int) -> float:
        """How long to wait after the `attempts`-th failed attempt (1 for the first)."""
        return self.delays[min(attempts, len(self.delays)) - 1]
