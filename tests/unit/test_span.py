"""Span: the start, stop and exception events around one unit of a stage's work."""

from __future__ import annotations

import time

from ingest import BatchInfo, Event, EventBus, Message, NoopAcknowledger
from ingest._span import Span


def batch() -> tuple[list[Message], BatchInfo]:
    messages = [Message("a", NoopAcknowledger())]
    return messages, BatchInfo("email", "ann@example.com", None, 1, "timeout")


def test_a_span_emits_start_then_stop_with_the_seconds_since_the_start() -> None:
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    messages, info = batch()
    span = Span(
        events,
        "batch",
        "notifications",
        "batch_processor_email_0",
        "batch_processor",
        messages,
        info,
    )
    span.start()
    time.sleep(0.01)
    span.stop(successful=1)
    start, stop = seen
    assert start == Event(
        "batch.start",
        "notifications",
        "batch_processor_email_0",
        "batch_processor",
        messages,
        batch_info=info,
    )
    assert (stop.kind, stop.successful, stop.failed, stop.batch_info) == ("batch.stop", 1, 0, info)
    assert stop.duration is not None
    assert 0.01 <= stop.duration < 1


def test_a_stage_that_goes_on_after_its_hook_raised_reports_both() -> None:
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    messages = [Message("a", NoopAcknowledger())]
    span = Span(events, "processor", "bookings", "processor_0", "processor", messages).start()
    error = ConnectionError("database down")
    span.exception(error)
    span.stop(failed=1, durations=(0.5,))
    assert [(e.kind, e.exception, e.failed, e.durations) for e in seen] == [
        ("processor.start", None, 0, ()),
        ("processor.exception", error, 0, ()),
        ("processor.stop", None, 1, (0.5,)),
    ]


def test_a_duration_measured_by_the_caller_is_the_one_reported() -> None:
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append, kinds={"message.stop"})
    span = Span(events, "message", "bookings", "default", "processor", ()).start()
    span.stop(duration=0.25)
    assert [(e.kind, e.duration) for e in seen] == [("message.stop", 0.25)]


def test_each_event_goes_to_whoever_listens_when_it_is_emitted() -> None:
    events = EventBus()
    span = Span(events, "processor", "bookings", "processor_0", "processor", ()).start()
    seen: list[Event] = []
    events.subscribe(seen.append)  # mid-span, as a dashboard would
    span.stop()
    assert [event.kind for event in seen] == ["processor.stop"]
