"""The publisher's fast path, on a real aiormq channel whose connection is a recorder:
it writes the bytes aiormq's own `basic_publish` writes, in one write, and aiormq's own
confirm, return and close handling settles it by delivery tag."""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import ChannelFrame
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from structlog.testing import capture_logs

from ingest.exceptions import PublishError, Unroutable
from ingest.rabbitmq import PUBLISHED_AT_HEADER, OutgoingMessage, Publisher
from ingest.rabbitmq._aiormq import gate, publishing
from ingest.rabbitmq._aiormq.internals import PUBLISHING_CHANNEL
from ingest.rabbitmq._copies import CopyProperties, copy_properties
from ingest.rabbitmq._wire import pack, pack_copy
from ingest.rabbitmq.publisher import STAMP_INTERVAL_S

FRAME_MAX = 4096  # small, so that a body of a few KiB is split as aiormq splits it


class Wire:
    """An aiormq channel on an unconnected connection: what the channel queues for the
    connection's writer is recorded (and drained, as the writer does); frames from the
    broker are fed to the channel's own reader."""

    def __init__(self, *, on_return_raises: bool = True) -> None:
        connection = aiormq.Connection("amqp://127.0.0.1/")
        connection.connection_tune = spec.Connection.Tune(frame_max=FRAME_MAX)
        connection.server_properties = {"capabilities": {"publisher_confirms": True}}
        self.channel = aiormq.Channel(
            connection, 1, publisher_confirms=True, on_return_raises=on_return_raises
        )
        self.writes: list[bytes] = []
        self._wrote = asyncio.Event()
        self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while True:
            frame: ChannelFrame = await self.channel.write_queue.get()
            self.writes.append(frame.payload)
            self._wrote.set()
            frame.drain()

    async def written(self, count: int) -> None:
        while len(self.writes) < count:
            self._wrote.clear()
            await self._wrote.wait()

    def feed(self, *frames: Any) -> None:
        for frame in frames:
            self.channel.frames.put_nowait((0, frame))

    async def close(self) -> None:
        self._writer.cancel()
        await self.channel.close()


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    wire = Wire()
    yield wire
    await wire.close()


def decoded(payload: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """Every frame of a payload as pamqp decodes it: channel, name and all fields."""
    frames = []
    while payload:
        size, channel, frame = pamqp.frame.unmarshal(payload)
        payload = payload[size:]
        frames.append((channel, frame.name, fields(frame)))
    return frames


def fields(frame: object) -> dict[str, Any]:
    names = getattr(frame, "__slots__", None) or vars(frame)
    values = {name: getattr(frame, name) for name in names}
    if isinstance(frame, ContentHeader):
        values["properties"] = fields(frame.properties)
    if isinstance(frame, ContentBody):
        values["value"] = bytes(frame.value)
    return values


MESSAGES = [
    OutgoingMessage(b"cinema,1", "bookings_queue", message_id="m-1"),
    OutgoingMessage(
        b'{"type": "email"}',
        "notifications_queue",
        exchange="amq.direct",
        message_id="m-2",
        content_type="application/json",
        correlation_id="c-2",
        headers={"x-attempt": 2, "reason": "été", "nested": {"list": [1, 2.5, None, True]}},
    ),
    OutgoingMessage(b"", "q", message_id="empty-body"),
    OutgoingMessage(bytes(range(256)) * 40, "q", message_id="over-frame-max"),  # 10240 B
    OutgoingMessage(b"x" * (FRAME_MAX - 8), "q", message_id="exactly-one-frame"),
    OutgoingMessage(b"\xff", "bookings.✓", message_id="id-é", content_type=""),
    OutgoingMessage(b"headers-empty", "q", message_id="m-7", headers={}),
]


async def published_by_aiormq(wire: Wire, messages: Sequence[OutgoingMessage]) -> bytes:
    """What aiormq's `basic_publish` writes for `messages` (the fallback path)."""
    wire.writes.clear()
    task = asyncio.create_task(publishing._publish_publicly(wire.channel, messages, 5.0))
    await wire.written(len(messages))
    wire.feed(spec.Basic.Ack(wire.channel.delivery_tag, multiple=True))
    await task
    return b"".join(wire.writes)


async def published_packed(wire: Wire, messages: Sequence[OutgoingMessage]) -> bytes:
    wire.writes.clear()
    task = asyncio.create_task(publishing._publish_packed(wire.channel, messages, 5.0))
    await wire.written(1)
    wire.feed(spec.Basic.Ack(wire.channel.delivery_tag, multiple=True))
    await task
    [written] = wire.writes
    return written


async def test_the_packed_frames_are_those_aiormqs_basic_publish_sends(wire: Wire) -> None:
    theirs = await published_by_aiormq(wire, MESSAGES)
    ours = await published_packed(wire, MESSAGES)
    assert decoded(ours) == decoded(theirs)
    assert ours == theirs
    bodies = [f for _, name, f in decoded(ours) if name == "ContentBody"]
    assert [len(f["value"]) for f in bodies[-6:-2]] == [4088, 4088, 2064, 4088]


short_text = st.text(max_size=40)
header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(width=32),  # pamqp packs a float in a table as 32 bits
    short_text,
    st.binary(max_size=8).map(bytearray),
    st.lists(short_text, max_size=3),
)
outgoing = st.builds(
    OutgoingMessage,
    body=st.binary(max_size=300),
    routing_key=short_text,
    exchange=st.sampled_from(["", "amq.direct", "amq.topic"]),
    message_id=st.text(min_size=1, max_size=60),
    headers=st.none() | st.dictionaries(short_text, header_values, max_size=4),
    content_type=st.none() | short_text,
    correlation_id=st.none() | short_text,
)


