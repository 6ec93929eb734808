"""Topology description and instrumentation events."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ingest import Batcher, Event, Handlers, InMemoryProducer, Message, Pipeline, Processors
from ingest.events import EventKind
from ingest.rabbitmq import RabbitMQOptions, RabbitMQProducer
from ingest.testing import send_batch

from .conftest import MakePipeline


class Split(Handlers):
    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        if message.data == "bad":
            raise ValueError("bad data")
        return message.put_batcher("b")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        return messages


def test_topology_names_every_stage_and_its_concurrency() -> None:
    pipeline = Pipeline(
        "bookings",
        Split(),
        InMemoryProducer(),
        processors=Processors(concurrency=3),
        batchers={"b": Batcher(batch_size=5, concurrency=2)},
    )
    topology = pipeline.topology()
    assert topology.producer.name == "InMemoryProducer"
    assert topology.processors.workers == (
        "bookings.processor_0",
        "bookings.processor_1",
        "bookings.processor_2",
    )
    assert [(b.name, b.concurrency, b.workers) for b in topology.batchers] == [
        ("b", 2, ("bookings.batch_processor_b_0", "bookings.batch_processor_b_1"))
    ]
    assert topology.render().splitlines() == [
        "bookings",
        "├─ producer InMemoryProducer (concurrency=1)",
        "├─ processors (concurrency=3, max_demand=10)",
        "└─ batcher 'b' (concurrency=2, batch_size=5, batch_timeout=1.0)",
    ]


def test_topology_shows_the_rabbitmq_producers_concurrency() -> None:
    producer = RabbitMQProducer(RabbitMQOptions(queue="q", prefetch_count=100, concurrency=2))
    pipeline = Pipeline("bookings", Split(), producer, batchers={"b": Batcher(batch_size=5)})
    assert pipeline.topology().producer.workers == ("bookings.producer_0", "bookings.producer_1")
    assert "├─ producer RabbitMQProducer (concurrency=2)" in pipeline.topology().render()


async def test_events_cover_chunks_messages_batches_and_acks(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Split(), batchers={"b": Batcher(batch_size=2)})
    events: list[Event] = []
    pipeline.events.subscribe(events.append)
    await send_batch(pipeline, ["ok", "bad", "ok"])
    kinds = [event.kind for event in events]
    assert kinds.count("message.start") == 3
    assert kinds.count("message.stop") == 2
    assert kinds.count("message.exception") == 1
    stop = next(e for e in events if e.kind == "processor.stop")
    assert (stop.successful, stop.failed) == (2, 1)
    assert stop.duration is not None
    assert stop.duration >= 0
    batch = next(e for e in events if e.kind == "batch.stop")
    assert batch.batch_info is not None
    assert batch.batch_info.size == 2
    acks = [e for e in events if e.kind == "ack"]
    assert sum(e.successful for e in acks) == 2
    assert sum(e.failed for e in acks) == 1


async def test_a_raising_event_handler_is_detached_and_the_pipeline_goes_on(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(Split(), batchers={"b": Batcher(batch_size=1)})
    calls: list[str] = []

    def broken(event: Event) -> None:
        calls.append(event.kind)
        raise RuntimeError("metrics broke")

    pipeline.events.subscribe(broken)
    result = await send_batch(pipeline, ["ok", "ok"])
    assert len(result.successful) == 2
    assert len(calls) == 1


async def test_a_subscriber_gets_only_the_kinds_it_asked_for(make_pipeline: MakePipeline) -> None:
    pipeline = await make_pipeline(Split(), batchers={"b": Batcher(batch_size=2)})
    acks: list[Event] = []
    pipeline.events.subscribe(acks.append, kinds={"ack"})
    assert not pipeline.events.per_message
    await send_batch(pipeline, ["ok", "bad", "ok"])
    assert {event.kind for event in acks} == {"ack"}
    everything: list[Event] = []
    pipeline.events.subscribe(everything.append)
    assert pipeline.events.per_message
    await send_batch(pipeline, ["ok"])
    assert "message.start" in {event.kind for event in everything}


def test_subscribing_to_an_unknown_kind_is_refused() -> None:
    pipeline = Pipeline("p", Split(), InMemoryProducer())
    with pytest.raises(ValueError, match=r"unknown event kinds \['message\.begin'\]"):
        pipeline.events.subscribe(print, kinds={"message.begin"})  # type: ignore[arg-type]


class RaisingHooks(Handlers):
    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        if any(message.data == "database down" for message in messages):
            raise ConnectionError("database down")
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.put_batcher("b")

    async def handle_batch(self, batcher, messages, batch_info, context):  # type: ignore[no-untyped-def]
        if any(message.data == "mail server down" for message in messages):
            raise ConnectionError("mail server down")
        return messages


async def span_around(
    make_pipeline: MakePipeline, data: str, span: str, every_kind: bool
) -> tuple[Event, Event, Event]:
    """One message sent through RaisingHooks: its span's events must be start, exception,
    the ack, then stop (and nothing else, with `every_kind`), the exception the hook's."""
    pipeline = await make_pipeline(RaisingHooks(), batchers={"b": Batcher(batch_size=1)})
    order = [f"{span}.start", f"{span}.exception", "ack", f"{span}.stop"]
    events: list[Event] = []
    kinds = None if every_kind else cast(set[EventKind], set(order))
    pipeline.events.subscribe(events.append, kinds=kinds)
    await send_batch(pipeline, [data])
    assert [event.kind for event in events] == order
    start, exception, _, stop = events
    assert isinstance(exception.exception, ConnectionError)
    return start, exception, stop


