"""The aiormq fast path: its reader and frames match aiormq's and pamqp's own, it decodes
what pamqp refuses (strings that are not UTF-8) where aiormq would drop the connection, it
applies to the connection it is installed on only, and it refuses versions it was not
written for."""

from __future__ import annotations

import asyncio
import importlib.metadata
import struct
from datetime import UTC, datetime
from typing import Any

import aiormq
import pamqp.frame
import pytest
from aiormq.abc import DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat
from structlog.testing import capture_logs

from ingest.rabbitmq import _wire as wire
from ingest.rabbitmq._aiormq import decoding, delivery, events, gate, internals, reader

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
    stream_reader = asyncio.StreamReader()
    stream_reader.feed_data(data)
    stream_reader.feed_eof()
    return stream_reader


async def read_all(read: Any, data: bytes) -> list[tuple[int, int, Any]]:
    receiver = FrameReceiver(stream(data))
    frames = []
    for _ in FRAMES:
        frames.append(await read(receiver))
    return frames


async def test_the_fast_reader_returns_what_aiormqs_returns() -> None:
    data = b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in FRAMES)
    theirs = await read_all(AIORMQ_GET_FRAME, data)
    ours = await read_all(reader.get_frame, data)
    assert [(n, c, type(f)) for n, c, f in ours] == [(n, c, type(f)) for n, c, f in theirs]
    assert [pamqp.frame.marshal(f, c) for _, c, f in ours] == [
        pamqp.frame.marshal(f, c) for _, c, f in theirs
    ]
    assert [fields(f) for _, _, f in ours] == [fields(f) for _, _, f in theirs]


async def test_a_malformed_delivery_is_decoded_as_pamqp_decodes_it() -> None:
    good = pamqp.frame.marshal(spec.Basic.Deliver("ctag", 7, False, "", "q"), 1)
    # The routing key claims more bytes than the frame holds: pamqp's lenient decoding.
    bad = good[:-3] + b"\x09" + good[-2:]
    [(_, _, ours)] = [await reader.get_frame(FrameReceiver(stream(bad)))]
    [(_, _, theirs)] = [await AIORMQ_GET_FRAME(FrameReceiver(stream(bad)))]
    assert fields(ours) == fields(theirs)


async def test_a_truncated_stream_is_a_connection_error() -> None:
    data = pamqp.frame.marshal(ContentBody(b"cinema,1"), 1)[:-3]
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await reader.get_frame(FrameReceiver(stream(data)))


@pytest.mark.parametrize(
    ("packed", "method"),
    [
        (wire.ack(7, 2**40, multiple=True), spec.Basic.Ack(2**40, True)),
        (wire.ack(1, 5), spec.Basic.Ack(5, False)),
        (wire.reject(3, 9, requeue=True), spec.Basic.Reject(9, True)),
        (wire.nack(2, 4, multiple=True, requeue=False), spec.Basic.Nack(4, True, False)),
    ],
    ids=["ack-multiple", "ack", "reject-requeue", "nack"],
)
def test_hand_packed_frames_match_pamqp(packed: bytes, method: Any) -> None:
    channel = packed[2] if packed[1] == 0 else packed[1] << 8 | packed[2]
    assert packed == pamqp.frame.marshal(method, channel)


def test_the_installed_aiormq_and_pamqp_are_accepted() -> None:
    assert gate.usable()


async def test_install_changes_only_the_connection_it_is_given() -> None:
    ours = aiormq.Connection("amqp://127.0.0.1/")
    theirs = aiormq.Connection("amqp://127.0.0.1/")
    assert reader.install(ours)
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
    monkeypatch.setattr(gate, "_version", fake_versions(**versions))
    monkeypatch.setattr(gate, "_reported", set())
    connection = aiormq.Connection("amqp://127.0.0.1/")
    # An unopened channel: a refused fast path touches nothing of it.
    channel = aiormq.Channel.__new__(aiormq.Channel)
    with capture_logs() as logs:
        assert not reader.install(connection)
        assert not delivery.deliver_directly(channel, deliver)
        assert not gate.usable()
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
    monkeypatch.setattr(gate, "_reported", set())
    with capture_logs() as logs:
        assert not gate.usable()
    assert logs[0]["reason"].endswith(f"{owner.__name__}.{attribute} is gone")


