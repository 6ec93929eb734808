"""The aiormq fast path: ingest's own frame reader, direct deliveries, hand-packed acks."""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any, TypeGuard

import aiormq
import pamqp.frame
import structlog
from aiormq.abc import ChannelFrame, DeliveredMessage, URLorStr
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody
from pamqp.commands import Basic

from ingest.rabbitmq import _decoding
from ingest.rabbitmq._decoding import DELIVER as _DELIVER
from ingest.rabbitmq._decoding import UndecodableHeader
from ingest.rabbitmq._decoding import content_header as _content_header
from ingest.rabbitmq._decoding import deliver as _deliver

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
# Instance attributes of an open channel used here (aiormq sets them in `Channel.__init__`).
_CHANNEL_ATTRIBUTES = (("consumers", dict), ("write_queue", asyncio.Queue))
_CONNECTION_OF = "ingest_connection"  # set on the FrameReceiver by `install`
_reported: set[str] = set()


@dataclass(slots=True)
class Counts:
    """What the fast path did that plain aiormq would not, for every connection of the
    process: `fastpath.counts.undecodable_rejected`."""

    # Frames whose short strings are not UTF-8 (pamqp refuses them), decoded anyway.
    leniently_decoded: int = 0
    # Deliveries whose content header nothing could decode, rejected without requeue.
    undecodable_rejected: int = 0
    # Deliveries for a consumer tag the channel does not know, dropped as aiormq drops them.
    unknown_consumer: int = 0


counts = Counts()


def frame_events() -> dict[str, int]:
    """The fast path's counters by name, for /metrics (`ingest_frame_events_total`)."""
    return {
        "leniently_decoded": counts.leniently_decoded,
        "undecodable_rejected": counts.undecodable_rejected,
        "unknown_consumer": counts.unknown_consumer,
    }


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
    if _decoding.LAYOUT_PROBLEM is not None:
        return f"pamqp's Basic class has changed: {_decoding.LAYOUT_PROBLEM}"
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
            # For a frame nothing can decode: is its channel one of `deliver_directly`'s?
            setattr(receiver, _CONNECTION_OF, connection)
        else:
            _refuse("aiormq's FrameReceiver has no reader or started attribute")
        await plain_reader(receiver)

    setattr(connection, _CONNECTION_READER, reader)
    return True


async def ignore(raw: DeliveredMessage) -> None:
    """The consumer callback aiormq is given when `deliver_directly` bypasses it."""


def _channel_usable(channel: object) -> TypeGuard[aiormq.Channel]:
    if not isinstance(channel, aiormq.Channel) or not usable():
        return False
    for name, kind in _CHANNEL_ATTRIBUTES:
        if not isinstance(getattr(channel, name, None), kind):
            _refuse(f"aiormq's Channel has no {name} {kind.__name__}")
            return False
    return True


def deliver_directly(
    channel: aiormq.abc.AbstractChannel,
    deliver: Callable[[DeliveredMessage], None],
    *,
    queue: str | None = None,
    no_ack: bool = False,
    settled_here: Callable[[int], None] | None = None,
) -> bool:
    """Make `channel` hand each delivery to `deliver` from its frame reader, instead of
    starting a task per delivery (the single largest per-message cost of a Python
    consumer). False, and the channel left as it is, when not `usable()`: the caller then
    gives `basic_consume` its ordinary callback.

    As aiormq does, a delivery for a consumer tag the channel does not know is dropped. A
    delivery whose properties nothing can decode (see `get_frame`) is not handed over: it
    is rejected without requeue (unless `no_ack`), so that the queue's dead-letter exchange,
    if any, receives it as it was, logged with `queue`, its delivery tag and why, and its
    tag given to `settled_here`: an acknowledger that coalesces acks up to a low-water mark
    must count it as settled, or the mark stops below it for the rest of the channel."""
    if not _channel_usable(channel):
        return False
    read_header = getattr(channel, _CONTENT_HEADER_READER)
    read_content = channel._read_content
    consumers = channel.consumers

    async def on_deliver_frame(frame: Basic.Deliver) -> None:
        header = await read_header()
        message = await read_content(frame, header)
        if frame.consumer_tag not in consumers:
            counts.unknown_consumer += 1
            logger.debug(
                "dropping a delivery for a consumer the channel does not know",
                channel=channel.number,
                consumer_tag=_loggable(frame.consumer_tag),
                delivery_tag=frame.delivery_tag,
            )
        elif header.__class__ is UndecodableHeader:
            await _reject_undecodable(channel, frame, header, queue, no_ack)
            if settled_here is not None and frame.delivery_tag is not None:
                settled_here(frame.delivery_tag)
        else:
            deliver(message)

    setattr(channel, "_on_deliver_frame", on_deliver_frame)  # noqa: B010
    return True


