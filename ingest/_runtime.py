"""Runtime: what every stage of a running pipeline shares, and how messages are settled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from ingest._buffer import Buffer
from ingest._rate_limiter import RateLimiter
from ingest.acknowledger import group_by_acknowledger
from ingest.batch_info import BatchTrigger
from ingest.events import Event, EventBus, EventKind
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

    async def settle(self, stage: str, successful: list[Message], failed: list[Message]) -> None:
        """Run `handle_failed` on the failed messages, then acknowledge everything, one call
        per acknowledger."""
        if failed:
            failed = await self._handle_failed(stage, failed)
        for acknowledger, (ok, bad) in group_by_acknowledger(successful, failed).items():
            kind: EventKind = "ack"
            error: Exception | None = None
            try:
                await acknowledger.ack(ok, bad)
            except Exception as exc:
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
                        ok + bad,
                        successful=len(ok),
                        failed=len(bad),
                        exception=error,
                    )
                )
        self.settled += len(successful) + len(failed)

    async def _handle_failed(self, stage: str, failed: list[Message]) -> list[Message]:
        try:
            returned = await self.handlers.handle_failed(failed, self.context)
            if not isinstance(returned, list) or len(returned) != len(failed):
                raise TypeError(
                    f"handle_failed must return a list of the {len(failed)} messages it got, "
                    f"returned {describe_return(returned)}"
                )
            if not all(isinstance(message, Message) for message in returned):
                raise TypeError("handle_failed must return Message objects")
        except Exception as exc:
            logger.exception(
                "handle_failed raised; acknowledging the messages as failed",
                pipeline=self.pipeline,
                stage=stage,
                messages=len(failed),
            )
            if self.events:
                self.events.emit(
                    Event("handle_failed.exception", self.pipeline, stage, failed, exception=exc)
                )
            return failed
        for message in returned:
            # Whatever handle_failed did, these messages are acknowledged as failed.
            if not isinstance(message.status, Failed):
                message.status = Failed("handled by handle_failed")
        return returned


def describe_return(value: object) -> str:
    """A short description of a wrong return value, for failure reasons."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"