@pytest.mark.parametrize(
    "internal", internals.ON_CLASSES, ids=lambda internal: f"{internal.owner}.{internal.name}"
)
def test_every_internal_of_the_table_is_checked_by_the_version_gate(
    monkeypatch: pytest.MonkeyPatch, internal: internals.Internal
) -> None:
    assert gate.usable()
    owner: Any = aiormq
    for name in internal.owner.split("."):
        owner = getattr(owner, name)
    # From every class that defines it (`create_future` is `Base`'s, and `AbstractBase`'s).
    for kind in owner.__mro__:
        if internal.name in vars(kind):
            monkeypatch.delattr(kind, internal.name)
    monkeypatch.setattr(gate, "_reported", set())
    with capture_logs() as logs:
        assert not gate.usable()
    assert logs[0]["reason"] == f"aiormq.{internal.owner}.{internal.name} is gone"


def test_the_table_says_what_each_internal_is_for_and_who_uses_it() -> None:
    modules = {"reader", "delivery", "publishing"}
    for internal in internals.INTERNALS:
        assert internal.why, internal
        assert set(internal.used_by) <= modules, internal
    used = {user for internal in internals.INTERNALS for user in internal.used_by}
    assert used == modules


# Frames pamqp refuses: strings that are not UTF-8 (decoded with surrogate escapes), and
# properties nothing can decode (handed to a direct-delivery channel as such).

LENIENT_FRAMES: list[tuple[int, Any]] = [
    *FRAMES,
    (1, spec.Basic.Return(312, "NO_ROUTE", "amq.direct", "nowhere")),
    (1, spec.Basic.Nack(5, multiple=True, requeue=False)),
    (0, spec.Connection.Close(320, "CONNECTION_FORCED - bye", 0, 0)),
    (
        1,
        spec.Queue.Declare(
            queue="q",
            durable=True,
            auto_delete=True,
            arguments={"x-args": {"nested": [1, "two", {"deep": True}], "n": None}},
        ),
    ),
    (1, spec.Basic.Consume(queue="q", consumer_tag="c", exclusive=True, arguments={"a": 1})),
    (
        1,
        ContentHeader(
            0,
            5,
            spec.Basic.Properties(
                headers={"k": "v", "t": {"a": [1, 2.5, "été"]}},
                timestamp=datetime(2026, 11, 22, tzinfo=UTC),
                message_id="m",
            ),
        ),
    ),
]


def payload_of(frame: Any, channel: int = 1) -> bytes:
    """A frame's payload, without the frame header and the frame-end octet."""
    return pamqp.frame.marshal(frame, channel)[7:-1]


def lenient(frame: Any) -> Any:
    payload = payload_of(frame)
    if isinstance(frame, ContentHeader):
        return decoding.decode_content_header(payload)
    return decoding.decode_method(payload)


@pytest.mark.parametrize(
    "frame",
    [frame for _, frame in LENIENT_FRAMES if not isinstance(frame, ContentBody | Heartbeat)],
    ids=lambda frame: frame.name,
)
def test_the_lenient_decoders_return_what_pamqp_returns_where_pamqp_decodes(frame: Any) -> None:
    _, _, theirs = pamqp.frame.unmarshal(pamqp.frame.marshal(frame, 1))
    assert fields(lenient(frame)) == fields(theirs)


def with_bytes(frame: Any, placeholder: str, raw: bytes) -> bytes:
    """The marshalled frame with `placeholder` (once, same length) replaced by `raw`."""
    data = pamqp.frame.marshal(frame, 1)
    assert data.count(placeholder.encode()) == 1
    assert len(placeholder) == len(raw)
    return data.replace(placeholder.encode(), raw)