async def test_a_chunk_whose_prepare_messages_raised_reports_the_exception_then_stops(
    make_pipeline: MakePipeline,
) -> None:
    start, exception, stop = await span_around(
        make_pipeline, "database down", "processor", every_kind=False
    )
    assert {event.stage for event in (start, exception, stop)} == {"processor_0"}
    assert (stop.successful, stop.failed, stop.durations) == (0, 1, ())
    assert stop.duration is not None
    assert stop.duration >= 0


async def test_prepare_messages_has_its_own_span_inside_the_chunks(
    make_pipeline: MakePipeline,
) -> None:
    pipeline = await make_pipeline(RaisingHooks(), batchers={"b": Batcher(batch_size=1)})
    events: list[Event] = []
    pipeline.events.subscribe(events.append)
    await send_batch(pipeline, ["database down"])
    await send_batch(pipeline, ["fine"])
    kinds = [event.kind for event in events if event.stage_kind == "processor"]
    assert kinds == [
        # the hook raised: its span ends with the exception, then the chunk's
        "processor.start",
        "prepare.start",
        "prepare.exception",
        "processor.exception",
        "ack",
        "processor.stop",
        # it returned: its span stops before the chunk's messages are handled
        "processor.start",
        "prepare.start",
        "prepare.stop",
        "message.start",
        "message.stop",
        "processor.stop",
    ]
    prepare_stop = next(event for event in events if event.kind == "prepare.stop")
    assert [message.data for message in prepare_stop.messages] == ["fine"]
    assert prepare_stop.stage == "processor_0"
    assert prepare_stop.duration is not None


async def test_a_batch_whose_handle_batch_raised_reports_the_exception_then_stops(
    make_pipeline: MakePipeline,
) -> None:
    start, exception, stop = await span_around(
        make_pipeline, "mail server down", "batch", every_kind=False
    )
    assert start.batch_info == exception.batch_info == stop.batch_info
    assert stop.batch_info is not None
    assert stop.batch_info.size == 1
    assert (stop.stage, stop.stage_kind, stop.successful, stop.failed) == (
        "batch_processor_b_0",
        "batch_processor",
        0,
        1,
    )
