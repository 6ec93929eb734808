"""The frame reader: a drop-in for aiormq's `FrameReceiver.get_frame`, installed on one
connection at a time, that decodes a delivery's frames by hand and what pamqp refuses
leniently."""

from __future__ import annotations

import asyncio
import struct
from types import MethodType
from typing import Any

import aiormq
import pamqp.frame
import structlog
from aiormq.abc import URLorStr
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody

from ingest.rabbitmq._aiormq import decoding, events
from ingest.rabbitmq._aiormq.decoding import DELIVER as _DELIVER
from ingest.rabbitmq._aiormq.decoding import UndecodableHeader
from ingest.rabbitmq._aiormq.decoding import content_header as _content_header
from ingest.rabbitmq._aiormq.decoding import deliver as _deliver
from ingest.rabbitmq._aiormq.gate import refuse, usable
from ingest.rabbitmq._aiormq.internals import CONNECTION_READER, ON_DELIVER_FRAME
from ingest.rabbitmq._wire import BODY, CONTENT_HEADER, FRAME_END, FRAME_HEADER, METHOD

logger = structlog.get_logger("ingest.rabbitmq")

_CONNECTION_OF = "ingest_connection"  # set on the FrameReceiver by `install`
# Bound here rather than called as `FRAME_HEADER.unpack(...)`: on a name that an import
# binds, CPython 3.11 compiles a method call to LOAD_ATTR, making a bound method per frame.
_unpack_frame_header = FRAME_HEADER.unpack


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
    plain_reader = getattr(connection, CONNECTION_READER)

    async def reader(receiver: Any) -> None:
        if hasattr(receiver, "reader") and hasattr(receiver, "started"):
            receiver.get_frame = MethodType(get_frame, receiver)
            # For a frame nothing can decode: is its channel one of `deliver_directly`'s?
            setattr(receiver, _CONNECTION_OF, connection)
        else:
            refuse("aiormq's FrameReceiver has no reader or started attribute")
        await plain_reader(receiver)

    setattr(connection, CONNECTION_READER, reader)
    return True


# The reader. aiormq's `FrameReceiver.get_frame` reads each frame in three `readexactly`
# calls through a `BytesIO` under a lock, then decodes it with pamqp's generic `unmarshal`;
# every delivery is at least three frames, and this was the largest single cost of a
# consumer. This one returns exactly what aiormq's does (bytes consumed, channel, pamqp
# frame) and raises the same exceptions. A delivery's three frames skip pamqp's generic
# decoder (a header with a headers table or a timestamp still goes through it); everything
# else, and anything malformed, is pamqp's. Where pamqp refuses a frame that plain aiormq
# would die on (the connection drops, the broker redelivers, forever), `_salvage` decodes
# what it can instead.


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
        frame_type, channel, size = _unpack_frame_header(header)
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
    if rest[-1] == FRAME_END:
        if frame_type == BODY:
            return size + 8, channel, ContentBody(rest[:-1])
        try:
            if frame_type == METHOD and rest.startswith(_DELIVER):
                return size + 8, channel, _deliver(rest)
            if frame_type == CONTENT_HEADER:
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
# and the broker deliver the same message again, forever (see `decoding`).


def _salvage(
    receiver: Any, frame_type: int, channel: int, rest: bytes, error: BaseException
) -> tuple[int, int, Any]:
    """The frame pamqp could not decode (`rest` with its frame-end octet), decoded
    leniently; an `UndecodableHeader` for a content header on a channel of
    `deliver_directly`; else InvalidFrameError, as aiormq's reader raises."""
    if rest[-1] != FRAME_END:  # the stream is out of step: only a new connection helps
        raise InvalidFrameError(str(error)) from error
    frame: Any = None
    try:
        if frame_type == METHOD:
            frame = decoding.decode_method(rest[:-1])
        elif frame_type == CONTENT_HEADER:
            frame = decoding.decode_content_header(rest[:-1])
    except Exception:  # whatever hostile bytes make a decoder raise: undecodable
        frame = None
    if frame is not None:
        events.counts.leniently_decoded += 1
        logger.warning(
            "decoded a frame whose strings are not UTF-8 with surrogate escapes",
            channel=channel,
            frame=frame.name,
            error=str(error),
        )
        return len(rest) + 7, channel, frame
    if frame_type == CONTENT_HEADER and len(rest) > 12 and _delivers_directly(receiver, channel):
        return len(rest) + 7, channel, UndecodableHeader(rest, error)
    raise InvalidFrameError(str(error)) from error


def _delivers_directly(receiver: Any, number: int) -> bool:
    # Through aiormq's table of the connection's channels; one gone is a plain "no".
    connection = getattr(receiver, _CONNECTION_OF, None)
    channel = getattr(connection, "channels", {}).get(number)
    return ON_DELIVER_FRAME in getattr(channel, "__dict__", ())
