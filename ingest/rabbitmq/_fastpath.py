"""The aiormq fast path: ingest's own frame reader, direct deliveries, hand-packed acks."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import re
import struct
from collections.abc import Callable
from types import MethodType
from typing import Any

import aiormq
import pamqp.frame
import structlog
from aiormq.abc import DeliveredMessage, URLorStr
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

logger = structlog.get_logger("ingest.rabbitmq")

# Written against aiormq 7.2 and pamqp 4 (tested with aiormq 7.2.4 and pamqp 4.0.1): aiormq
# 7.0 and 7.1 raise other exceptions from their reader, and aiormq 7.2 requires pamqp 4.
AIORMQ_SERIES = (7, 2)
PAMQP_SERIES = (4,)

# The aiormq internals used here, as (object under `aiormq`, attribute); looked up when
# checked, so that one gone is a refusal rather than an import error.
_CONNECTION_READER = "_Connection__reader"  # the one method the FrameReceiver is handed to
_CONTENT_HEADER_READER = "_Channel__get_content_header"
_INTERNALS = (
    ("Connection", _CONNECTION_READER),
    ("connection.FrameReceiver", "get_frame"),
    ("Channel", _CONTENT_HEADER_READER),
    ("Channel", "_read_content"),
    ("Channel", "_on_deliver_frame"),
)
_reported: set[str] = set()


@functools.cache
def _version(distribution: str) -> str:
    """The installed version of `distribution`, read once (tests replace this function)."""
    return importlib.metadata.version(distribution)


def _problem() -> str | None:
    """Why the fast path does not fit the installed aiormq and pamqp, or None."""
    for distribution, series in (("aiormq", AIORMQ_SERIES), ("pamqp", PAMQP_SERIES)):
        try:
            version = _version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{distribution}'s version is unknown (no package metadata)"
        parts = re.match(r"(\d+)\.(\d+)", version)
        found = tuple(int(part) for part in parts.groups()) if parts else ()
        if found[: len(series)] != series:
            expected = ".".join(map(str, series))
            return f"{distribution} {version} is installed; it was written for {expected}.x"
    if _LAYOUT_PROBLEM is not None:
        return f"pamqp's Basic class has changed: {_LAYOUT_PROBLEM}"
    for path, attribute in _INTERNALS:
        owner: Any = aiormq
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if not callable(getattr(owner, attribute, None)):
            return f"aiormq.{path}.{attribute} is gone"
    return None


def usable() -> bool:
    """Whether the installed aiormq and pamqp are those this was written for. If not, says
    why in one log line (once per reason) and the connector uses plain aiormq."""
    problem = _problem()
    if problem is None:
        return True
    _refuse(problem)
    return False


def _refuse(reason: str) -> None:
    if reason not in _reported:
        _reported.add(reason)
        logger.warning("aiormq fast path not used; plain aiormq instead", reason=reason)


async def open_fast_connection(url: URLorStr, **kwargs: Any) -> aiormq.Connection:
    """`await aiormq.connect(url, **kwargs)`, with `install` applied to that connection."""
    connection = aiormq.Connection(url, **kwargs)
    install(connection)
    await connection.connect()
    return connection


def install(connection: aiormq.Connection) -> bool:
    """Read this connection's frames with `get_frame`; call it before `connect()`. Only this
    connection: other aiormq connections in the process (users', aio-pika's) keep aiormq's
    own reader. False, and the connection left as it is, when not `usable()`."""
    if not isinstance(connection, aiormq.Connection) or not usable():
        return False
    # aiormq makes the connection's FrameReceiver inside connect() and hands it to this
    # method only; an instance attribute shadows the method for this connection alone.
    plain_reader = getattr(connection, _CONNECTION_READER)

    async def reader(receiver: Any) -> None:
        if hasattr(receiver, "reader") and hasattr(receiver, "started"):
            receiver.get_frame = MethodType(get_frame, receiver)
        else:
            _refuse("aiormq's FrameReceiver has no reader or started attribute")
        await plain_reader(receiver)

    setattr(connection, _CONNECTION_READER, reader)
    return True


async def ignore(raw: DeliveredMessage) -> None:
    """The consumer callback aiormq is given when `deliver_directly` bypasses it."""


def deliver_directly(
    channel: aiormq.abc.AbstractChannel, deliver: Callable[[DeliveredMessage], None]
) -> bool:
    """Make `channel` hand each delivery to `deliver` from its frame reader, instead of
    starting a task per delivery (the single largest per-message cost of a Python
    consumer). False, and the channel left as it is, when not `usable()`: the caller then
    gives `basic_consume` its ordinary callback."""
    if not isinstance(channel, aiormq.Channel) or not usable():
        return False
    read_header = getattr(channel, _CONTENT_HEADER_READER)
    read_content = channel._read_content

    async def on_deliver_frame(frame: Basic.Deliver) -> None:
        header = await read_header()
        deliver(await read_content(frame, header))

    setattr(channel, "_on_deliver_frame", on_deliver_frame)  # noqa: B010
    return True


# The reader. aiormq's `FrameReceiver.get_frame` reads each frame in three `readexactly`
# calls through a `BytesIO` under a lock, then decodes it with pamqp's generic `unmarshal`;
# every delivery is at least three frames, and this was the largest single cost of a
# consumer. This one returns exactly what aiormq's does (bytes consumed, channel, pamqp
# frame) and raises the same exceptions. A delivery's three frames skip pamqp's generic
# decoder (a header with a headers table or a timestamp still goes through it); everything
# else, and anything malformed, is pamqp's.

_HEADER = struct.Struct(">BHI")
_METHOD, _CONTENT_HEADER, _BODY, _FRAME_END = 1, 2, 3, 0xCE
_LONGLONG = struct.Struct(">Q")
_HEADER_FIELDS = struct.Struct(">HHQH")  # class id, weight, body size, property flags
_Property = tuple[str, int, bool, Any]


def _layout() -> tuple[bytes, int, tuple[_Property, ...]]:
    """What the decoders need from pamqp's Basic class: the basic.deliver method index, the
    property flags only pamqp decodes, and every property in wire order with its flag,
    whether it is an octet (else a short string) and its value when absent."""
    flags = Basic.Properties.flags
    kinds = {name: getattr(Basic.Properties, f"_{name}") for name in Basic.Properties.__slots__}
    simple = {kind for name, kind in kinds.items() if name not in ("headers", "timestamp")}
    if kinds["headers"] != "table" or kinds["timestamp"] != "timestamp":
        raise ValueError(f"headers or timestamp changed type: {kinds}")
    if not simple <= {"octet", "shortstr"}:
        raise ValueError(f"a property of a type decoded only by pamqp: {kinds}")
    absent = Basic.Properties()
    properties = tuple(
        (name, flags[name], kind == "octet", getattr(absent, name)) for name, kind in kinds.items()
    )
    # 1: a second property flag word follows.
    only_pamqp = flags["headers"] | flags["timestamp"] | 1
    return struct.pack(">I", Basic.Deliver.index), only_pamqp, properties


try:
    _DELIVER, _PAMQP_ONLY, _PROPERTIES = _layout()
    _LAYOUT_PROBLEM: str | None = None
except Exception as error:  # whatever moved, refuse the fast path; never fail the import
    _DELIVER, _PAMQP_ONLY, _PROPERTIES = b"", 0, ()
    _LAYOUT_PROBLEM = repr(error)


async def get_frame(receiver: Any) -> tuple[int, int, Any]:
    """A drop-in for `aiormq.connection.FrameReceiver.get_frame`."""
    reader: asyncio.StreamReader = receiver.reader
    if reader.at_eof():
        del receiver.reader
        raise StopAsyncIteration
    try:
        header = await reader.readexactly(7)
        if not receiver.started:
            if header.startswith(b"AMQP"):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            receiver.started = True
        frame_type, channel, size = _HEADER.unpack(header)
        rest = await reader.readexactly(size + 1)
    except asyncio.IncompleteReadError as error:
        raise AMQPConnectionError(
            f"Server connection unexpectedly closed. Read {len(error.partial)} bytes but "
            f"{error.expected} bytes expected"
        ) from error
    except ConnectionError as error:
        raise AMQPConnectionError(f"Server connection error: {error!r}") from error
    except OSError as error:
        raise AMQPConnectionError(f"Server communication error: {error!r}") from error
    if rest[-1] == _FRAME_END:
        if frame_type == _BODY:
            return size + 8, channel, ContentBody(rest[:-1])
        try:
            if frame_type == _METHOD and rest.startswith(_DELIVER):
                return size + 8, channel, _deliver(rest)
            if frame_type == _CONTENT_HEADER:
                content_header = _content_header(rest)
                if content_header is not None:
                    return size + 8, channel, content_header
        except (ValueError, IndexError, struct.error):
            pass  # pamqp below decodes it again and says what is wrong
    try:
        return pamqp.frame.unmarshal(header + rest)
    except PAMQPException as error:
        raise InvalidFrameError(str(error)) from error


def _deliver(payload: bytes) -> Basic.Deliver:
    """A `basic.deliver` method frame (with its frame-end octet), as pamqp would decode
    it, without its generic decoder and argument validation: the server sent it."""
    offset = 5 + payload[4]
    consumer_tag = payload[5:offset].decode()
    (delivery_tag,) = _LONGLONG.unpack_from(payload, offset)
    redelivered = bool(payload[offset + 8] & 1)
    offset += 9
    end = offset + 1 + payload[offset]
    exchange = payload[offset + 1 : end].decode()
    routing_key = payload[end + 1 : end + 1 + payload[end]].decode()
    if end + 1 + payload[end] != len(payload) - 1:
        raise ValueError("basic.deliver has trailing or missing bytes")
    deliver = Basic.Deliver.__new__(Basic.Deliver)
    deliver.consumer_tag = consumer_tag
    deliver.delivery_tag = delivery_tag
    deliver.redelivered = redelivered
    deliver.exchange = exchange
    deliver.routing_key = routing_key
    return deliver


def _content_header(payload: bytes) -> ContentHeader | None:
    """A content header frame (with its frame-end octet), as pamqp would decode it; None
    when it holds what only pamqp decodes (headers, a timestamp, more property flags)."""
    class_id, weight, body_size, flags = _HEADER_FIELDS.unpack_from(payload)
    if flags & _PAMQP_ONLY:
        return None
    properties = Basic.Properties.__new__(Basic.Properties)
    offset = _HEADER_FIELDS.size
    for name, flag, is_octet, absent in _PROPERTIES:
        if not flags & flag:
            setattr(properties, name, absent)
        elif is_octet:
            setattr(properties, name, payload[offset])
            offset += 1
        else:
            end = offset + 1 + payload[offset]
            setattr(properties, name, payload[offset + 1 : end].decode())
            offset = end
    if offset != len(payload) - 1:
        raise ValueError("content header has trailing or missing bytes")
    content_header = ContentHeader.__new__(ContentHeader)
    content_header.class_id = class_id
    content_header.weight = weight
    content_header.body_size = body_size
    content_header.properties = properties
    return content_header


# Acknowledgement frames, packed by hand so that many go in one write and none is built
# through pamqp. A basic.ack / basic.reject / basic.nack method frame is 21 bytes: frame
# type 1, channel, payload size 13, class 60, method id, the delivery tag and one byte of
# flags, then 0xCE. Only the AMQP 0-9-1 wire format, no library internals.

_ACK_FRAME = struct.Struct(">BHIHHQBB")
_ACK, _REJECT, _NACK = 80, 90, 120


def ack(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return _ACK_FRAME.pack(1, channel, 13, 60, _ACK, delivery_tag, multiple, _FRAME_END)


def reject(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return _ACK_FRAME.pack(1, channel, 13, 60, _REJECT, delivery_tag, requeue, _FRAME_END)


def nack(channel: int, delivery_tag: int, *, multiple: bool, requeue: bool) -> bytes:
    flags = int(multiple) | int(requeue) << 1
    return _ACK_FRAME.pack(1, channel, 13, 60, _NACK, delivery_tag, flags, _FRAME_END)
