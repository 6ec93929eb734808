"""Confirmed publishing on the fast path: a batch of publishes (`batch_publisher`) or a
copy (`copy_publisher`) packed by hand, written at once and confirmed by delivery tag
through aiormq's own confirmation handling; aiormq's `basic_publish` when it does not fit."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from ingest.exceptions import PublishError, Unroutable
from ingest.rabbitmq._aiormq.gate import fits
from ingest.rabbitmq._aiormq.internals import PUBLISHING_CHANNEL
from ingest.rabbitmq._wire import pack, pack_copy
from ingest.rabbitmq.connection import CONNECTION_ERRORS

if TYPE_CHECKING:
    from ingest.rabbitmq.publisher import OutgoingMessage

# The broker went away, or the channel closed between the check and the publish.
_CONNECTION_ERRORS = (*CONNECTION_ERRORS, aiormq.exceptions.ChannelInvalidStateError)

PublishBatch = Callable[["Sequence[OutgoingMessage]", float], Awaitable[None]]
# `publish(body, routing_key, properties, timeout)`: one message to the default exchange
# with every property given (a failed message's retry or dead-letter copy).
PublishCopy = Callable[[bytes, str, spec.Basic.Properties, "float | None"], Awaitable[None]]


class _Published(Protocol):
    """What an error names of a message published: an OutgoingMessage, or a `_Copy`."""

    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def message_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _Copy:
    routing_key: str
    message_id: str
    exchange: str = ""


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


def copy_publisher(channel: aiormq.abc.AbstractChannel) -> PublishCopy:
    """`publish(body, routing_key, properties, timeout)` for one channel opened as
    `batch_publisher`'s are: returns once the broker confirmed, else raises as a batch
    does. On the fast path a body is copied once: its frames are views of it, joined in
    the payload written (aiormq's `basic_publish` holds a large body twice over: its
    chunks, then the frames joined)."""
    if _channel_usable(channel):
        return functools.partial(_publish_copy_packed, channel)
    return functools.partial(_publish_copy_publicly, channel)


def _channel_usable(channel: object) -> TypeGuard[aiormq.Channel]:
    # The aiormq internals used here, each with what it is for: `internals.INTERNALS`
    # (aiormq's confirm and return handlers and `lock` are checked by the version gate).
    if not fits(channel, PUBLISHING_CHANNEL):
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
    await _send_confirmed(channel, payload, message_ids, messages, timeout)


async def _publish_copy_packed(
    channel: aiormq.Channel,
    body: bytes,
    routing_key: str,
    properties: spec.Basic.Properties,
    timeout: float | None,
) -> None:
    payload, message_id = pack_copy(
        channel.number, channel.max_content_size, routing_key, properties, body
    )
    await _send_confirmed(channel, payload, [message_id], [_Copy(routing_key, message_id)], timeout)


async def _send_confirmed(
    channel: aiormq.Channel,
    payload: bytes,
    message_ids: list[str],
    messages: Sequence[_Published],
    timeout: float | None,
) -> None:
    """Write `payload` (the packed publishes of `messages`, whose ids are `message_ids`)
    and wait for the broker to confirm every one; raise for the first that failed."""
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


def _raise_unconfirmed(
    batch: _Batch, messages: Sequence[_Published], timeout: float | None
) -> None:
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


def _failure(message: _Published, outcome: object, others: int) -> BaseException:
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


async def _publish_copy_publicly(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    routing_key: str,
    properties: spec.Basic.Properties,
    timeout: float | None,
) -> None:
    message = _Copy(routing_key, properties.message_id or "")
    try:
        confirmation = await channel.basic_publish(
            body, routing_key=routing_key, properties=properties, mandatory=True, timeout=timeout
        )
    except Exception as error:
        raise _failure(message, error, 0) from error
    if not isinstance(confirmation, spec.Basic.Ack):
        raise _failure(message, confirmation, 0)