@given(st.lists(outgoing, max_size=5), st.integers(1, 2**16 - 1), st.integers(1, 120))
def test_packed_frames_are_pamqps_frames_of_what_basic_publish_builds(
    messages: list[OutgoingMessage], channel: int, max_content_size: int
) -> None:
    # The frames aiormq's `basic_publish` builds for each message, marshalled by pamqp.
    frames: list[Any] = []
    for m in messages:
        properties = m.properties()
        frames.append(spec.Basic.Publish(0, m.exchange, m.routing_key, mandatory=True))
        frames.append(ContentHeader(body_size=len(m.body), properties=properties))
        for start in range(0, len(m.body), max_content_size):
            frames.append(ContentBody(m.body[start : start + max_content_size]))
    expected = ChannelFrame.marshall(channel_number=channel, frames=frames).payload
    payload, message_ids = pack(channel, max_content_size, messages)
    assert payload == expected
    assert message_ids == [m.message_id for m in messages]


COPY_PROPERTIES = {
    "content_type": "text/csv",
    "content_encoding": "gzip",
    "delivery_mode": 2,
    "priority": 3,
    "correlation_id": "c-1",
    "reply_to": "replies",
    "expiration": "60000",
    "message_id": "m-copy",
    "timestamp": datetime.datetime(2026, 12, 5, 1, 2, 3, tzinfo=datetime.UTC),
    "message_type": "booking",
    "user_id": "guest",
    "app_id": "ingest-tests",
}
COPY_HEADERS = {"x-reason": "told to fail", "price": 19.99, "nested": {"list": [1, 2.5]}}


def copy_of(**changes: Any) -> CopyProperties:
    properties, problems = copy_properties(
        spec.Basic.Properties(**{**COPY_PROPERTIES, **changes}), COPY_HEADERS
    )
    assert problems == []
    return properties


@pytest.mark.parametrize("size", [0, 5, FRAME_MAX - 8, 3 * (FRAME_MAX - 8) + 1])
async def test_a_packed_copy_is_what_aiormqs_basic_publish_sends(wire: Wire, size: int) -> None:
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    publish = publishing.copy_publisher(wire.channel)
    assert publish.func is publishing._publish_copy_packed  # type: ignore[attr-defined]
    payloads = []
    for copy in (publishing._publish_copy_publicly, publish.func):  # type: ignore[attr-defined]
        wire.writes.clear()
        task = asyncio.create_task(copy(wire.channel, body, "q.dlq", copy_of(), 5.0))
        await wire.written(1)
        wire.feed(spec.Basic.Ack(wire.channel.delivery_tag))
        await asyncio.wait_for(task, 1)
        payloads.append(b"".join(wire.writes))
    theirs, ours = payloads
    assert decoded(ours) == decoded(theirs)
    assert ours == theirs
    assert (wire.channel.confirmations, wire.channel.message_id_delivery_tag) == ({}, {})