NOT_UTF8 = [
    pytest.param(
        spec.Basic.Deliver("ctag", 7, False, "", "bookings.Z"),
        ("routing_key",),
        id="deliver-routing-key",
    ),
    pytest.param(
        spec.Basic.Deliver("ctag", 7, False, "ex-Z", "bookings"), ("exchange",), id="exchange"
    ),
    pytest.param(
        ContentHeader(0, 8, spec.Basic.Properties(message_id="m-Z", delivery_mode=2)),
        ("properties", "message_id"),
        id="message-id",
    ),
    pytest.param(
        ContentHeader(0, 8, spec.Basic.Properties(content_type="text/Z", app_id="a")),
        ("properties", "content_type"),
        id="content-type",
    ),
    pytest.param(
        ContentHeader(0, 8, spec.Basic.Properties(headers={"x-Z": "v"}, message_id="m")),
        ("properties", "headers", "x-\udcff"),
        id="header-name",
    ),
    pytest.param(
        ContentHeader(0, 8, spec.Basic.Properties(headers={"t": {"x-Z": 1}})),
        ("properties", "headers", "t", "x-\udcff"),
        id="nested-header-name",
    ),
    pytest.param(
        ContentHeader(0, 8, spec.Basic.Properties(headers={"a": [{"x-Z": 1}]})),
        ("properties", "headers", "a", 0, "x-\udcff"),
        id="header-name-in-an-array",
    ),
    pytest.param(
        ContentHeader(
            0,
            8,
            spec.Basic.Properties(
                correlation_id="c-Z", timestamp=datetime(2026, 1, 1, tzinfo=UTC), headers={}
            ),
        ),
        ("properties", "correlation_id"),
        id="correlation-id-with-a-timestamp",
    ),
]


def dig(frame: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        frame = frame[step] if isinstance(frame, dict | list) else getattr(frame, str(step))
    return frame


@pytest.mark.parametrize(("frame", "path"), NOT_UTF8)
async def test_strings_that_are_not_utf8_decode_with_surrogate_escapes_where_pamqp_raises(
    frame: Any, path: tuple[str | int, ...]
) -> None:
    data = with_bytes(frame, "Z", b"\xff")
    with pytest.raises(UnmarshalingException, match="utf-8"):
        pamqp.frame.unmarshal(data)
    with pytest.raises(InvalidFrameError):
        await AIORMQ_GET_FRAME(FrameReceiver(stream(data)))
    _, channel, ours = await reader.get_frame(FrameReceiver(stream(data)))
    assert channel == 1
    found = dig(ours, path)
    if path[-1] == "x-\udcff":  # a header name: its table holds it, escaped
        assert list(dig(ours, path[:-1])) == ["x-\udcff"]
    else:
        assert found.encode("utf-8", "surrogateescape") == dig(frame, path).encode().replace(
            b"Z", b"\xff"
        )
        with pytest.raises(UnicodeEncodeError):
            found.encode()
    # Everything else as pamqp decodes it from the same frame, UTF-8 throughout.
    _, _, theirs = pamqp.frame.unmarshal(with_bytes(frame, "Z", b"_"))
    assert repr(fields(ours)).replace("\\udcff", "_") == repr(fields(theirs))


def out_of_range_timestamp() -> bytes:
    """A content header whose timestamp is in microseconds: pamqp, reading milliseconds,
    finds the year 55 000 and raises."""
    header = ContentHeader(0, 8, spec.Basic.Properties(timestamp=datetime(2026, 1, 1, tzinfo=UTC)))
    data = pamqp.frame.marshal(header, 1)
    seconds = struct.pack(">Q", int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()))
    return data.replace(seconds, struct.pack(">Q", 1_700_000_000_000_000))


def deeply_nested_table() -> bytes:
    """A headers table nested deeper than Python recurses: pamqp raises RecursionError."""
    table = b"\x00\x00\x00\x00"
    for _ in range(3000):
        inner = b"\x01kF" + table
        table = struct.pack(">I", len(inner)) + inner
    flags = struct.pack(">H", spec.Basic.Properties.flags["headers"])
    payload = struct.pack(">HHQ", 60, 0, 8) + flags + table
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


UNDECODABLE = [
    pytest.param(out_of_range_timestamp(), "year 55", id="timestamp-out-of-range"),
    pytest.param(
        with_bytes(ContentHeader(0, 8, spec.Basic.Properties(headers={"k": 1})), "kb", b"k?"),
        "Unknown type",
        id="unknown-field-type",
    ),
    pytest.param(deeply_nested_table(), "RecursionError", id="nested-too-deep"),
]


class FakeConnection:
    """What the fast path's reader looks at of the connection it was installed on."""

    def __init__(self, **channels: object) -> None:
        self.channels = {int(number[1:]): channel for number, channel in channels.items()}


