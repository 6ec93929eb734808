"""Each acknowledgement outcome, observed on the broker."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiormq
import pytest

from ingest import Handlers, Message
from ingest.rabbitmq import (
    ATTEMPTS_HEADER,
    EXCEPTION_HEADER,
    REASON_HEADER,
    QueueDeclare,
    RetryPolicy,
    retry_queue_name,
)

from .conftest import MakeRabbitPipeline, drain_queue, eventually, publish, queue_depth


class Scripted(Handlers):
    """b"ok…" succeeds, b"fail…" fails on purpose, b"raise…" raises; records deliveries."""

    def __init__(self, on_failure: str | None = None) -> None:
        self.on_failure = on_failure
        self.seen: list[tuple[bytes, bool]] = []
        self.headers: list[dict[str, Any]] = []

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        self.seen.append((message.data, message.metadata["redelivered"]))
        self.headers.append(message.metadata["headers"])
        if message.data.startswith(b"fail"):
            return message.failed("told to fail")
        if message.data.startswith(b"raise"):
            raise RuntimeError("database down")
        return message

    async def handle_failed(self, messages: list[Message], context: Any) -> list[Message]:
        if self.on_failure:
            return [m.configure_ack(on_failure=self.on_failure) for m in messages]
        return messages


async def test_ack_removes_the_messages_from_the_queue(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Scripted()
    pipeline, producer = await make_rabbit_pipeline(handlers)
    await publish(amqp, queue_name, *(b"ok%d" % i for i in range(50)))
    await eventually(lambda: _settled(producer, "ack", 50))
    await pipeline.stop()  # closes the channel: anything unacknowledged would come back
    assert await queue_depth(amqp, queue_name) == 0
    assert producer.stats.multiple_ack_frames >= 1


async def test_reject_dead_letters_with_the_reason_in_headers(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    pipeline, _producer = await make_rabbit_pipeline(Scripted())
    await publish(amqp, queue_name, b"fail-1", message_id="m-1")
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await pipeline.stop()
    assert await queue_depth(amqp, queue_name) == 0
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    headers = dead.header.properties.headers
    assert dead.body == b"fail-1"
    assert dead.header.properties.message_id == "m-1"
    assert headers[REASON_HEADER] == "told to fail"
    assert headers[ATTEMPTS_HEADER] == 1


async def test_a_body_of_many_frames_is_dead_lettered_whole_with_its_properties(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    # 1 MiB: eight frames at the broker's frame_max, published from views of the body.
    body = b"fail" + bytes(range(256)) * 4096
    properties = {"priority": 3, "app_id": "tests", "message_type": "booking", "reply_to": "r"}
    pipeline, producer = await make_rabbit_pipeline(Scripted())
    await publish(amqp, queue_name, body, message_id="big", **properties)
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await pipeline.stop()
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    kept = dead.header.properties
    assert dead.body == body
    assert (kept.message_id, kept.priority, kept.app_id, kept.message_type, kept.reply_to) == (
        "big",
        3,
        "tests",
        "booking",
        "r",
    )
    assert kept.headers[REASON_HEADER] == "told to fail"
    assert producer.stats.dead_letter == 1


async def test_reject_without_a_dead_letter_queue_is_a_plain_reject(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    # The broker's own dead-lettering shows the message was rejected, not requeued.
    graveyard = f"{queue_name}.graveyard"
    await amqp.queue_declare(graveyard, durable=True)
    _pipeline, producer = await make_rabbit_pipeline(
        Scripted(),
        dead_letter_queue="",
        declare=QueueDeclare(
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": graveyard}
        ),
    )
    await publish(amqp, queue_name, b"fail")
    await eventually(lambda: _depth_is(amqp, graveyard, 1))
    [dead] = await drain_queue(amqp, graveyard)
    assert dead.header.properties.headers["x-death"][0]["reason"] == "rejected"
    assert producer.stats.reject == 1


async def test_reject_and_requeue_redelivers(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    class RequeueOnce(Scripted):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            self.seen.append((message.data, message.metadata["redelivered"]))
            if not message.metadata["redelivered"]:
                return message.failed("not yet").configure_ack(on_failure="reject_and_requeue")
            return message

    handlers = RequeueOnce()
    _pipeline, producer = await make_rabbit_pipeline(handlers)
    await publish(amqp, queue_name, b"again")
    await eventually(lambda: _settled(producer, "ack", 1))
    assert handlers.seen == [(b"again", False), (b"again", True)]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_reject_and_requeue_once_requeues_then_dead_letters(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    queue_type: str,
) -> None:
    handlers = Scripted(on_failure="reject_and_requeue_once")
    _pipeline, producer = await make_rabbit_pipeline(
        handlers, declare=QueueDeclare(arguments={"x-queue-type": queue_type})
    )
    await publish(amqp, queue_name, b"fail-twice")
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await eventually(lambda: _settled(producer, "dead_letter", 1))
    assert handlers.seen == [(b"fail-twice", False), (b"fail-twice", True)]
    assert producer.stats.reject_and_requeue == 1


async def test_exceptions_are_retried_with_delay_then_dead_lettered(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Scripted()
    _pipeline, producer = await make_rabbit_pipeline(
        handlers, retry=RetryPolicy(max_attempts=3, delays=(0.1, 0.2))
    )
    await publish(amqp, queue_name, b"raise-1")
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    assert [body for body, _ in handlers.seen] == [b"raise-1"] * 3
    assert producer.stats.retry == 2
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    headers = dead.header.properties.headers
    assert headers[ATTEMPTS_HEADER] == 3
    assert headers[REASON_HEADER] == "handle_message raised RuntimeError: database down"
    assert headers[EXCEPTION_HEADER] == "RuntimeError"
    # The retry queues exist, with the delay as TTL, dead-lettering back to the work queue.
    assert await queue_depth(amqp, retry_queue_name(queue_name, 0.1)) == 0
    assert await queue_depth(amqp, queue_name) == 0


async def test_a_failure_on_purpose_is_not_retried(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Scripted()
    _pipeline, producer = await make_rabbit_pipeline(
        handlers, retry=RetryPolicy(max_attempts=3, delays=(0.1,))
    )
    await publish(amqp, queue_name, b"fail-now")
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    assert len(handlers.seen) == 1
    assert producer.stats.retry == 0


async def _settled(producer: Any, action: str, count: int) -> bool:
    return bool(getattr(producer.stats, action) >= count)


async def _depth_is(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    try:
        return await queue_depth(channel, queue) == count
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False


class RawHeaders(aiormq.spec.Basic.Properties):
    """Properties whose headers table goes out as the bytes given: what another client may
    send and pamqp's own encoder would refuse (a long string that is not UTF-8) or change
    (a 64-bit double)."""

    def __init__(self, table: bytes) -> None:
        super().__init__(headers={"replaced": "by the raw table"}, delivery_mode=2)
        self.raw_table = table

    def encode_property(self, name: str, value: Any) -> bytes:
        return self.raw_table if name == "headers" else super().encode_property(name, value)


def _field(key: str, value: bytes) -> bytes:
    """A table field: its name, then a value with its type tag."""
    return bytes([len(key)]) + key.encode() + value


def _sized(*parts: bytes) -> bytes:
    payload = b"".join(parts)
    return struct.pack(">I", len(payload)) + payload


def _long_string(raw: bytes) -> bytes:
    return b"S" + _sized(raw)


def _double(value: float) -> bytes:
    return b"d" + struct.pack(">d", value)


@pytest.mark.parametrize(
    ("body", "options"),
    [
        pytest.param(b"fail-raw", {}, id="failed-without-retry-policy"),
        pytest.param(
            b"raise-raw",
            {"retry": RetryPolicy(max_attempts=3, delays=(0.1,))},
            id="raised-with-retry-policy",
        ),
    ],
)
async def test_a_header_that_cannot_be_copied_dead_letters_once_with_the_reason(
    make_rabbit_pipeline: MakeRabbitPipeline,
    amqp: aiormq.abc.AbstractChannel,
    queue_name: str,
    body: bytes,
    options: dict[str, Any],
) -> None:
    handlers = Scripted()
    pipeline, producer = await make_rabbit_pipeline(handlers, **options)
    table = _sized(_field("x-raw", _long_string(b"\xff\xfe")), _field("kept", _long_string(b"ok")))
    await amqp.basic_publish(body, routing_key=queue_name, properties=RawHeaders(table))
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    await asyncio.sleep(0.3)  # a requeue loop would deliver it again meanwhile
    await pipeline.stop()
    assert handlers.seen == [(body, False)]
    assert await queue_depth(amqp, queue_name) == 0
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    headers = dead.header.properties.headers
    assert dead.body == body
    assert "'x-raw' held a long string that is not UTF-8" in headers[REASON_HEADER]
    assert headers["x-raw"] == bytearray(b"\xff\xfe")  # the same bytes, as a byte array
    assert headers["kept"] == "ok"
    assert (producer.stats.uncopyable_headers, producer.stats.dead_letter) == (1, 1)
    assert producer.stats.reject_and_requeue == 0


async def test_float_headers_are_copied_exactly_to_retries_and_dead_letters(
    make_rabbit_pipeline: MakeRabbitPipeline, amqp: aiormq.abc.AbstractChannel, queue_name: str
) -> None:
    handlers = Scripted()
    await make_rabbit_pipeline(handlers, retry=RetryPolicy(max_attempts=2, delays=(0.1,)))
    lines = b"A" + _sized(_double(0.1), _double(1e-300), b"F" + _sized())
    order = b"F" + _sized(_field("total", _double(19.99)), _field("lines", lines))
    table = _sized(_field("price", _double(19.99)), _field("order", order))
    await amqp.basic_publish(b"raise-float", routing_key=queue_name, properties=RawHeaders(table))
    await eventually(lambda: _depth_is(amqp, f"{queue_name}.dlq", 1))
    [dead] = await drain_queue(amqp, f"{queue_name}.dlq")
    expected = {"price": 19.99, "order": {"total": 19.99, "lines": [0.1, 1e-300, {}]}}
    retried = handlers.headers[1]  # the retry copy, as the handler saw it
    copies = [retried, dead.header.properties.headers]
    assert [{k: h[k] for k in expected} for h in copies] == [expected, expected]