async def test_a_copy_without_a_message_id_gets_one_as_with_aiormq(wire: Wire) -> None:
    payload, message_id = pack_copy(1, 100, "q", copy_of(message_id=None), b"x")
    [_, (_, _, header), _] = decoded(payload)
    assert header["properties"]["message_id"] == message_id
    assert len(message_id) == 32


@pytest.mark.parametrize(
    ("answer", "raised"),
    [
        (spec.Basic.Nack(1), r"the broker refused message m-copy"),
        (spec.Channel.Close(406, "PRECONDITION_FAILED - gone", 0, 0), r"the channel closed"),
    ],
)
async def test_a_copy_refused_or_lost_raises(wire: Wire, answer: Any, raised: str) -> None:
    publish = publishing.copy_publisher(wire.channel)
    task = asyncio.ensure_future(publish(b"x", "q.dlq", copy_of(), 5.0))
    await wire.written(1)
    wire.feed(answer)
    with pytest.raises(PublishError, match=raised):
        await asyncio.wait_for(task, 1)


def test_a_large_copy_is_held_once_more_not_three_times() -> None:
    # aiormq's `basic_publish` holds a large body twice more at once (its chunks, then the
    # frames joined: 2.02 times the body here); packed, the joined payload is its only copy.
    body = bytes(8 * 1024 * 1024)
    properties = copy_of()
    tracemalloc.start()
    try:
        payload, _ = pack_copy(1, 131_064, "q.dlq", properties, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(payload) > len(body)
    assert peak < 1.1 * len(body), f"{peak / len(body):.2f} times the body"


async def test_an_empty_batch_writes_nothing(wire: Wire) -> None:
    await publishing._publish_packed(wire.channel, [], 5.0)
    assert (wire.writes, wire.channel.delivery_tag) == ([], 0)


async def test_a_message_without_a_message_id_gets_one_as_with_aiormq(wire: Wire) -> None:
    message = OutgoingMessage(b"x", "q", message_id="")
    [_, (_, _, header), _] = decoded(await published_packed(wire, [message]))
    assert len(header["properties"]["message_id"]) == 32


async def test_a_batch_is_one_write_settled_by_the_brokers_multiple_acks(wire: Wire) -> None:
    wire.channel.delivery_tag = 41  # publishes before, on the same channel
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES, 5.0))
    await wire.written(1)
    assert list(wire.channel.confirmations) == list(range(42, 42 + len(MESSAGES)))
    wire.feed(spec.Basic.Ack(44, multiple=True))
    await asyncio.sleep(0.01)
    assert not task.done()
    wire.feed(spec.Basic.Ack(45), spec.Basic.Ack(48, multiple=True))
    await asyncio.wait_for(task, 1)
    assert len(wire.writes) == 1
    assert (wire.channel.confirmations, wire.channel.message_id_delivery_tag) == ({}, {})


async def test_a_nacked_message_fails_the_batch_once_all_are_settled(wire: Wire) -> None:
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:3], 5.0))
    await wire.written(1)
    wire.feed(spec.Basic.Ack(1), spec.Basic.Nack(2))
    await asyncio.sleep(0.01)
    assert not task.done()  # the third is not settled yet
    wire.feed(spec.Basic.Ack(3))
    with pytest.raises(PublishError, match=r"the broker refused message m-2") as raised:
        await task
    assert not isinstance(raised.value, Unroutable)
    assert isinstance(raised.value.__cause__, aiormq.exceptions.DeliveryError)


async def test_a_returned_message_is_unroutable_and_named(wire: Wire) -> None:
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:3], 5.0))
    await wire.written(1)
    returned = MESSAGES[1]
    # As the broker answers an unroutable `mandatory` publish: basic.return, then its ack.
    wire.feed(
        spec.Basic.Return(312, "NO_ROUTE", returned.exchange, returned.routing_key),
        ContentHeader(0, len(returned.body), spec.Basic.Properties(message_id="m-2")),
        ContentBody(returned.body),
        spec.Basic.Ack(3, multiple=True),
    )
    with pytest.raises(
        Unroutable,
        match=r"no queue bound for exchange 'amq.direct' and routing key "
        r"'notifications_queue' \(message_id m-2\)$",
    ):
        await asyncio.wait_for(task, 1)


