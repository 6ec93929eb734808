"""Runtime: what every stage of a running pipeline shares, and how messages are settled."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from ingest._buffer import Buffer
from ingest._circuit import Circuit
from ingest._rate_limiter import RateLimiter
from ingest.acknowledger import group_by_acknowledger
from ingest.batch_info import BatchTrigger
from ingest.events import Event, EventBus, EventKind, StageKind
from ingest.handlers import Handlers
from ingest.message import Failed, Message
from ingest.typing import PartitionBy

logger = structlog.get_logger("ingest")


@dataclass(eq=False, slots=True)
class Batch:
    """A closed batch on its way from a batcher to a batch processor."""

    messages: list[Message]
    batcher: str
    batch_key: Any
    partition: int | None
    trigger: BatchTrigger


@dataclass(eq=False)
class Runtime:
    """The parts of a running pipeline its stages use."""

    pipeline: str
    handlers: Handlers
    context: Any
    events: EventBus
    handler_timeout: float | None
    partition_by: PartitionBy | None
    rate_limiter: RateLimiter | None
    circuit: Circuit | None = None
    batcher_inboxes: dict[str, Buffer[Message]] = field(default_factory=dict)
    received: int = 0
    settled: int = 0
    # Messages waiting in open batches, and how many may (None: no bound).
    held: int = 0
    hold_limit: int | None = None

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged."""
        return self.received - self.settled

    async def settle(
        self, stage: str, stage_kind: StageKind, successful: list[Message], failed: list[Message]
    ) -> None:
        """Run `handle_failed` on the failed messages, then acknowledge everything, one call
        per acknowledger."""
        if failed:
            await self.handle_failed(stage, stage_kind, failed)
        if self.circuit is not None:
            # Before the acks: what raised while the circuit is not closed goes back
            # without counting an attempt.
            await self.circuit.count(successful, failed)
        for acknowledger, ok, bad in group_by_acknowledger(successful, failed):
            kind: EventKind = "ack"
            error: BaseException | None = None
            try:
                await acknowledger.ack(ok, bad)
            except (Exception, asyncio.CancelledError) as exc:
                reraise_own_cancellation(exc)
                # The broker redelivers what could not be acknowledged; the stage goes on.
                logger.exception(
                    "acknowledger raised",
                    pipeline=self.pipeline,
                    stage=stage,
                    successful=len(ok),
                    failed=len(bad),
                    error=repr(exc),
                )
                kind, error = "ack.exception", exc
            if self.events:
                self.events.emit(
                    Event(
                        kind,
                        self.pipeline,
                        stage,
                        stage_kind,
                        ok + bad,
                        successful=len(ok),
                        failed=len(bad),
                        exception=error,
                    )
                )
        self.settled += len(successful) + len(failed)

    async def handle_failed(self, stage: str, stage_kind: StageKind, failed: list[Message]) -> None:
        """Let `handle_failed` see (and `configure_ack`) the failed messages. Whatever it
        returns or drops, these very messages are acknowledged as failed: the hook gets a
        copy of the list, so changing it in place cannot lose one."""
        try:
            returned = await self.handlers.handle_failed(list(failed), self.context)
            if not isinstance(returned, list) or len(returned) != len(failed):
                raise TypeError(
                    f"handle_failed must return a list of the {len(failed)} messages it got, "
                    f"returned {describe_return(returned)}"
                )
            if not all(isinstance(message, Message) for message in returned):
                raise TypeError("handle_failed must return Message objects")
        except (Exception, asyncio.CancelledError) as exc:
            reraise_own_cancellation(exc)
            logger.error(
                "handle_failed raised; acknowledging the messages as failed",
                pipeline=self.pipeline,
                stage=stage,
                messages=len(failed),
                exc_info=exc,
            )
            if self.events:
                self.events.emit(
                    Event(
                        "handle_failed.exception",
                        self.pipeline,
                        stage,
                        stage_kind,
                        failed,
                        exception=exc,
                    )
                )
        for message in failed:
            # Whatever handle_failed did, these messages are acknowledged as failed.
            if not isinstance(message.status, Failed):
                message.status = Failed("handled by handle_failed")


def reraise_own_cancellation(exc: BaseException) -> None:
    """Re-raise `exc` if it is the cancellation of the running stage itself; any other
    exception, a `CancelledError` out of user code included (a hook awaiting a task that
    someone else cancelled), is the hook's failure and the caller handles it."""
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise exc


def describe_return(value: object) -> str:
    """A short description of a wrong return value, for failure reasons."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"