class DirectChannel:
    def __init__(self) -> None:
        self._on_deliver_frame = deliver


def receiver_of(data: bytes, connection: FakeConnection | None) -> FrameReceiver:
    receiver = FrameReceiver(stream(data))
    setattr(receiver, reader._CONNECTION_OF, connection)
    return receiver


@pytest.mark.parametrize(("data", "error"), UNDECODABLE)
async def test_a_header_nothing_decodes_is_marked_undecodable_on_a_direct_channel(
    data: bytes, error: str
) -> None:
    receiver = receiver_of(data, FakeConnection(c1=DirectChannel()))
    size, channel, header = await reader.get_frame(receiver)
    assert (size, channel) == (len(data), 1)
    assert isinstance(header, decoding.UndecodableHeader)
    assert (header.class_id, header.body_size) == (60, 8)
    assert header.properties == spec.Basic.Properties()
    assert error in header.error


@pytest.mark.parametrize(("data", "error"), UNDECODABLE)
async def test_a_header_nothing_decodes_elsewhere_fails_as_in_aiormq(
    data: bytes, error: str
) -> None:
    # A channel of plain aiormq (a basic_get, say) would take the marker for a message.
    plain = FakeConnection(c1=object())
    for receiver in (receiver_of(data, plain), FrameReceiver(stream(data))):
        with pytest.raises(InvalidFrameError):
            await reader.get_frame(receiver)


async def test_a_frame_with_a_bad_end_octet_fails_even_on_a_direct_channel() -> None:
    data = with_bytes(ContentHeader(0, 8, spec.Basic.Properties(message_id="?")), "?", b"\xff")
    receiver = receiver_of(data[:-1] + b"\x00", FakeConnection(c1=DirectChannel()))
    with pytest.raises(InvalidFrameError, match="Last byte"):
        await reader.get_frame(receiver)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame_type=st.sampled_from([1, 2]),
    payload=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda prefix, rest: prefix + rest,
            st.sampled_from(
                [
                    payload_of(spec.Basic.Deliver("c", 1, False, "e", "r"))[:4],
                    payload_of(ContentHeader(0, 8, spec.Basic.Properties(headers={"k": 1})))[:14],
                ]
            ),
            st.binary(max_size=200),
        ),
    ),
)
async def test_hostile_frames_decode_or_raise_invalid_frame_and_never_hang(
    frame_type: int, payload: bytes
) -> None:
    data = struct.pack(">BHI", frame_type, 1, len(payload)) + payload + b"\xce"
    receiver = receiver_of(data, FakeConnection(c1=DirectChannel()))
    try:
        size, _, _ = await asyncio.wait_for(reader.get_frame(receiver), 1)
    except InvalidFrameError:
        return
    assert size == len(data)


# Direct deliveries, read by aiormq's own content readers from the channel's frame queue.


def open_channel(consumers: dict[str, Any]) -> aiormq.Channel:
    """An aiormq channel as far as a delivery needs: its frame queue, consumers and the
    connection's write queue (no connection: nothing is sent)."""
    channel = aiormq.Channel.__new__(aiormq.Channel)
    channel.number = 1
    channel.frames = asyncio.Queue()
    channel.consumers = consumers
    channel.write_queue = asyncio.Queue()
    return channel


async def delivered_from(
    channel: aiormq.Channel, frame: spec.Basic.Deliver, header: ContentHeader, body: bytes
) -> None:
    for part in (header, ContentBody(body)):
        channel.frames.put_nowait((0, part))
    await channel._on_deliver_frame(frame)


async def test_a_delivery_for_an_unknown_consumer_is_dropped_and_counted() -> None:
    got: list[DeliveredMessage] = []
    channel = open_channel({"ctag": delivery.ignore})
    assert delivery.deliver_directly(channel, got.append)
    before = events.counts.unknown_consumer
    header = ContentHeader(0, 2, spec.Basic.Properties())
    with capture_logs() as logs:
        await delivered_from(channel, spec.Basic.Deliver("gone", 1, False, "", "q"), header, b"no")
        await delivered_from(channel, spec.Basic.Deliver("ctag", 2, False, "", "q"), header, b"ok")
    assert [raw.body for raw in got] == [b"ok"]
    assert events.counts.unknown_consumer == before + 1
    assert logs == [
        {
            "event": "dropping a delivery for a consumer the channel does not know",
            "channel": 1,
            "consumer_tag": "gone",
            "delivery_tag": 1,
            "log_level": "debug",
        }
    ]
    assert channel.frames.empty()  # its content was read all the same


