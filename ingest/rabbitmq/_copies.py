"""The properties of a failed message's retry, dead-letter or release copy: every header
exact.

pamqp decodes a header table into Python values that its encoder cannot always write back
as they were: a float (sent as a 64-bit double) goes out as a 32-bit float, so 19.99
comes back 19.989999771118164; a long string that is not UTF-8 decodes to `bytes`, which
it cannot encode at all. `CopyProperties` writes the headers table itself (floats as
doubles, the rest through pamqp's own encoder); `copy_properties` says which headers
could not be copied as they were, and makes the copy encodable anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

from pamqp import commands as spec
from pamqp import encode

_LENGTH = struct.Struct(">I")
_DOUBLE = struct.Struct(">d")
# What pamqp raises for a value it cannot encode (a wrong type, a number out of range).
ENCODING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)
_LEFT_OUT: Final = object()


def encode_value(value: Any) -> bytes:
    """A field value, type tag first, as pamqp would write it except that a float is a
    64-bit double ('d'), so that it arrives exactly as it was."""
    if isinstance(value, float):
        return b"d" + _DOUBLE.pack(value)
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, list):
        return b"A" + _sized(b"".join(encode_value(item) for item in value))
    return encode.encode_table_value(value)


def encode_table(table: Mapping[str, Any]) -> bytes:
    """A field table, its size first; keys sorted, as pamqp sorts them."""
    return _sized(
        b"".join(
            encode.short_string(key) + encode_value(value) for key, value in sorted(table.items())
        )
    )


def _sized(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class CopyProperties(spec.Basic.Properties):
    """`Basic.Properties` whose headers table is written by `encode_table`.

    No `__slots__` here on purpose: pamqp's `marshal` walks `self.__slots__`, which must
    stay the property list of `Basic.Properties`.
    """

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return encode_table(value)
        return super().encode_property(name, value)


def copy_properties(
    original: spec.Basic.Properties, headers: dict[str, Any]
) -> tuple[CopyProperties, list[str]]:
    """Properties for a persistent copy of a delivery with `headers`, and what could not be
    copied as it was (empty when the copy is exact).

    A header that cannot be encoded is made encodable (a long string that is not UTF-8
    becomes a byte array, with the same bytes) or, failing that, left out; so is a header
    whose name is not UTF-8, and a property that cannot be encoded (a message_id that is not
    UTF-8: the fast path decodes such strings with surrogate escapes). Nothing here raises
    for what a message carries: hostile input must end in the dead-letter queue, never in
    a requeue loop.
    """
    properties = _properties(original, headers)
    try:
        properties.marshal()
    except ENCODING_ERRORS:
        pass
    else:
        return properties, []
    problems: list[str] = []
    encodable: dict[str, Any] = {}
    for key, value in headers.items():
        if not _is_utf8(key):
            problems.append(f"header name {key!r} is not UTF-8; the header is left out")
            continue
        copied, problem = _encodable(value)
        if problem is not None:
            problems.append(f"{key!r} {problem}")
        if copied is not _LEFT_OUT:
            encodable[key] = copied
    properties = _properties(original, encodable)
    problems.extend(_leave_out_unencodable(properties))
    try:
        properties.marshal()
    except ENCODING_ERRORS as error:
        problems.append(f"the other properties could not be encoded ({error}) and are left out")
        properties = CopyProperties(headers=encodable, delivery_mode=2)
    return properties, problems


def release_properties(original: spec.Basic.Properties) -> CopyProperties | None:
    """Properties for the copy of a released delivery (handed back unprocessed: the
    circuit breaker's): its headers as they came, so that its attempt count is unchanged;
    None when it cannot be copied exactly (a release must not change the message: it then
    fails as any failure of it would, to the dead-letter queue)."""
    properties, problems = copy_properties(original, dict(original.headers or {}))
    return None if problems else properties


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _leave_out_unencodable(properties: CopyProperties) -> list[str]:
    """Leave out (set to None) each property but the headers that cannot be encoded, and
    say which: the copy must be publishable whatever the original carried."""
    problems = []
    for name in properties.__slots__:
        value = getattr(properties, name)
        if name == "headers" or value is None:
            continue
        try:
            properties.encode_property(name, value)
        except ENCODING_ERRORS as error:
            setattr(properties, name, None)
            if isinstance(value, str) and not _is_utf8(value):
                problems.append(f"{name} {value!r} is not UTF-8; left out of the copy")
            else:
                problems.append(f"{name} {value!r} is left out of the copy ({error})")
    return problems


def _encodable(value: Any) -> tuple[Any, str | None]:
    """The value, or an encodable stand-in and what was done, or `_LEFT_OUT`."""
    try:
        encode_value(value)
    except ENCODING_ERRORS:
        pass
    else:
        return value, None
    stand_in = _bytes_as_byte_arrays(value)
    try:
        encode_value(stand_in)
    except ENCODING_ERRORS as error:
        return _LEFT_OUT, f"is left out ({error})"
    return stand_in, "held a long string that is not UTF-8; copied as a byte array"


def _bytes_as_byte_arrays(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _bytes_as_byte_arrays(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_bytes_as_byte_arrays(item) for item in value]
    return value


def _properties(original: spec.Basic.Properties, headers: dict[str, Any]) -> CopyProperties:
    # Neither `expiration` (the copy must not expire) nor `user_id` (the broker refuses a
    # publish whose user_id is not the connection's user) is copied.
    return CopyProperties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=original.message_id,
        timestamp=original.timestamp,
        message_type=original.message_type,
        app_id=original.app_id,
    )
