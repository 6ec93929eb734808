"""The fast frame reader returns what aiormq's own does, frame for frame."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from ingest.rabbitmq import _frame_reader as frame_reader

EVERY_SIMPLE_PROPERTY = spec.Basic.Properties(
    content_type="text/plain",
    content_encoding="utf-8",
    delivery_mode=2,
    priority=5,
    correlation_id="c-1",
    reply_to="replies",
    expiration="60000",
    message_id="m-2",
    message_type="booking",
    user_id="guest",
    app_id="tickets",
)
FRAMES = [
    (1, spec.Basic.Deliver("ctag", 7, True, "", "bookings_queue")),
    (1, ContentHeader(0, 8, spec.Basic.Properties(message_id="m-1", headers={"k": "v"}))),
    (1, ContentBody(b"cinema,1")),
    (1, spec.Basic.Deliver("ctag-é", 2**40, False, "amq.topic", "bookings.✓")),
    (1, ContentHeader(0, 8, spec.Basic.Properties(delivery_mode=2, message_id="m-1"))),
    (1, ContentHeader(0, 0, spec.Basic.Properties())),
    (1, ContentHeader(0, 99, EVERY_SIMPLE_PROPERTY)),
    (1, ContentHeader(0, 1, spec.Basic.Properties(timestamp=datetime(2026, 11, 22, tzinfo=UTC)))),
    (0, Heartbeat()),
    (2, spec.Basic.Ack(99, True)),
    (1, spec.Basic.GetOk(3, False, "", "q", 0)),
]


def fields(frame: object) -> dict[str, object]:
    """Every attribute of a frame (and of a header's properties), to compare exactly."""
    names = getattr(frame, "__slots__", None) or vars(frame)
    values = {name: getattr(frame, name) for name in names}
    if isinstance(frame, ContentHeader):
        values["properties"] = fields(frame.properties)
    return values


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def read_all(read: object, data: bytes) -> list[tuple[int, int, object]]:
    receiver = FrameReceiver(stream(data))
    frames = []
    for _ in FRAMES:
        frames.append(await read(receiver))  # type: ignore[operator]
    return frames


async def test_the_fast_reader_returns_what_aiormqs_returns() -> None:
    data = b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in FRAMES)
    theirs = await read_all(frame_reader.ORIGINAL, data)
    ours = await read_all(frame_reader.get_frame, data)
    assert [(n, c, type(f)) for n, c, f in ours] == [(n, c, type(f)) for n, c, f in theirs]
    assert [pamqp.frame.marshal(f, c) for _, c, f in ours] == [
        pamqp.frame.marshal(f, c) for _, c, f in theirs
    ]
    assert [fields(f) for _, _, f in ours] == [fields(f) for _, _, f in theirs]


async def test_a_malformed_delivery_is_decoded_as_pamqp_decodes_it() -> None:
    good = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, False, "", "q"), 1)
    # The routing key claims more bytes than the frame holds: pamqp's lenient decoding.
    bad = good[:-3] + b"\x09" + good[-2:]
    [(_, _, ours)] = [await frame_reader.get_frame(FrameReceiver(stream(bad)))]
    [(_, _, theirs)] = [await frame_reader.ORIGINAL(FrameReceiver(stream(bad)))]
    assert fields(ours) == fields(theirs)


async def test_a_truncated_stream_is_a_connection_error() -> None:
    data = pamqp.frame.marshal(ContentBody(b"cinema,1"), 1)[:-3]
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await frame_reader.get_frame(FrameReceiver(stream(data)))
