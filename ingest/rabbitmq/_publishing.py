"""The publisher's fast path: a batch of publishes packed by hand, written at once and
confirmed by delivery tag through aiormq's own confirmation handling."""

from __future__ import annotations

import asyncio
import functools
import struct
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import aiormq
import pamqp.frame
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp import encode

from ingest.exceptions import PublishError, Unroutable
from ingest.rabbitmq import _fastpath as fastpath
from ingest.rabbitmq._connection import CONNECTION_ERRORS

if TYPE_CHECKING:
    from ingest.rabbitmq.publisher import OutgoingMessage

# The broker went away, or the channel closed between the check and the publish.
_CONNECTION_ERRORS = (*CONNECTION_ERRORS, aiormq.exceptions.ChannelInvalidStateError)

PublishBatch = Callable[["Sequence[OutgoingMessage]", float], Awaitable[None]]


def batch_publisher(channel: aiormq.abc.AbstractChannel) -> PublishBatch:
    """`publish(messages, timeout)` for one channel opened with publisher confirms and
    `on_return_raises`, chosen once per channel: packed and written at once when the fast
    path fits the installed aiormq, else one `basic_publish` per message. Either returns
    when the broker confirmed every message, else raises `Unroutable` (returned) or
    `PublishError` (refused, not confirmed within `timeout`, or lost with the channel),
    for the first message in the batch's order that failed, once all are settled."""
    if _channel_usable(channel):
        return functools.partial(_publish_packed, channel)
    return functools.partial(_publish_publicly, channel)


# Instance attributes of an open channel used here (aiormq sets them in `Channel.__init__`):
# the next publish sequence number, the futures aiormq's `_on_confirm_frame` and
# `_on_return_frame` settle by delivery tag (a close rejects pending ones through the
# channel's future store, not through this table), and the message id of each publish, by
# which `_on_return_frame` finds a returned message's delivery tag.
_CHANNEL_ATTRIBUTES = (
    ("delivery_tag", int),
    ("confirmations", OrderedDict),
    ("message_id_delivery_tag", dict),
    ("max_content_size", int),
    ("write_queue", asyncio.Queue),
)
# aiormq's handlers that settle `confirmations`, and the lock `basic_publish` holds while
# it numbers and queues a publish.
_CHANNEL_METHODS = ("_on_confirm_frame", "_confirm_delivery", "_on_return_frame", "create_future")


def _channel_usable(channel: object) -> TypeGuard[aiormq.Channel]:
    if not isinstance(channel, aiormq.Channel) or not fastpath.usable():
        return False
    for name, kind in _CHANNEL_ATTRIBUTES:
        if not isinstance(getattr(channel, name, None), kind):
            fastpath._refuse(f"aiormq's Channel has no {name} {kind.__name__}")
            return False
    for name in _CHANNEL_METHODS:
        if not callable(getattr(type(channel), name, None)):
            fastpath._refuse(f"aiormq.Channel.{name} is gone")
            return False
    if not isinstance(getattr(type(channel), "lock", None), property):
        fastpath._refuse("aiormq.Channel.lock is gone")
        return False
    # Without confirms there is nothing to wait for; without `on_return_raises` a return
    # settles as a result, which the public path below reads as aiormq does.
    return bool(channel.publisher_confirms and channel.on_return_raises)


class _Batch:
    """The confirmations of one batch: settled when every message is, or rejected with the
    channel (its future is in the channel's future store)."""

    __slots__ = ("failures", "future", "pending")

    def __init__(self, future: asyncio.Future[None], size: int) -> None:
        self.future = future
        self.pending = size
        self.failures: list[tuple[int, object]] = []

    def settle(self, index: int, outcome: object) -> None:
        if outcome.__class__ is not spec.Basic.Ack:
            self.failures.append((index, outcome))
        self.pending -= 1
        if self.pending == 0 and not self.future.done():
            self.future.set_result(None)


