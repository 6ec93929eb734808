"""Instrumentation events, Broadway's telemetry: what logging and metrics subscribe to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import structlog

from ingest.batch_info import BatchInfo
from ingest.message import Message
from ingest.typing import EventHandler

logger = structlog.get_logger("ingest.events")

EventKind = Literal[
    "pipeline.start",
    "pipeline.stop",
    "pipeline.crash",
    "pipeline.pause",
    "pipeline.resume",
    "processor.start",
    "processor.stop",
    "processor.exception",
    "prepare.start",
    "prepare.stop",
    "prepare.exception",
    "message.start",
    "message.stop",
    "message.exception",
    "batch.start",
    "batch.stop",
    "batch.exception",
    "ack",
    "ack.exception",
    "handle_failed.exception",
    "window.flush",
    "window.exception",
]

# Which kind of stage emitted an event: consumers read this, never the stage's name.
StageKind = Literal["pipeline", "processor", "batcher", "batch_processor"]


@dataclass(frozen=True, slots=True)
class Event:
    """One instrumentation event.

    - `processor.*`: a chunk around `prepare_messages` + `handle_message`; on stop,
      `successful` / `failed` count the chunk's outcome and `durations` holds the seconds
      of each `handle_message` call of the chunk (metrics observe them per chunk).
    - `prepare.*`: one `prepare_messages` call, inside its chunk's `processor.*` (stop
      when it returned, exception when it raised: one or the other; a wrong return value
      is the chunk's `processor.exception`).
    - `message.*`: one `handle_message` call (`start` and `stop` only while a subscriber
      asks for them: `EventBus.per_message`).
    - `batch.*`: one `handle_batch` call, with its `batch_info`.
    - `ack`: one acknowledger call, with the counts it settled; `ack.exception` instead
      when the acknowledger raised (nothing was acknowledged; a broker redelivers).
    - `pipeline.crash`: an exception escaped a stage (a bug, not a message's failure);
      the pipeline is restarted or, past its restart limit, fails.
    - `pipeline.pause` / `pipeline.resume`: the producer stopped / started taking
      messages in; `reason` says who asked (`paused`: `Pipeline.pause()`; `circuit open`).
    - `window.flush`: a durable window's flush ended; `reason` is the outcome (`done`,
      `retry`: tried again later, `dead_letter`: its failed messages went to the dead
      letters), `batch_info` the window, `successful` / `failed` its messages' outcome.
    - `window.exception`: the window store failed (`reason`: `append`, `close`, `claim`
      or `dead_letter`); nothing was lost: what was not stored is not acknowledged.
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
    durations: Sequence[float] = ()
    reason: str | None = None


# The events emitted for every message: built only while a subscriber asks for them
# (`message.exception` only happens on a failure: it is always emitted).
PER_MESSAGE: frozenset[EventKind] = frozenset(("message.start", "message.stop"))


class EventBus:
    """Delivers events to subscribers; a subscriber that raises is detached and logged,
    as `:telemetry` does, so instrumentation can never break a pipeline.

    A subscriber may name the kinds it wants (`subscribe(handler, kinds=...)`); the
    per-message events are only built while one asks for them (`per_message`)::

        pipeline.events.subscribe(on_batch, kinds={"batch.stop"})
    """

    def __init__(self) -> None:
        self._handlers: list[tuple[EventHandler, frozenset[EventKind] | None]] = []
        self.per_message = False

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def subscribe(self, handler: EventHandler, kinds: Iterable[EventKind] | None = None) -> None:
        """Call `handler` with every event, or only with those of `kinds`."""
        wanted = None if kinds is None else frozenset(kinds)
        unknown = sorted(wanted - set(get_args(EventKind))) if wanted is not None else []
        if unknown:
            raise ValueError(f"unknown event kinds {unknown}; known: {get_args(EventKind)}")
        self._handlers.append((handler, wanted))
        self._update()

    def unsubscribe(self, handler: EventHandler) -> None:
        self._handlers = [(h, kinds) for h, kinds in self._handlers if h != handler]
        self._update()

    def _update(self) -> None:
        self.per_message = any(
            kinds is None or not kinds.isdisjoint(PER_MESSAGE) for _, kinds in self._handlers
        )

    def emit(self, event: Event) -> None:
        kind = event.kind
        for handler, kinds in tuple(self._handlers):
            if kinds is not None and kind not in kinds:
                continue
            try:
                handler(event)
            except Exception:
                logger.exception("event handler raised and was detached", handler=repr(handler))
                self.unsubscribe(handler)