async def test_several_failures_raise_the_first_and_count_the_others(wire: Wire) -> None:
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:4], 5.0))
    await wire.written(1)
    wire.feed(spec.Basic.Nack(4), spec.Basic.Nack(2, multiple=True), spec.Basic.Ack(3))
    with pytest.raises(PublishError, match=r"message m-1: .*; 2 other message\(s\)"):
        await asyncio.wait_for(task, 1)


async def test_a_channel_closed_before_the_confirms_fails_the_batch(wire: Wire) -> None:
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:3], 5.0))
    await wire.written(1)
    wire.feed(spec.Basic.Ack(1), spec.Channel.Close(406, "PRECONDITION_FAILED - gone", 0, 0))
    with pytest.raises(
        PublishError, match=r"2 of 3 message\(s\) not confirmed: the channel closed"
    ):
        await asyncio.wait_for(task, 1)


async def test_a_closed_channel_publishes_nothing(wire: Wire) -> None:
    await wire.channel.close()
    with pytest.raises(PublishError, match="closed"):
        await publishing._publish_packed(wire.channel, MESSAGES[:1], 5.0)
    assert wire.writes == []


async def test_unconfirmed_within_the_timeout_fails_and_a_late_confirm_is_ignored(
    wire: Wire,
) -> None:
    with pytest.raises(PublishError, match=r"2 of 2 message\(s\) not confirmed within 0.05s"):
        await publishing._publish_packed(wire.channel, MESSAGES[:2], 0.05)
    wire.feed(spec.Basic.Ack(2, multiple=True))
    await asyncio.sleep(0.01)
    assert (wire.channel.confirmations, wire.channel.message_id_delivery_tag) == ({}, {})
    # The channel goes on: the next batch's tags follow.
    assert await published_packed(wire, MESSAGES[:1])
    assert wire.channel.delivery_tag == 3


async def test_a_cancelled_batch_leaves_the_channel_usable(wire: Wire) -> None:
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:2], 5.0))
    await wire.written(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    wire.feed(spec.Basic.Ack(2, multiple=True))
    assert await published_packed(wire, MESSAGES[:1])


async def test_a_batch_blocked_on_a_full_write_queue_and_cancelled_frees_its_tags(
    wire: Wire,
) -> None:
    wire._writer.cancel()  # nothing is written: the connection's bounded queue fills
    queue = wire.channel.write_queue
    while not queue.full():
        queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    task = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:3], 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    channel = wire.channel
    assert (channel.delivery_tag, channel.confirmations, channel.message_id_delivery_tag) == (
        0,
        {},
        {},
    )


async def test_batches_and_aiormqs_own_publishes_share_the_delivery_tags(wire: Wire) -> None:
    first = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:2], 5.0))
    plain = asyncio.create_task(wire.channel.basic_publish(b"plain", routing_key="q"))
    second = asyncio.create_task(publishing._publish_packed(wire.channel, MESSAGES[:2], 5.0))
    await wire.written(3)
    assert list(wire.channel.confirmations) == [1, 2, 3, 4, 5]
    wire.feed(spec.Basic.Ack(2, multiple=True), spec.Basic.Nack(3), spec.Basic.Ack(5, True))
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    with pytest.raises(aiormq.exceptions.DeliveryError):
        await plain


async def test_a_message_that_cannot_be_sent_takes_no_delivery_tag(wire: Wire) -> None:
    too_long = OutgoingMessage(b"x", "k" * 256)
    with pytest.raises(ValueError, match="Routing key too long"):
        await publishing._publish_packed(wire.channel, [MESSAGES[0], too_long], 5.0)
    with pytest.raises(TypeError, match="message_id exceeds maximum length of 255 bytes"):
        await publishing._publish_packed(
            wire.channel, [OutgoingMessage(b"", "q", "", "é" * 128)], 5.0
        )
    assert (wire.channel.delivery_tag, wire.writes) == (0, [])


# Installed per channel: the fast path when it fits, else aiormq's public `basic_publish`.


