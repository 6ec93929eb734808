"""The aiormq fast path: its reader and frames match aiormq's and pamqp's own, it applies
to the connection it is installed on only, and it refuses versions it was not written for."""

from __future__ import annotations

import asyncio
import importlib.metadata
from datetime import UTC, datetime
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat
from structlog.testing import capture_logs

from ingest.rabbitmq import _fastpath as fastpath

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
FRAMES: list[tuple[int, Any]] = [
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
# aiormq's own reader, read from the class: the fast path never replaces it there.
AIORMQ_GET_FRAME = FrameReceiver.get_frame


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


async def read_all(read: Any, data: bytes) -> list[tuple[int, int, Any]]:
    receiver = FrameReceiver(stream(data))
    frames = []
    for _ in FRAMES:
        frames.append(await read(receiver))
    return frames


async def test_the_fast_reader_returns_what_aiormqs_returns() -> None:
    data = b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in FRAMES)
    theirs = await read_all(AIORMQ_GET_FRAME, data)
    ours = await read_all(fastpath.get_frame, data)
    assert [(n, c, type(f)) for n, c, f in ours] == [(n, c, type(f)) for n, c, f in theirs]
    assert [pamqp.frame.marshal(f, c) for _, c, f in ours] == [
        pamqp.frame.marshal(f, c) for _, c, f in theirs
    ]
    assert [fields(f) for _, _, f in ours] == [fields(f) for _, _, f in theirs]


async def test_a_malformed_delivery_is_decoded_as_pamqp_decodes_it() -> None:
    good = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, False, "", "q"), 1)
    # The routing key claims more bytes than the frame holds: pamqp's lenient decoding.
    bad = good[:-3] + b"\x09" + good[-2:]
    [(_, _, ours)] = [await fastpath.get_frame(FrameReceiver(stream(bad)))]
    [(_, _, theirs)] = [await AIORMQ_GET_FRAME(FrameReceiver(stream(bad)))]
    assert fields(ours) == fields(theirs)


async def test_a_truncated_stream_is_a_connection_error() -> None:
    data = pamqp.frame.marshal(ContentBody(b"cinema,1"), 1)[:-3]
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await fastpath.get_frame(FrameReceiver(stream(data)))


@pytest.mark.parametrize(
    ("packed", "method"),
    [
        (fastpath.ack(7, 2**40, multiple=True), spec.Basic.Ack(2**40, True)),
        (fastpath.ack(1, 5), spec.Basic.Ack(5, False)),
        (fastpath.reject(3, 9, requeue=True), spec.Basic.Reject(9, True)),
        (fastpath.nack(2, 4, multiple=True, requeue=False), spec.Basic.Nack(4, True, False)),
    ],
    ids=["ack-multiple", "ack", "reject-requeue", "nack"],
)
def test_hand_packed_frames_match_pamqp(packed: bytes, method: Any) -> None:
    channel = packed[2] if packed[1] == 0 else packed[1] << 8 | packed[2]
    assert packed == pamqp.frame.marshal(method, channel)


def test_the_installed_aiormq_and_pamqp_are_accepted() -> None:
    assert fastpath.usable()


async def test_install_changes_only_the_connection_it_is_given() -> None:
    ours = aiormq.Connection("amqp://127.0.0.1/")
    theirs = aiormq.Connection("amqp://127.0.0.1/")
    assert fastpath.install(ours)
    assert "_Connection__reader" in vars(ours)
    assert "_Connection__reader" not in vars(theirs)
    assert FrameReceiver.get_frame is AIORMQ_GET_FRAME


def fake_versions(**versions: str | None) -> Any:
    def version(distribution: str) -> str:
        found = versions.get(distribution, importlib.metadata.version(distribution))
        if found is None:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return found

    return version


@pytest.mark.parametrize(
    ("versions", "reason"),
    [
        ({"aiormq": "7.3.0"}, "aiormq 7.3.0 is installed; it was written for 7.2.x"),
        ({"aiormq": "8.0.0"}, "aiormq 8.0.0 is installed; it was written for 7.2.x"),
        ({"aiormq": "7.1.6"}, "aiormq 7.1.6 is installed; it was written for 7.2.x"),
        ({"aiormq": "seven"}, "aiormq seven is installed; it was written for 7.2.x"),
        ({"pamqp": "5.0.0"}, "pamqp 5.0.0 is installed; it was written for 4.x"),
        ({"pamqp": "3.3.0"}, "pamqp 3.3.0 is installed; it was written for 4.x"),
        ({"aiormq": None}, "aiormq's version is unknown (no package metadata)"),
    ],
    ids=["aiormq-7.3", "aiormq-8", "aiormq-7.1", "aiormq-garbled", "pamqp-5", "pamqp-3", "none"],
)
async def test_an_unknown_version_is_refused_and_said_once(
    monkeypatch: pytest.MonkeyPatch, versions: dict[str, str | None], reason: str
) -> None:
    monkeypatch.setattr(fastpath, "_version", fake_versions(**versions))
    monkeypatch.setattr(fastpath, "_reported", set())
    connection = aiormq.Connection("amqp://127.0.0.1/")
    # An unopened channel: a refused fast path touches nothing of it.
    channel = aiormq.Channel.__new__(aiormq.Channel)
    with capture_logs() as logs:
        assert not fastpath.install(connection)
        assert not fastpath.deliver_directly(channel, deliver)
        assert not fastpath.usable()
    assert "_Connection__reader" not in vars(connection)
    assert "_on_deliver_frame" not in vars(channel)
    assert logs == [
        {
            "event": "aiormq fast path not used; plain aiormq instead",
            "reason": reason,
            "log_level": "warning",
        }
    ]


def deliver(raw: DeliveredMessage) -> None:
    raise AssertionError("a refused fast path delivers nothing")


@pytest.mark.parametrize(
    ("owner", "attribute"),
    [
        (aiormq.Connection, "_Connection__reader"),
        (FrameReceiver, "get_frame"),
        (aiormq.Channel, "_Channel__get_content_header"),
        (aiormq.Channel, "_read_content"),
        (aiormq.Channel, "_on_deliver_frame"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_an_aiormq_internal_gone_is_refused(
    monkeypatch: pytest.MonkeyPatch, owner: type, attribute: str
) -> None:
    monkeypatch.delattr(owner, attribute)
    monkeypatch.setattr(fastpath, "_reported", set())
    with capture_logs() as logs:
        assert not fastpath.usable()
    assert logs[0]["reason"].endswith(f"{owner.__name__}.{attribute} is gone")
