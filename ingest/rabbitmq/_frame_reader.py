"""A faster frame reader for aiormq: two reads per frame; deliveries without pamqp.

aiormq's `FrameReceiver.get_frame` reads each frame in three `readexactly` calls through a
`BytesIO` under a lock, then decodes it with pamqp's generic `unmarshal`; every delivery is
at least three frames, and this was the largest single cost of a consumer. This reader
returns exactly what aiormq's does (bytes consumed, channel, pamqp frame) and raises the
same exceptions. A delivery's three frames — `basic.deliver`, its content header and its
body — skip pamqp's generic decoder (a header with a headers table or a timestamp still
goes through it); everything else, and anything malformed, is pamqp's.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

_HEADER = struct.Struct(">BHI")
# aiormq's own reader, kept to compare against (and to restore).
ORIGINAL = aiormq.connection.FrameReceiver.get_frame
_METHOD, _CONTENT_HEADER, _BODY, _FRAME_END = 1, 2, 3, 0xCE
# basic.deliver and the content header that follows it are decoded here, the rest by pamqp.
_DELIVER = struct.pack(">I", Basic.Deliver.index)
_LONGLONG = struct.Struct(">Q")
_HEADER_FIELDS = struct.Struct(">HHQH")  # class id, weight, body size, property flags
_FLAGS = Basic.Properties.flags
_PAMQP_ONLY = _FLAGS["headers"] | _FLAGS["timestamp"] | 1  # 1: a second flag word follows
# Every property in wire order: its flag, whether it is an octet (else a short string;
# the table and the timestamp never come this way), and its value when absent.
_PROPERTIES = tuple(
    (
        name,
        _FLAGS[name],
        getattr(Basic.Properties, f"_{name}") == "octet",
        getattr(Basic.Properties(), name),
    )
    for name in Basic.Properties.__slots__
)


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


def install() -> bool:
    """Use this reader for every aiormq connection; False (and nothing changed) if aiormq's
    receiver is not the one this was written against."""
    receiver = getattr(aiormq.connection, "FrameReceiver", None)
    if receiver is None or not hasattr(receiver, "get_frame"):
        return False
    if receiver.get_frame is not get_frame:
        receiver.get_frame = get_frame
    return True