async def test_the_fast_path_is_chosen_for_an_aiormq_channel_with_confirms(wire: Wire) -> None:
    publish = publishing.batch_publisher(wire.channel)
    assert publish.func is publishing._publish_packed  # type: ignore[attr-defined]


async def test_a_channel_without_raising_returns_gets_aiormqs_publish() -> None:
    wire = Wire(on_return_raises=False)
    publish = publishing.batch_publisher(wire.channel)
    assert publish.func is publishing._publish_publicly  # type: ignore[attr-defined]
    task = asyncio.create_task(publish(MESSAGES[:1], 5.0))
    await wire.written(1)
    wire.feed(
        spec.Basic.Return(312, "NO_ROUTE", "", "bookings_queue"),
        ContentHeader(0, 8, spec.Basic.Properties(message_id="m-1")),
        ContentBody(b"cinema,1"),
        spec.Basic.Ack(1),
    )
    with pytest.raises(Unroutable, match="message_id m-1"):
        await asyncio.wait_for(task, 1)
    await wire.close()


async def test_a_refused_fast_path_publishes_with_aiormq_and_says_why(
    monkeypatch: pytest.MonkeyPatch, wire: Wire
) -> None:
    monkeypatch.setattr(gate, "_version", lambda name: "7.3.0")
    monkeypatch.setattr(gate, "_reported", set())
    with capture_logs() as logs:
        publish = publishing.batch_publisher(wire.channel)
    assert publish.func is publishing._publish_publicly  # type: ignore[attr-defined]
    assert logs[0]["reason"] == "aiormq 7.3.0 is installed; it was written for 7.2.x"
    task = asyncio.create_task(publish(MESSAGES[:3], 5.0))
    await wire.written(3)
    wire.feed(spec.Basic.Ack(1), spec.Basic.Nack(2), spec.Basic.Ack(3))
    with pytest.raises(PublishError, match="message m-2"):
        await asyncio.wait_for(task, 1)


@pytest.mark.parametrize(
    ("attribute", "reason"),
    [
        ("confirmations", "aiormq's Channel has no confirmations OrderedDict"),
        ("message_id_delivery_tag", "aiormq's Channel has no message_id_delivery_tag dict"),
        ("delivery_tag", "aiormq's Channel has no delivery_tag int"),
        ("max_content_size", "aiormq's Channel has no max_content_size int"),
    ],
)
async def test_a_channel_without_what_the_fast_path_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch, wire: Wire, attribute: str, reason: str
) -> None:
    monkeypatch.setattr(gate, "_reported", set())
    monkeypatch.setattr(wire.channel, attribute, None)
    with capture_logs() as logs:
        publish = publishing.batch_publisher(wire.channel)
    assert publish.func is publishing._publish_publicly  # type: ignore[attr-defined]
    assert logs[0]["reason"] == reason


@pytest.mark.parametrize(
    "method", ["_on_confirm_frame", "_confirm_delivery", "_on_return_frame", "lock"]
)
def test_an_aiormq_confirmation_handler_gone_is_refused(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    assert importlib.metadata.version("aiormq").startswith("7.2.")
    monkeypatch.delattr(aiormq.Channel, method)
    monkeypatch.setattr(gate, "_reported", set())
    channel = aiormq.Channel.__new__(aiormq.Channel)
    for name, kind in PUBLISHING_CHANNEL:
        setattr(channel, name, kind())
    with capture_logs() as logs:
        assert not publishing._channel_usable(channel)
    assert logs[0]["reason"] == f"aiormq.Channel.{method} is gone"


def test_a_sample_of_published_messages_carries_its_publish_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publisher = Publisher("amqp://guest:guest@localhost/%2F")
    now = [1_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    batch = [OutgoingMessage(b"a", "q", headers={"kept": 1}), OutgoingMessage(b"b", "q")]
    stamped = publisher._stamp(batch)
    assert stamped[0].headers == {"kept": 1, PUBLISHED_AT_HEADER: 1_000_000}
    assert stamped[1] is batch[1]  # one a batch
    now[0] += STAMP_INTERVAL_S / 2
    assert publisher._stamp(batch) is batch  # not again so soon
    now[0] += STAMP_INTERVAL_S
    assert PUBLISHED_AT_HEADER in (publisher._stamp(batch)[0].headers or {})
