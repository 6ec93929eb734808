"""The fast frame reader returns what aiormq's own does, frame for frame."""

from __future__ import annotations

import asyncio

import pamqp.frame
import pytest
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from ingest.rabbitmq import frame_reader

FRAMES = [
    (1, spec.Basic.Deliver("ctag", 7, True, "", "bookings_queue")),
    (1, ContentHeader(0, 8, spec.Basic.Properties(message_id="m-1", headers={"k": "v"}))),
    (1, ContentBody(b"cinema,1")),
    (0, Heartbeat()),
    (2, spec.Basic.Ack(99, True)),
]


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


async def test_a_truncated_stream_is_a_connection_error() -> None:
    data = pamqp.frame.marshal(ContentBody(b"cinema,1"), 1)[:-3]
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await frame_reader.get_frame(FrameReceiver(stream(data)))
