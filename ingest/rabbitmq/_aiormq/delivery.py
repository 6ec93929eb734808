"""Direct deliveries: the channel's reader hands each delivery to the consumer (no task per
delivery), and settlement frames packed by hand (`_wire`) are written at once."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import aiormq
import structlog
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.commands import Basic

from ingest.rabbitmq._aiormq import events
from ingest.rabbitmq._aiormq.decoding import UndecodableHeader
from ingest.rabbitmq._aiormq.gate import fits
from ingest.rabbitmq._aiormq.internals import (
    CONTENT_HEADER_READER,
    DELIVERY_CHANNEL,
    ON_DELIVER_FRAME,
)
from ingest.rabbitmq._wire import ACK, ACK_FRAME, NACK, REJECT, reject

logger = structlog.get_logger("ingest.rabbitmq")


async def ignore(raw: DeliveredMessage) -> None:
    """The consumer callback aiormq is given when `deliver_directly` bypasses it."""


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
    delivery whose properties nothing can decode (see `reader.get_frame`) is not handed over: it
    is rejected without requeue (unless `no_ack`), so that the queue's dead-letter exchange,
    if any, receives it as it was, logged with `queue`, its delivery tag and why, and its
    tag given to `settled_here`: an acknowledger that coalesces acks up to a low-water mark
    must count it as settled, or the mark stops below it for the rest of the channel."""
    if not fits(channel, DELIVERY_CHANNEL):
        return False
    read_header = getattr(channel, CONTENT_HEADER_READER)
    read_content = channel._read_content
    consumers = channel.consumers

    async def on_deliver_frame(frame: Basic.Deliver) -> None:
        header = await read_header()
        message = await read_content(frame, header)
        if frame.consumer_tag not in consumers:
            events.counts.unknown_consumer += 1
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

    setattr(channel, ON_DELIVER_FRAME, on_deliver_frame)
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
    events.counts.undecodable_rejected += 1
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
    # Surrogate escapes (see `reader._salvage`) as `\udcff`: a logger printing to a strict UTF-8
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
    if fits(channel, DELIVERY_CHANNEL):
        queue = channel.write_queue

        def write(payload: bytes) -> Awaitable[None]:
            return queue.put(ChannelFrame(payload=payload, should_close=False))

        return write
    return functools.partial(_settle_publicly, channel)


async def _settle_publicly(channel: aiormq.abc.AbstractChannel, payload: bytes) -> None:
    for *_, method, tag, flags, _end in ACK_FRAME.iter_unpack(payload):
        if method == ACK:
            await channel.basic_ack(tag, multiple=bool(flags))
        elif method == REJECT:
            await channel.basic_reject(tag, requeue=bool(flags))
        elif method == NACK:
            await channel.basic_nack(tag, multiple=bool(flags & 1), requeue=bool(flags & 2))
        else:
            raise ValueError(f"not a frame packed by ack, reject or nack: method {method}")
