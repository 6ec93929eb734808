"""AMQP frames decoded by hand: a delivery's, fast; and those pamqp refuses, leniently."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import commands, decode
from pamqp.base import Frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

# Written for pamqp 4 from its public classes and decoders; the version gate (`gate`) checks
# pamqp's version (and `LAYOUT_PROBLEM`) before the reader uses any of this.

# A delivery, fast: its basic.deliver and content header decoded without pamqp's generic
# decoder; a header with a headers table or a timestamp is left to pamqp.

_LONGLONG = struct.Struct(">Q")
_HEADER_FIELDS = struct.Struct(">HHQH")  # class id, weight, body size, property flags
_Property = tuple[str, int, bool, Any]


def _layout() -> tuple[bytes, int, tuple[_Property, ...]]:
    """What the decoders need from pamqp's Basic class: the basic.deliver method index, the
    property flags only pamqp decodes, and every property in wire order with its flag,
    whether it is an octet (else a short string) and its value when absent."""
    flags = Basic.Properties.flags
    kinds = {name: Basic.Properties.amqp_type(name) for name in Basic.Properties.__slots__}
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
    DELIVER, _PAMQP_ONLY, _PROPERTIES = _layout()
    LAYOUT_PROBLEM: str | None = None
except Exception as error:  # whatever moved, refuse the fast path; never fail the import
    DELIVER, _PAMQP_ONLY, _PROPERTIES = b"", 0, ()
    LAYOUT_PROBLEM = repr(error)


def deliver(payload: bytes) -> Basic.Deliver:
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
    frame = Basic.Deliver.__new__(Basic.Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = delivery_tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def content_header(payload: bytes) -> ContentHeader | None:
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
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


# What pamqp refuses. Other clients publish short strings (a header's name, a message_id, a
# routing key) that are not UTF-8, and RabbitMQ passes them through; pamqp raises, so plain
# aiormq's reader dies, the connection drops and the broker delivers the message again,
# forever. Decoded here with surrogate escapes instead: the original bytes come back with
# `.encode("utf-8", "surrogateescape")`, and encoding one as UTF-8 (a retry copy) raises,
# so `_copies` says it could not be copied. Everything else is read by pamqp's own decoders
# (`decode.by_type`, `decode.TABLE_MAPPING`), in pamqp's order; those cannot be told to be
# lenient without replacing them for the whole process. Only after pamqp has failed: the
# hot path never comes here.

_CLASS_WEIGHT_SIZE = struct.Struct(">HHQ")
_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">I")


class UndecodableHeader(ContentHeader):
    """A content header that nothing could decode, handed only to `deliver_directly`'s
    channels: its body size (so the channel reads the body frames that follow), no
    properties, and why."""

    def __init__(self, payload: bytes, error: BaseException) -> None:
        class_id, weight, body_size = _CLASS_WEIGHT_SIZE.unpack_from(payload)
        super().__init__(weight, body_size)
        self.class_id = class_id
        self.error = f"{type(error).__name__}: {error}"


def decode_method(payload: bytes) -> Frame:
    """A method frame's payload (no frame end), as `pamqp.frame._unmarshal_method_frame`
    decodes it, but through `_by_type`."""
    (index,) = _LONG.unpack_from(payload)
    method: Frame = commands.INDEX_MAPPING[index]()
    data, bit, in_bits = payload[4:], 0, False
    for name in method.__slots__:
        data_type = method.amqp_type(name)
        if in_bits and (data_type != "bit" or bit == 8):
            data, bit, in_bits = data[1:], 0, False
        consumed, value = _by_type(data, data_type, bit)
        if data_type == "bit":
            bit, in_bits, consumed = bit + 1, True, 0
        setattr(method, name, value)
        data = data[consumed:]
    return method


def decode_content_header(payload: bytes) -> ContentHeader:
    """A content header's payload (no frame end), as `pamqp.header.ContentHeader.unmarshal`
    decodes it, but through `_by_type`."""
    content_header = ContentHeader()
    class_id, content_header.weight, content_header.body_size = _CLASS_WEIGHT_SIZE.unpack_from(
        payload
    )
    content_header.class_id = class_id
    offset, flags, word = _CLASS_WEIGHT_SIZE.size, 0, 0
    while True:  # each turn reads two more bytes, or raises at the end of the frame
        (partial,) = _SHORT.unpack_from(payload, offset)
        offset += 2
        flags |= partial << (16 * word)
        if not partial & 1:
            break
        word += 1
    properties, data = content_header.properties, payload[offset:]
    for name in properties.__slots__:
        if flags & properties.flags[name]:
            consumed, value = _by_type(data, properties.amqp_type(name))
            setattr(properties, name, value)
            data = data[consumed:]
    return content_header


def _by_type(data: bytes, data_type: str, bit: int = 0) -> tuple[int, Any]:
    if data_type == "shortstr":
        return _short_str(data)
    if data_type == "table":
        return _table(data)
    return decode.by_type(data, data_type, bit)


def _short_str(data: bytes) -> tuple[int, str]:
    end = 1 + data[0]
    return end, data[1:end].decode("utf-8", "surrogateescape")


def _table(data: bytes) -> tuple[int, dict[str, Any]]:
    """`decode.field_table`, keys with surrogate escapes, nested values through `_value`."""
    (length,) = _LONG.unpack_from(data)
    end = 4 + length
    if end > len(data):
        raise ValueError("Field table length exceeds available data")
    table: dict[str, Any] = {}
    offset = 4
    while offset < end:  # each turn reads at least the key's length octet
        key_end = offset + 1 + data[offset]
        if key_end > end:
            raise ValueError("Field table key length exceeds data")
        key = data[offset + 1 : key_end].decode("utf-8", "surrogateescape")
        consumed, table[key] = _value(data[key_end:])
        offset = key_end + consumed
    return end, table


def _array(data: bytes) -> tuple[int, list[Any]]:
    """`decode.field_array`, nested values through `_value`."""
    (length,) = _LONG.unpack_from(data)
    end = 4 + length
    if end > len(data):
        raise ValueError("Field array length exceeds available data")
    array: list[Any] = []
    offset = 4
    while offset < end:  # each turn reads at least a type octet: data[offset:] is not empty
        consumed, value = _value(data[offset:])
        offset += consumed
        array.append(value)
    return offset, array


def _value(data: bytes) -> tuple[int, Any]:
    """`decode.embedded_value`, with nested tables and arrays decoded here."""
    if not data:
        return 0, None
    kind = data[:1]
    decoder = _NESTED.get(kind) or decode.TABLE_MAPPING.get(kind)
    if decoder is None:
        raise ValueError(f"Unknown type: {kind!r}")
    consumed, value = decoder(data[1:])
    return consumed + 1, value


_NESTED: dict[bytes, Callable[[bytes], tuple[int, Any]]] = {b"F": _table, b"A": _array}
