"""AMQP 0-9-1 on the wire: frame types, the frame header and end, and frames packed by
hand (acknowledgements; publishes, many messages as one payload).

pamqp builds a `Basic.Properties` and a `ContentHeader` per message and marshals each
through its generic, per-attribute encoder, the largest cost of a publish. Only the wire
format here, no library internals (pamqp's public encoders at most); unit tests compare
the bytes with pamqp's and with those aiormq's `basic_publish` writes.
"""

from __future__ import annotations

import functools
import struct
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pamqp.frame
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

if TYPE_CHECKING:
    from ingest.rabbitmq.publisher import OutgoingMessage

# Frame types, the frame header (type, channel, payload size) and the frame-end octet.
METHOD, CONTENT_HEADER, BODY = 1, 2, 3
FRAME_HEADER = struct.Struct(">BHI")
FRAME_END = 0xCE
_END = bytes((FRAME_END,))

# Publishes.

_HEADER_FRAME = struct.Struct(">BHIHHQH")  # frame header, class, weight, body size, flags
_BASIC = 60
# Property flags of Basic.Properties, and the order of the properties in a content header.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 0x8000, 0x2000, 0x1000
_CORRELATION_ID, _MESSAGE_ID = 0x0400, 0x0080
_PERSISTENT = b"\x02"


def pack(
    channel: int, max_content_size: int, messages: Sequence[OutgoingMessage]
) -> tuple[bytes, list[str]]:
    """Every message's basic.publish (`mandatory`), content header (persistent, with its
    message_id, content_type, correlation_id and headers) and body frames (at most
    `max_content_size` bytes each), in order as one payload; and the message ids sent
    (aiormq gives a message without one a random id, and so does this)."""
    parts: list[bytes | memoryview] = []
    message_ids: list[str] = []
    methods: dict[tuple[str, str], bytes] = {}
    for message in messages:
        key = (message.exchange, message.routing_key)
        method = methods.get(key)
        if method is None:
            method = methods[key] = _publish_method(channel, *key)
        message_id = message.message_id or uuid.uuid4().hex
        message_ids.append(message_id)
        body = message.body
        flags, properties = _properties(message, message_id)
        parts.append(method)
        parts.append(
            _HEADER_FRAME.pack(
                CONTENT_HEADER, channel, 14 + len(properties), _BASIC, 0, len(body), flags
            )
        )
        parts.append(properties)
        parts.append(_END)
        _add_body(parts, channel, max_content_size, body)
    return b"".join(parts), message_ids


def pack_copy(
    channel: int,
    max_content_size: int,
    routing_key: str,
    properties: spec.Basic.Properties,
    body: bytes,
) -> tuple[bytes, str]:
    """One basic.publish to the default exchange (`mandatory`) with every property of
    `properties` (a message id added when it has none, as aiormq adds one), packed as one
    payload; and its message id. The header is pamqp's; the body is copied once, into the
    payload."""
    if not properties.message_id:
        properties.message_id = uuid.uuid4().hex
    header = ContentHeader(body_size=len(body), properties=properties)
    parts: list[bytes | memoryview] = [
        _publish_method(channel, "", routing_key),
        pamqp.frame.marshal(header, channel),
    ]
    _add_body(parts, channel, max_content_size, body)
    return b"".join(parts), properties.message_id


def _add_body(
    parts: list[bytes | memoryview], channel: int, max_content_size: int, body: bytes
) -> None:
    """The body frames of `body`, at most `max_content_size` bytes each: a body of more
    than one frame is cut in views of it, so that joining `parts` is its only copy."""
    if len(body) <= max_content_size:
        if body:
            parts += (FRAME_HEADER.pack(BODY, channel, len(body)), body, _END)
        return
    view = memoryview(body)
    for start in range(0, len(body), max_content_size):
        chunk = view[start : start + max_content_size]
        parts += (FRAME_HEADER.pack(BODY, channel, len(chunk)), chunk, _END)


@functools.lru_cache(maxsize=256)
def _publish_method(channel: int, exchange: str, routing_key: str) -> bytes:
    # Once per destination, by pamqp: it validates the exchange name as aiormq's
    # `basic_publish` does (the routing key's length is aiormq's own check, repeated).
    if len(routing_key.encode()) > 255:
        raise ValueError("Routing key too long (max 255 bytes)")
    frame = spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    return pamqp.frame.marshal(frame, channel)


def _properties(message: OutgoingMessage, message_id: str) -> tuple[int, bytes]:
    # pamqp leaves out a property that is None or an empty string, and so does this.
    flags = _DELIVERY_MODE | _MESSAGE_ID
    fields: list[bytes] = []
    if message.content_type:
        flags |= _CONTENT_TYPE
        fields.append(_shortstr(message.content_type, "content_type"))
    if message.headers:
        flags |= _HEADERS
        fields.append(encode.field_table(dict(message.headers)))
    fields.append(_PERSISTENT)
    if message.correlation_id:
        flags |= _CORRELATION_ID
        fields.append(_shortstr(message.correlation_id, "correlation_id"))
    fields.append(_shortstr(message_id, "message_id"))
    return flags, b"".join(fields)


def _shortstr(text: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, not {type(text).__name__}")
    data = text.encode()
    if len(data) > 255:
        raise TypeError(f"{name} exceeds maximum length of 255 bytes ({len(data)} bytes)")
    return bytes((len(data),)) + data


# Acknowledgement frames, packed by hand so that many go in one write and none is built
# through pamqp. A basic.ack / basic.reject / basic.nack method frame is 21 bytes: frame
# type 1, channel, payload size 13, class 60, method id, the delivery tag and one byte of
# flags, then 0xCE; `ACK_FRAME` also unpacks them (to send them through aiormq's public calls).

ACK_FRAME = struct.Struct(">BHIHHQBB")
ACK, REJECT, NACK = 80, 90, 120


def ack(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return ACK_FRAME.pack(1, channel, 13, 60, ACK, delivery_tag, multiple, FRAME_END)


def reject(channel: int, delivery_tag: int, *, requeue: bool) -> bytes:
    return ACK_FRAME.pack(1, channel, 13, 60, REJECT, delivery_tag, requeue, FRAME_END)


def nack(channel: int, delivery_tag: int, *, multiple: bool, requeue: bool) -> bytes:
    flags = int(multiple) | int(requeue) << 1
    return ACK_FRAME.pack(1, channel, 13, 60, NACK, delivery_tag, flags, FRAME_END)