async def _reject_undecodable(
    channel: aiormq.abc.AbstractChannel,
    frame: Basic.Deliver,
    header: UndecodableHeader,
    queue: str | None,
    no_ack: bool,
) -> None:
    # Requeued, or left unacknowledged until the channel closes, it would come back and
    # fail the same way, forever; nothing of it can reach the pipeline.
    counts.undecodable_rejected += 1
    logger.error(
        "could not decode a delivery's properties; "
        + (
            "dropped (no_ack: the broker has already forgotten it)"
            if no_ack
            else "rejected without requeue (the queue's dead-letter exchange, if any, "
            "receives it as it was)"
        ),
        queue=queue,
        delivery_tag=frame.delivery_tag,
        consumer_tag=_loggable(frame.consumer_tag),
        exchange=_loggable(frame.exchange),
        routing_key=_loggable(frame.routing_key),
        redelivered=frame.redelivered,
        error=header.error,
    )
    if not no_ack:
        assert frame.delivery_tag is not None
        await write_frames(channel, reject(channel.number, frame.delivery_tag, requeue=False))


def _loggable(text: str | None) -> str | None:
    # Surrogate escapes (see `_salvage`) as `\udcff`: a logger printing to a strict UTF-8
    # stream would raise, and in the channel's reader that would drop the channel.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode()


def write_frames(channel: aiormq.abc.AbstractChannel, payload: bytes) -> Awaitable[None]:
    """Send frames packed by `ack`, `reject` and `nack`: queued for the connection's writer
    as one write when `usable()`; else each sent by aiormq's own `basic_ack`,
    `basic_reject` or `basic_nack`, in order."""
    return frame_writer(channel)(payload)


def frame_writer(channel: aiormq.abc.AbstractChannel) -> Callable[[bytes], Awaitable[None]]:
    """`write_frames` for one channel, with the `usable()` check made once (an
    acknowledger writes many times)."""
    if _channel_usable(channel):
        queue = channel.write_queue

        def write(payload: bytes) -> Awaitable[None]:
            return queue.put(ChannelFrame(payload=payload, should_close=False))

        return write
    return functools.partial(_settle_publicly, channel)


async def _settle_publicly(channel: aiormq.abc.AbstractChannel, payload: bytes) -> None:
    for *_, method, tag, flags, _end in _ACK_FRAME.iter_unpack(payload):
        if method == _ACK:
            await channel.basic_ack(tag, multiple=bool(flags))
        elif method == _REJECT:
            await channel.basic_reject(tag, requeue=bool(flags))
        elif method == _NACK:
            await channel.basic_nack(tag, multiple=bool(flags & 1), requeue=bool(flags & 2))
        else:
            raise ValueError(f"not a frame packed by ack, reject or nack: method {method}")


# The reader. aiormq's `FrameReceiver.get_frame` reads each frame in three `readexactly`
# calls through a `BytesIO` under a lock, then decodes it with pamqp's generic `unmarshal`;
# every delivery is at least three frames, and this was the largest single cost of a
# consumer. This one returns exactly what aiormq's does (bytes consumed, channel, pamqp
# frame) and raises the same exceptions. A delivery's three frames skip pamqp's generic
# decoder (a header with a headers table or a timestamp still goes through it); everything
# else, and anything malformed, is pamqp's. Where pamqp refuses a frame that plain aiormq
# would die on (the connection drops, the broker redelivers, forever), `_salvage` decodes
# what it can instead.

_HEADER = struct.Struct(">BHI")
_METHOD, _CONTENT_HEADER, _BODY, _FRAME_END = 1, 2, 3, 0xCE


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
    except Exception as error:  # not only PAMQPException: RecursionError, for one
        return _salvage(receiver, frame_type, channel, rest, error)


# What pamqp refuses to decode: plain aiormq's reader would die on it, the connection drop
# and the broker deliver the same message again, forever (see `_decoding`).


def _salvage(
    receiver: Any, frame_type: int, channel: int, rest: bytes, error: BaseException
) -> tuple[int, int, Any]:
    """The frame pamqp could not decode (`rest` with its frame-end octet), decoded
    leniently; an `UndecodableHeader` for a content header on a channel of
    `deliver_directly`; else InvalidFrameError, as aiormq's reader raises."""
    if rest[-1] != _FRAME_END:  # the stream is out of step: only a new connection helps
        raise InvalidFrameError(str(error)) from error
    frame: Any = None
    try:
        if frame_type == _METHOD:
            frame = _decoding.decode_method(rest[:-1])
        elif frame_type == _CONTENT_HEADER:
            frame = _decoding.decode_content_header(rest[:-1])
    except Exception:  # whatever hostile bytes make a decoder raise: undecodable
        frame = None
    if frame is not None:
        counts.leniently_decoded += 1
        logger.warning(
            "decoded a frame whose strings are not UTF-8 with surrogate escapes",
            channel=channel,
            frame=frame.name,
            error=str(error),
        )
        return len(rest) + 7, channel, frame
    if frame_type == _CONTENT_HEADER and len(rest) > 12 and _delivers_directly(receiver, channel):
        return len(rest) + 7, channel, UndecodableHeader(rest, error)
    raise InvalidFrameError(str(error)) from error


def _delivers_directly(receiver: Any, number: int) -> bool:
    # Through aiormq's table of the connection's channels; one gone is a plain "no".
    connection = getattr(receiver, _CONNECTION_OF, None)
    channel = getattr(connection, "channels", {}).get(number)
    return "_on_deliver_frame" in getattr(channel, "__dict__", ())


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
