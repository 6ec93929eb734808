"""Spans: the start, stop and exception events around one unit of a stage's work (a chunk,
a message, a batch), as Broadway's `:telemetry.span` emits them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, Literal

from ingest.batch_info import BatchInfo
from ingest.events import Event, EventBus, EventKind, StageKind
from ingest.message import Message

SpanName = Literal["processor", "prepare", "message", "batch"]

_KINDS: Final[dict[SpanName, tuple[EventKind, EventKind, EventKind]]] = {
    "processor": ("processor.start", "processor.stop", "processor.exception"),
    "prepare": ("prepare.start", "prepare.stop", "prepare.exception"),
    "message": ("message.start", "message.stop", "message.exception"),
    "batch": ("batch.start", "batch.stop", "batch.exception"),
}


class Span:
    """One unit of work of a stage and its events: `start()` emits `<name>.start` and
    starts the clock; `exception(error)` emits `<name>.exception` with what the hook
    raised; `stop(...)` emits `<name>.stop` with the seconds since the start and the
    outcome::

        span = Span(rt.events, "batch", rt.pipeline, worker, "batch_processor", messages, info)
        span.start()
        try:
            returned = await handlers.handle_batch(...)
        except Exception as exc:
            span.exception(exc)  # the batch fails; the stage goes on
        ...
        span.stop(successful=len(successful), failed=len(failed))

    Unlike `:telemetry.span`, a stage that goes on after the hook raised (a chunk whose
    `prepare_messages` raised, a batch whose `handle_batch` did: their messages fail and
    are settled) emits its exception and then its stop; a message's span ends with one
    or the other, as does a chunk's `prepare_messages` (its `prepare` span, inside the
    chunk's `processor` span). Not a context manager, because an exception escaping a stage is not
    the hook's (its own cancellation, a crash) and emits nothing, as ever.

    Each event is emitted only while the bus has subscribers, decided when it is emitted
    (a subscriber may arrive in the middle of a span): with none, a span costs one object
    and the clock, per chunk or batch; a message gets one only while a subscriber wants
    per-message events (`EventBus.per_message`).
    """

    __slots__ = (
        "_kinds",
        "batch_info",
        "events",
        "messages",
        "pipeline",
        "stage",
        "stage_kind",
        "started",
    )

    def __init__(
        self,
        events: EventBus,
        name: SpanName,
        pipeline: str,
        stage: str,
        stage_kind: StageKind,
        messages: Sequence[Message],
        batch_info: BatchInfo | None = None,
    ) -> None:
        self.events = events
        self._kinds = _KINDS[name]
        self.pipeline = pipeline
        self.stage = stage
        self.stage_kind = stage_kind
        self.messages = messages
        self.batch_info = batch_info
        self.started = 0.0

    def start(self) -> Span:
        """Start the clock, then emit `<name>.start`."""
        self.started = time.perf_counter()
        if self.events:
            self.events.emit(
                Event(
                    self._kinds[0],
                    self.pipeline,
                    self.stage,
                    self.stage_kind,
                    self.messages,
                    batch_info=self.batch_info,
                )
            )
        return self

    def exception(self, error: BaseException) -> None:
        """Emit `<name>.exception`: the hook raised `error` (its type says what kind of
        failure, its text why)."""
        if self.events:
            self.events.emit(
                Event(
                    self._kinds[2],
                    self.pipeline,
                    self.stage,
                    self.stage_kind,
                    self.messages,
                    batch_info=self.batch_info,
                    exception=error,
                )
            )

    def stop(
        self,
        *,
        successful: int = 0,
        failed: int = 0,
        durations: Sequence[float] = (),
        duration: float | None = None,
    ) -> None:
        """Emit `<name>.stop` with the outcome and the seconds since `start()`, or
        `duration` when the caller timed the work itself (a message's handler, whose
        seconds also go to its chunk's `durations`)."""
        if self.events:
            self.events.emit(
                Event(
                    self._kinds[1],
                    self.pipeline,
                    self.stage,
                    self.stage_kind,
                    self.messages,
                    duration=time.perf_counter() - self.started if duration is None else duration,
                    successful=successful,
                    failed=failed,
                    batch_info=self.batch_info,
                    durations=durations,
                )
            )