class _Confirmation:
    """One message's entry in `channel.confirmations`: what aiormq calls on a future there
    (`done`, `cancelled`, `set_result`, `set_exception`), reported to its batch, so that a
    batch costs one future rather than one per message."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self.batch, self.index = batch, index

    def done(self) -> bool:
        # A batch given up (timeout, cancellation, channel lost): aiormq ignores the late
        # confirm, as it does for a cancelled publish.
        return self.batch.future.done()

    def cancelled(self) -> bool:
        return self.batch.future.done()

    def set_result(self, result: object) -> None:
        self.batch.settle(self.index, result)

    def set_exception(self, exception: BaseException) -> None:
        self.batch.settle(self.index, exception)


async def _publish_packed(
    channel: aiormq.Channel, messages: Sequence[OutgoingMessage], timeout: float
) -> None:
    if not messages:
        return
    # Packed before a delivery tag is taken: a message that cannot be sent (a routing key
    # over 255 bytes, say) raises here, as aiormq's `basic_publish` does, and nothing is sent.
    payload, message_ids = pack(channel.number, channel.max_content_size, messages)
    batch = _Batch(channel.create_future(), len(messages))
    confirmations: dict[int, Any] = channel.confirmations
    tags_of = channel.message_id_delivery_tag
    first = 0
    try:
        # The channel's lock, as `basic_publish` takes it: tags are numbered in the order
        # publishes reach the broker, and `write_queue` is bounded (its put may wait).
        async with channel.lock:
            first = channel.delivery_tag + 1
            for index, message_id in enumerate(message_ids):
                confirmations[first + index] = _Confirmation(batch, index)
                tags_of[message_id] = first + index
            channel.delivery_tag += len(message_ids)
            try:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
            except BaseException:
                # The broker has not seen these: their sequence numbers are free again.
                channel.delivery_tag = first - 1
                for index in range(len(message_ids)):
                    confirmations.pop(first + index, None)
                raise
        # `wait` rather than `await`: a channel closed by aiormq may reject the future with
        # a CancelledError, which must not pass for this task's own cancellation.
        await asyncio.wait((batch.future,), timeout=timeout)
    except _CONNECTION_ERRORS as exc:
        raise PublishError(f"publishing {len(messages)} message(s) failed: {exc!r}") from exc
    finally:
        if not batch.future.done():
            batch.future.cancel()  # late confirms of these tags are ignored
        if first:
            for index, message_id in enumerate(message_ids):
                if tags_of.get(message_id) == first + index:
                    del tags_of[message_id]
    _raise_unconfirmed(batch, messages, timeout)


def _raise_unconfirmed(batch: _Batch, messages: Sequence[OutgoingMessage], timeout: float) -> None:
    future = batch.future
    if future.cancelled():
        unsettled = batch.pending
        raise PublishError(
            f"{unsettled} of {len(messages)} message(s) not confirmed within {timeout}s"
        )
    lost = future.exception()
    if lost is not None:
        raise PublishError(
            f"{batch.pending} of {len(messages)} message(s) not confirmed: the channel "
            f"closed ({lost!r})"
        ) from lost
    if batch.failures:
        index, outcome = min(batch.failures, key=lambda failure: failure[0])
        raise _failure(messages[index], outcome, len(batch.failures) - 1)


def _failure(message: OutgoingMessage, outcome: object, others: int) -> BaseException:
    """What to raise for the first message of a batch that was not confirmed: `outcome` is
    what aiormq settled its confirmation with, or what its `basic_publish` raised."""
    also = f"; {others} other message(s) of the batch failed too" if others else ""
    error: BaseException
    if isinstance(outcome, aiormq.exceptions.PublishError | DeliveredMessage):
        error = Unroutable(
            f"no queue bound for exchange {message.exchange!r} and routing key "
            f"{message.routing_key!r} (message_id {message.message_id}){also}"
        )
    elif isinstance(outcome, aiormq.exceptions.DeliveryError) or not isinstance(
        outcome, BaseException
    ):
        error = PublishError(f"the broker refused message {message.message_id}: {outcome!r}{also}")
    elif isinstance(outcome, TimeoutError):
        error = PublishError(f"message {message.message_id} not confirmed in time{also}")
    elif isinstance(outcome, _CONNECTION_ERRORS):
        error = PublishError(f"publish of {message.message_id} failed: {outcome!r}{also}")
    else:
        return outcome  # a bug (a message_id that is not a str, say), not the broker's answer
    if isinstance(outcome, BaseException):
        error.__cause__ = outcome
    return error


# Frames, packed by hand: pamqp builds a `Basic.Properties` and a `ContentHeader` per
# message and marshals each through its generic, per-attribute encoder, the largest cost of
# a publish. Only the AMQP 0-9-1 wire format here, no library internals; a unit test
# compares the bytes with those aiormq's `basic_publish` writes.

_FRAME = struct.Struct(">BHI")
_CONTENT_HEADER = struct.Struct(">BHIHHQH")  # frame header, class, weight, body size, flags
_HEADER, _BODY = 2, 3
_END = b"\xce"
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
    parts: list[bytes] = []
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
            _CONTENT_HEADER.pack(
                _HEADER, channel, 14 + len(properties), _BASIC, 0, len(body), flags
            )
        )
        parts.append(properties)
        parts.append(_END)
        for start in range(0, len(body), max_content_size):
            chunk = body[start : start + max_content_size]
            parts.append(_FRAME.pack(_BODY, channel, len(chunk)))
            parts.append(chunk)
            parts.append(_END)
    return b"".join(parts), message_ids


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


# The fallback: aiormq's public `basic_publish`, one per message, concurrently.


async def _publish_publicly(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[OutgoingMessage], timeout: float
) -> None:
    outcomes = await asyncio.gather(
        *(_publish_one(channel, message, timeout) for message in messages),
        return_exceptions=True,
    )
    failures = [(i, outcome) for i, outcome in enumerate(outcomes) if outcome is not None]
    if failures:
        index, outcome = failures[0]
        raise _failure(messages[index], outcome, len(failures) - 1)


async def _publish_one(
    channel: aiormq.abc.AbstractChannel, message: OutgoingMessage, timeout: float
) -> object:
    """None once confirmed, else the confirmation (a nack, or a returned message when the
    channel does not raise on returns); raises what `basic_publish` raises."""
    confirmation = await channel.basic_publish(
        message.body,
        exchange=message.exchange,
        routing_key=message.routing_key,
        properties=message.properties(),
        mandatory=True,
        timeout=timeout,
    )
    return None if isinstance(confirmation, spec.Basic.Ack) else confirmation
