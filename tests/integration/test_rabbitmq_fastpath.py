"""The aiormq fast path on the real broker: ingest's connections only, and a refused fast
path leaves a connector that consumes as plain aiormq does."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from aiormq.connection import FrameReceiver
from structlog.testing import capture_logs

from ingest import Handlers, Message, Pipeline
from ingest.rabbitmq import REASON_HEADER, Binding, QueueDeclare, RabbitMQProducer
from ingest.rabbitmq._aiormq import events, gate, reader
from ingest.rabbitmq.connection import open_connection

from .conftest import (
    Broker,
    MakeRabbitPipeline,
    drain_queue,
    eventually,
    publish,
    queue_depth,
)

AIORMQ_GET_FRAME = FrameReceiver.get_frame


@pytest.fixture
def fast_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The receiver of every frame read by the fast path's reader from now on."""
    receivers: list[Any] = []
    read = reader.get_frame

    async def get_frame(receiver: Any) -> tuple[int, int, Any]:
        receivers.append(receiver)
        return await read(receiver)

    monkeypatch.setattr(reader, "get_frame", get_frame)
    return receivers


async def test_a_plain_aiormq_connection_opened_after_ingests_keeps_aiormqs_reader(
    broker: Broker, queue_name: str, fast_reads: list[Any]
) -> None:
    ours = await open_connection(broker.amqp_url)
    try:
        await (await ours.channel()).queue_declare(queue_name, auto_delete=True)
        assert fast_reads  # ingest's connection reads with the fast path
        ours_receivers = set(map(id, fast_reads))
        plain = await aiormq.connect(broker.amqp_url)
        try:
            channel = await plain.channel()
            await channel.basic_publish(b"plain", routing_key=queue_name)
            got = await channel.basic_get(queue_name, no_ack=True)
        finally:
            await plain.close()
    finally:
        await ours.close()
    assert got.body == b"plain"
    assert set(map(id, fast_reads)) == ours_receivers  # no frame of the plain one
    assert FrameReceiver.get_frame is AIORMQ_GET_FRAME


class Collect(Handlers):
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.messages.append(message)
        return message


async def test_with_the_fast_path_refused_a_pipeline_consumes_and_acks_as_plain_aiormq(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    fast_reads: list[Any],
) -> None:
    monkeypatch.setattr(gate, "_version", lambda distribution: "99.0.0")
    monkeypatch.setattr(gate, "_reported", set())
    handlers = Collect()
    with capture_logs() as logs:
        pipeline, _producer = await make_rabbit_pipeline(
            handlers, concurrency=2, metadata=("routing_key", "headers")
        )
    bodies = {b"m%d" % i for i in range(300)}
    await publish(amqp, queue_name, *sorted(bodies), headers={"k": "v"})

    async def all_handled() -> bool:
        return {m.data for m in handlers.messages} == bodies

    await eventually(all_handled)
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0  # every one acked: none came back
    assert handlers.messages[0].metadata == {"routing_key": queue_name, "headers": {"k": "v"}}
    assert len(handlers.messages) == len(bodies)  # none redelivered
    assert fast_reads == []
    refusals = [line for line in logs if line["event"].startswith("aiormq fast path")]
    assert refusals == [
        {
            "event": "aiormq fast path not used; plain aiormq instead",
            "reason": "aiormq 99.0.0 is installed; it was written for 7.2.x",
            "log_level": "warning",
        }
    ]


# What another client may send: strings that are not UTF-8 where AMQP says UTF-8, which
# RabbitMQ passes through and pamqp refuses to decode. Each is published as raw frames,
# through a fanout exchange so that the routing key can be any bytes.