@pytest.mark.parametrize("no_ack", [False, True], ids=["ack", "no-ack"])
async def test_an_undecodable_delivery_is_rejected_without_requeue_and_logged(
    no_ack: bool,
) -> None:
    got: list[DeliveredMessage] = []
    settled: list[int] = []
    channel = open_channel({"ctag": delivery.ignore})
    assert delivery.deliver_directly(
        channel, got.append, queue="bookings", no_ack=no_ack, settled_here=settled.append
    )
    before = events.counts.undecodable_rejected
    header = decoding.UndecodableHeader(payload_of(ContentHeader(0, 3)), ValueError("year 55840"))
    deliver = spec.Basic.Deliver("ctag", 9, True, "", "bookings.\udcff")
    with capture_logs() as logs:
        await delivered_from(channel, deliver, header, b"bad")
        await delivered_from(channel, spec.Basic.Deliver("ctag", 10), ContentHeader(), b"")
    assert [raw.delivery.delivery_tag for raw in got] == [10]
    assert events.counts.undecodable_rejected == before + 1
    assert settled == [9]  # so that an acknowledger's low-water mark can pass it
    [line] = logs
    assert line["log_level"] == "error"
    assert (line["queue"], line["delivery_tag"], line["error"]) == (
        "bookings",
        9,
        "ValueError: year 55840",
    )
    assert line["routing_key"] == "bookings.\\udcff"  # printable by any logger
    if no_ack:
        assert channel.write_queue.empty()
    else:
        written = channel.write_queue.get_nowait()
        assert written.payload == pamqp.frame.marshal(spec.Basic.Reject(9, requeue=False), 1)


# Acknowledgement frames written: in one write, or through aiormq's public calls.

PACKED = [
    wire.ack(1, 5, multiple=True),
    wire.reject(1, 6, requeue=False),
    wire.nack(1, 7, multiple=False, requeue=True),
    wire.reject(1, 8, requeue=True),
    wire.ack(1, 9),
]


async def test_write_frames_queues_the_packed_frames_as_one_write() -> None:
    channel = open_channel({})
    await delivery.write_frames(channel, b"".join(PACKED))
    written = channel.write_queue.get_nowait()
    assert (written.payload, written.should_close) == (b"".join(PACKED), False)
    assert channel.write_queue.empty()


class PublicCalls:
    """A channel recording the acknowledgement methods of aiormq's public API."""

    number = 1

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.sent.append(spec.Basic.Ack(delivery_tag, multiple))

    async def basic_reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        self.sent.append(spec.Basic.Reject(delivery_tag, requeue))

    async def basic_nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        self.sent.append(spec.Basic.Nack(delivery_tag, multiple, requeue))


@pytest.mark.parametrize("refused", [False, True], ids=["not-aiormq", "version-refused"])
async def test_without_the_fast_path_write_frames_makes_aiormqs_public_calls(
    monkeypatch: pytest.MonkeyPatch, refused: bool
) -> None:
    if refused:
        monkeypatch.setattr(gate, "_version", fake_versions(aiormq="7.3.0"))
        monkeypatch.setattr(gate, "_reported", set())
    channel = PublicCalls()
    await delivery.write_frames(channel, b"".join(PACKED))  # type: ignore[arg-type]
    # The frames those calls send are the ones packed, in order.
    assert b"".join(pamqp.frame.marshal(frame, 1) for frame in channel.sent) == b"".join(PACKED)


@pytest.mark.parametrize("attribute", ["consumers", "write_queue"])
async def test_a_channel_without_what_the_fast_path_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch, attribute: str
) -> None:
    monkeypatch.setattr(gate, "_reported", set())
    channel = open_channel({})
    delattr(channel, attribute)
    with capture_logs() as logs:
        assert not delivery.deliver_directly(channel, deliver)
    assert "_on_deliver_frame" not in vars(channel)
    assert logs[0]["reason"].startswith(f"aiormq's Channel has no {attribute}")
