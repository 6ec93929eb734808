"""Instrumentation events, Broadway's telemetry: what logging and metrics subscribe to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from ingest.batch_info import BatchInfo
from ingest.message import Message
from ingest.typing import EventHandler

logger = structlog.get_logger("ingest.events")

EventKind = Literal[
    "pipeline.start",
    "pipeline.stop",
    "pipeline.crash",
    "processor.start",
    "processor.stop",
    "processor.exception",
    "message.start",
    "message.stop",
    "message.exception",
    "batch.start",
    "batch.stop",
    "batch.exception",
    "ack",
    "ack.exception",
    "handle_failed.exception",
]

# Which kind of stage emitted an event: consumers read this, never the stage's name.
StageKind = Literal["pipeline", "processor", "batcher", "batch_processor"]


@dataclass(frozen=True, slots=True)
class Event:
    """One instrumentation event.

    - `processor.*`: a chunk around `prepare_messages` + `handle_message`; on stop,
      `successful` / `failed` count the chunk's outcome.
    - `message.*`: one `handle_message` call (emitted only while someone subscribes).
    - `batch.*`: one `handle_batch` call, with its `batch_info`.
    - `ack`: one acknowledger call, with the counts it settled; `ack.exception` instead
      when the acknowledger raised (nothing was acknowledged; a broker redelivers).
    - `pipeline.crash`: an exception escaped a stage (a bug, not a message's failure);
      the pipeline is restarted or, past its restart limit, fails.
    - `*.exception` carry the exception; `*.stop` carry `duration` in seconds.

    `stage` names the worker (`processor_0`, `batch_processor_email_2`); `stage_kind` says
    what kind of stage it is.
    """

    kind: EventKind
    pipeline: str
    stage: str
    stage_kind: StageKind
    messages: Sequence[Message] = ()
    duration: float | None = None
    successful: int = 0
    failed: int = 0
    batch_info: BatchInfo | None = None
    exception: BaseException | None = None


class EventBus:
    """Delivers events to subscribers; a subscriber that raises is detached and logged,
    as `:telemetry` does, so instrumentation can never break a pipeline."""

    def __init__(self) -> None:
        self._handlers: list[EventHandler] = []

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def subscribe(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def unsubscribe(self, handler: EventHandler) -> None:
        if handler in self._handlers:
            self._handlers.remove(handler)

    def emit(self, event: Event) -> None:
        for handler in tuple(self._handlers):
            try:
                handler(event)
            except Exception:
                logger.exception("event handler raised and was detached", handler=repr(handler))
                self.unsubscribe(handler)