def _short(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def _long(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _table(*fields: tuple[bytes, bytes]) -> bytes:
    return _long(b"".join(_short(key) + value for key, value in fields))


def _frame(frame_type: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, 1, len(payload)) + payload + b"\xce"


class RawProperties(aiormq.spec.Basic.Properties):
    """Persistent properties written as given: `raw` maps a property name to its bytes."""

    PLACEHOLDERS: ClassVar[dict[str, Any]] = {
        "headers": {"replaced": "by the raw table"},
        "message_id": "replaced",
        "timestamp": datetime(2026, 1, 1, tzinfo=UTC),
    }

    def __init__(self, raw: dict[str, bytes]) -> None:
        super().__init__(delivery_mode=2, **{name: self.PLACEHOLDERS[name] for name in raw})
        self.raw = raw

    def encode_property(self, name: str, value: Any) -> bytes:
        raw = self.raw.get(name)
        return raw if raw is not None else super().encode_property(name, value)


async def publish_raw(
    broker: Broker, exchange: str, body: bytes, raw: dict[str, bytes], routing_key: bytes = b""
) -> None:
    """basic.publish of raw properties and a routing key given as bytes, on a connection of
    its own (without confirms: aiormq would not expect one for a frame it did not send)."""
    method = struct.pack(">IH", aiormq.spec.Basic.Publish.index, 0)
    method += _short(exchange.encode()) + _short(routing_key) + b"\x00"
    header = struct.pack(">HHQ", 60, 0, len(body)) + RawProperties(raw).marshal()
    connection = await aiormq.connect(broker.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        assert channel.number == 1
        payload = _frame(1, method) + _frame(2, header) + _frame(3, body)
        await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        await channel.basic_qos(prefetch_count=0)  # answered after the publish: routed by now
    finally:
        await connection.close()


async def _fanout(amqp: aiormq.abc.AbstractChannel, queue_name: str) -> str:
    """An exchange the queue is bound to whatever the routing key; gone with the queue."""
    exchange = f"{queue_name}.fanout"
    await amqp.exchange_declare(exchange, exchange_type="fanout", auto_delete=True)
    return exchange


async def _behind_a_fanout(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    handlers: Handlers,
) -> tuple[str, Pipeline, RabbitMQProducer]:
    """A pipeline on `queue_name`, bound to a fanout exchange that takes raw frames whatever
    their routing key."""
    exchange = await _fanout(amqp, queue_name)
    pipeline, producer = await make_rabbit_pipeline(handlers, bindings=(Binding(exchange),))
    return exchange, pipeline, producer


class Scripted(Handlers):
    """b"fail…" fails on purpose, anything else succeeds; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.seen.append(message)
        return message.failed("told to fail") if message.data.startswith(b"fail") else message


@dataclass(frozen=True)
class NotUtf8:
    raw: dict[str, bytes]  # encoded properties, by name
    routing_key: bytes
    seen: Callable[[dict[str, Any]], str]  # the string the handler sees, from its metadata
    original: bytes  # the bytes that string was sent as
    problem: str | None  # what the dead letter's reason names when its copy is not exact


NOT_UTF8 = [
    pytest.param(
        NotUtf8(
            {"headers": _table((b"x-\xff", b"S" + _long(b"v")), (b"kept", b"S" + _long(b"ok")))},
            b"",
            lambda metadata: next(key for key in metadata["headers"] if key != "kept"),
            b"x-\xff",
            "header name 'x-\\udcff' is not UTF-8; the header is left out",
        ),
        id="header-key",
    ),
    pytest.param(
        NotUtf8(
            {"message_id": _short(b"\xffm-1")},
            b"",
            lambda metadata: str(metadata["message_id"]),
            b"\xffm-1",
            "message_id '\\udcffm-1' is not UTF-8; left out of the copy",
        ),
        id="message-id",
    ),
    pytest.param(
        NotUtf8(
            {},
            b"bookings.\xff",
            lambda metadata: str(metadata["routing_key"]),
            b"bookings.\xff",
            None,
        ),
        id="routing-key",
    ),
]


def _sent_as(message: Message, case: NotUtf8) -> bytes:
    """The original bytes of the string the handler saw (surrogate escapes undone)."""
    return case.seen(message.metadata).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("case", NOT_UTF8)
async def test_a_failed_message_with_strings_that_are_not_utf8_is_dead_lettered_once(
    broker: Broker,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    case: NotUtf8,
) -> None:
    handlers = Scripted()
    exchange, pipeline, producer = await _behind_a_fanout(
        make_rabbit_pipeline, amqp, queue_name, handlers
    )
    await publish_raw(broker, exchange, b"fail-raw", case.raw, case.routing_key)
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await asyncio.sleep(0.3)  # a reconnect loop would deliver it again meanwhile
    await pipeline.stop()
    assert [m.data for m in handlers.seen] == [b"fail-raw"]
    assert _sent_as(handlers.seen[0], case) == case.original
    assert await queue_depth(amqp, queue_name) == 0
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")  # plain aiormq decodes the copy
    reason = dead.header.properties.headers[REASON_HEADER]
    assert dead.body == b"fail-raw"
    assert reason.startswith("told to fail")
    if case.problem is None:
        assert producer.stats.uncopyable_headers == 0
    else:
        assert case.problem in reason
        assert producer.stats.uncopyable_headers == 1
    assert (producer.stats.dead_letter, producer.stats.reject_and_requeue) == (1, 0)
    assert (producer.stats.reconnects, producer.stats.connection_losses) == (0, 0)


@pytest.mark.parametrize("case", NOT_UTF8)
async def test_a_successful_message_with_strings_that_are_not_utf8_is_acked_once(
    broker: Broker,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    case: NotUtf8,
) -> None:
    handlers = Scripted()
    exchange, pipeline, producer = await _behind_a_fanout(
        make_rabbit_pipeline, amqp, queue_name, handlers
    )
    await publish_raw(broker, exchange, b"ok-raw", case.raw, case.routing_key)
    await eventually(lambda: _stat_is(producer, "ack", 1))
    await asyncio.sleep(0.3)  # a reconnect loop would deliver it again meanwhile
    await pipeline.stop()  # closes the channel: an unacknowledged message would come back
    assert [m.data for m in handlers.seen] == [b"ok-raw"]
    assert _sent_as(handlers.seen[0], case) == case.original
    assert await queue_depth(amqp, queue_name) == 0
    assert (producer.stats.ack, producer.stats.dead_letter) == (1, 0)
    assert (producer.stats.reconnects, producer.stats.connection_losses) == (0, 0)


async def test_a_delivery_whose_properties_cannot_be_decoded_is_rejected_not_looped(
    broker: Broker,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
) -> None:
    graveyard = f"{queue_name}.graveyard"
    await amqp.queue_declare(graveyard, durable=True)
    handlers = Scripted()
    exchange = await _fanout(amqp, queue_name)
    rejected_before = events.counts.undecodable_rejected
    dead_letters = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": graveyard}
    with capture_logs() as logs:
        pipeline, producer = await make_rabbit_pipeline(
            handlers, bindings=(Binding(exchange),), declare=QueueDeclare(arguments=dead_letters)
        )
        # A timestamp sent in microseconds: pamqp reads it as milliseconds, the year 55 000.
        microseconds = struct.pack(">Q", 1_700_000_000_000_000)
        await publish_raw(broker, exchange, b"ok-undecodable", {"timestamp": microseconds})
        for _ in range(100):
            await publish_raw(broker, exchange, b"ok-after", {})
        await eventually(lambda: _stat_is(producer, "ack", 100))
        # Rejected without requeue: dead-lettered by the broker, the original as it was.
        await eventually(lambda: _depth_is(amqp, graveyard, 1))
        await asyncio.sleep(0.3)  # a reconnect loop would deliver it again meanwhile
        await pipeline.stop()
    assert [m.data for m in handlers.seen] == [b"ok-after"] * 100
    assert await queue_depth(amqp, queue_name) == 0
    assert events.counts.undecodable_rejected == rejected_before + 1
    # The rejected tag counts as settled: the coalesced acks' low-water mark passes it.
    assert producer.stats.reject == 1
    assert producer.stats.multiple_ack_frames >= 1
    assert (producer.stats.reconnects, producer.stats.connection_losses) == (0, 0)
    [rejected] = [line for line in logs if line["event"].startswith("could not decode")]
    assert rejected["log_level"] == "error"
    assert rejected["delivery_tag"] == 1
    assert rejected["routing_key"] == ""
    assert "out of range" in rejected["error"]


async def _stat_is(producer: RabbitMQProducer, name: str, count: int) -> bool:
    return bool(getattr(producer.stats, name) == count)


async def _depth_is(amqp: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    try:
        return await queue_depth(amqp, queue) == count
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False


class QuotesTheId(Handlers):
    """Fails every message with a reason quoting its message_id, as handlers do."""

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        return message.failed(f"no booking for {message.metadata['message_id']}")


async def test_a_reason_quoting_a_message_id_that_is_not_utf8_is_dead_lettered_once(
    broker: Broker,
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
) -> None:
    exchange, pipeline, producer = await _behind_a_fanout(
        make_rabbit_pipeline, amqp, queue_name, QuotesTheId()
    )
    await publish_raw(broker, exchange, b"x", {"message_id": _short(b"\xffm-2")})
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await asyncio.sleep(0.3)  # a requeue loop would deliver it again meanwhile
    await pipeline.stop()
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    assert dead.header.properties.headers[REASON_HEADER].startswith("no booking for \\udcffm-2")
    assert (producer.stats.dead_letter, producer.stats.reject_and_requeue) == (1, 0)
