"""ChannelAcknowledger: settles the deliveries of one channel — coalesced acks, rejects,
delayed retries and dead letters with their reason."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import Any

import aiormq
import structlog
from aiormq.abc import DeliveredMessage

from ingest.acknowledger import validate_ack_options
from ingest.message import Failed, Message
from ingest.rabbitmq import _wire as frames
from ingest.rabbitmq._aiormq.delivery import frame_writer
from ingest.rabbitmq._aiormq.publishing import copy_publisher
from ingest.rabbitmq._copies import CopyProperties, copy_properties, release_properties
from ingest.rabbitmq.options import RABBIT_ACK_ACTIONS, RabbitAckAction, RabbitMQOptions
from ingest.rabbitmq.stats import ProducerStats
from ingest.text import bounded

logger = structlog.get_logger("ingest.rabbitmq")

ATTEMPTS_HEADER = "x-ingest-attempts"
REASON_HEADER = "x-ingest-reason"
EXCEPTION_HEADER = "x-ingest-exception"
QUEUE_HEADER = "x-ingest-queue"
FAILED_AT_HEADER = "x-ingest-failed-at"  # when it failed last: seconds since the epoch


class Delivery:
    """A message's `ack_data`: its delivery and the actions `configure_ack` chose.

    A plain slotted class: one is made per delivery, on the hot path.
    """

    __slots__ = ("on_failure", "on_success", "raw")

    def __init__(
        self,
        raw: DeliveredMessage,
        on_success: RabbitAckAction | None = None,
        on_failure: RabbitAckAction | None = None,
    ) -> None:
        self.raw = raw
        self.on_success = on_success
        self.on_failure = on_failure

    @property
    def tag(self) -> int:
        return self.raw.delivery.delivery_tag  # type: ignore[union-attr, return-value]

    @property
    def redelivered(self) -> bool:
        if self.raw.delivery.redelivered:  # type: ignore[union-attr]
            return True
        # Quorum queues count deliveries in a header.
        headers = self.raw.header.properties.headers or {}
        count = headers.get("x-delivery-count")
        return isinstance(count, int) and count > 0

    @property
    def attempts(self) -> int:
        """Failed attempts before this delivery (from the retry header)."""
        headers = self.raw.header.properties.headers or {}
        value = headers.get(ATTEMPTS_HEADER, 0)
        return value if isinstance(value, int) else 0


def retry_queue_name(queue: str, delay: float) -> str:
    return f"{queue}.retry.{round(delay * 1000)}ms"


class ChannelAcknowledger:
    """Settles what one channel delivered; a new channel gets a new acknowledger.

    Successful acks are coalesced: every delivery tag up to the channel's low-water mark is
    settled, so one `basic.ack(multiple=True)` covers a contiguous run. Pending acks go
    every `ACK_DELAY` seconds, those below the mark in that one frame; an ack above it
    (a message of a fuller batch, done before an older one of another batcher) waits for
    the mark up to `ACK_HOLD` seconds, then goes in a frame of its own. When half the
    prefetch is pending, every pending ack goes at once, so that the broker's window stays
    open. Rejects go at once, with the pending acks below them. All frames of one write go
    out together. (A frame per ack costs the broker: on a quorum queue each is a command
    in its log. With three batchers filling at different speeds, 29 % of the acks went
    alone before this hold; with it, and the larger default prefetch that leaves room for
    it, RabbitMQ spent 9 % less CPU per message on quorum queues: docs/PERFORMANCE.md,
    issue 23.)

    Acks for a channel that has closed are dropped and counted: the broker redelivers those
    messages, and an ack on another channel would be an error.
    """

    ACK_DELAY = 0.02
    ACK_HOLD = 0.25

    def __init__(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel | None,
        options: RabbitMQOptions,
        stats: ProducerStats,
        prefetch_count: int,
    ) -> None:
        self.channel = channel
        self._write_frames = frame_writer(channel)
        self.publisher = publisher
        self._publish = None if publisher is None else copy_publisher(publisher)
        self.options = options
        self.stats = stats
        self._lock = asyncio.Lock()
        self._watermark = 0
        self._settled_above: set[int] = set()
        # Pending acks: delivery tag -> when it was acked (the event loop's clock).
        self._pending: dict[int, float] = {}
        self._pending_limit = max(1, prefetch_count // 2)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def configure(self, ack_data: Any, options: Mapping[str, Any]) -> Any:
        checked = validate_ack_options(options, RABBIT_ACK_ACTIONS)
        if checked.get("on_success") in ("retry", "release"):
            raise ValueError("on_success cannot be 'retry' or 'release': a success is done")
        if "retry" in checked.values() and self.options.retry is None:
            raise ValueError("the 'retry' action needs the producer's retry policy")
        return Delivery(
            ack_data.raw,
            checked.get("on_success", ack_data.on_success),
            checked.get("on_failure", ack_data.on_failure),
        )

    async def ack(self, successful: list[Message], failed: list[Message]) -> None:
        if self.options.no_ack:
            return
        if self.channel.is_closed:
            self._drop(len(successful) + len(failed))
            return
        acks: list[int] = []
        others: list[tuple[int, bytes]] = []
        republish: list[tuple[Message, str, str]] = []
        plain = self.options.on_success == "ack"
        for message in successful:
            delivery = message.ack_data
            if plain and delivery.on_success is None:  # the hot path: no call per message
                acks.append(delivery.raw.delivery.delivery_tag)
            else:
                action = delivery.on_success or self.options.on_success
                self._plan(message, action, acks, others, republish)
        for message in failed:
            action = message.ack_data.on_failure
            if action is None:
                status = message.status
                raised = isinstance(status, Failed) and status.exception is not None
                action = self.options.failure_action(raised)
            self._plan(message, action, acks, others, republish)
        self.stats.ack += len(acks)
        if republish:
            acks.extend(await self._republish(republish, others))
        await self._send(acks, others)

    def _plan(
        self,
        message: Message,
        action: RabbitAckAction,
        acks: list[int],
        others: list[tuple[int, bytes]],
        republish: list[tuple[Message, str, str]],
    ) -> None:
        """Sort one message by what its action needs: an ack, a reject frame, or a copy
        published (to a retry queue or the dead-letter queue) before it is acked."""
        delivery: Delivery = message.ack_data
        tag = delivery.tag
        retry = self.options.retry
        if action == "ack":
            acks.append(tag)
        elif action == "reject_and_requeue" or (
            action == "reject_and_requeue_once" and not delivery.redelivered
        ):
            others.append((tag, frames.reject(self.channel.number, tag, requeue=True)))
            self.stats.reject_and_requeue += 1
        elif action == "release":
            republish.append((message, self.options.queue, "release"))
        elif action == "retry" and retry is not None and delivery.attempts + 1 < retry.max_attempts:
            target = retry_queue_name(self.options.queue, retry.delay(delivery.attempts + 1))
            republish.append((message, target, "retry"))
        elif self.options.dlq_name:
            # reject, requeue-once after a redelivery, the last retry: a dead letter.
            republish.append((message, self.options.dlq_name, "dead_letter"))
        else:
            others.append((tag, frames.reject(self.channel.number, tag, requeue=False)))
            self.stats.reject += 1

    async def _republish(
        self, jobs: list[tuple[Message, str, str]], others: list[tuple[int, bytes]]
    ) -> list[int]:
        """Publish retries and dead letters with confirms; return the tags of the originals
        to ack. One whose publish failed is requeued instead (added to `others`), so
        nothing is lost; one whose copy cannot be built is dead-lettered (see `_copy`)."""
        copies: list[tuple[Message, str, str, CopyProperties]] = []
        for message, target, kind in jobs:
            copy = self._copy(message, target, kind, others)
            if copy is not None:
                copies.append(copy)
        results = await asyncio.gather(
            *(
                self._publish_copy(message, target, properties)
                for message, target, _, properties in copies
            ),
            return_exceptions=True,
        )
        acks: list[int] = []
        for (message, target, kind, _), result in zip(copies, results, strict=True):
            tag = message.ack_data.tag
            if isinstance(result, BaseException):
                logger.error(
                    "could not publish; requeueing the message instead",
                    queue=self.options.queue,
                    message_id=message.ack_data.raw.header.properties.message_id,
                    target=target,
                    reason=message.failure_reason,
                    error=repr(result),
                )
                others.append((tag, frames.reject(self.channel.number, tag, requeue=True)))
                self.stats.reject_and_requeue += 1
            else:
                acks.append(tag)
                if kind == "retry":
                    self.stats.retry += 1
                elif kind == "release":
                    self.stats.release += 1
                else:
                    self.stats.dead_letter += 1
        return acks

    def _copy(
        self, message: Message, target: str, kind: str, others: list[tuple[int, bytes]]
    ) -> tuple[Message, str, str, CopyProperties] | None:
        """The copy to publish, with the failure in its headers (a release's: as it came).
        A copy whose headers cannot be copied as they were goes to the dead-letter queue
        (a retry or a release would not be the message that arrived), its reason saying
        what was changed; with no dead-letter queue the original is rejected. Never
        requeued: that would loop."""
        delivery: Delivery = message.ack_data
        original = delivery.raw.header.properties
        if kind == "release":
            released = release_properties(original)
            if released is not None:
                return message, target, kind, released
            kind = "dead_letter"  # as any failure of it: a requeue could loop
        headers = dict(original.headers or {})
        status = message.status
        reason = status.reason if isinstance(status, Failed) else "acknowledged as failed"
        # A reason may quote what arrived (a message_id that is not UTF-8): escaped, so
        # that the copy can always carry it.
        reason = bounded(reason).encode("utf-8", "backslashreplace").decode()
        headers[REASON_HEADER] = reason
        if isinstance(status, Failed) and status.exception is not None:
            headers[EXCEPTION_HEADER] = type(status.exception).__qualname__
        headers[ATTEMPTS_HEADER] = delivery.attempts + 1
        headers[QUEUE_HEADER] = self.options.queue
        headers[FAILED_AT_HEADER] = int(time.time())
        properties, problems = copy_properties(original, headers)
        if not problems:
            return message, target, kind, properties
        self.stats.uncopyable_headers += 1
        dlq = self.options.dlq_name
        logger.error(
            "could not copy the message's headers as they were; dead-lettering it",
            queue=self.options.queue,
            message_id=original.message_id,
            reason=reason,
            problems=problems,
            dead_letter_queue=dlq,
        )
        if dlq is None:
            tag = delivery.tag
            others.append((tag, frames.reject(self.channel.number, tag, requeue=False)))
            self.stats.reject += 1
            return None
        assert properties.headers is not None
        instead = " (dead-lettered instead of retried)" if kind == "retry" else ""
        properties.headers[REASON_HEADER] = bounded(
            f"{reason}; it could not be copied as it was{instead}: {'; '.join(problems)}"
        )
        return message, dlq, "dead_letter", properties

    async def _publish_copy(
        self, message: Message, target: str, properties: CopyProperties
    ) -> None:
        if self.publisher is None or self._publish is None or self.publisher.is_closed:
            raise ConnectionError("the publishing channel is closed")
        await self._publish(message.ack_data.raw.body, target, properties, None)

    async def _send(self, acks: list[int], others: list[tuple[int, bytes]]) -> None:
        async with self._lock:
            # Frames are computed and queued in one critical section so that a
            # multiple-ack can never overtake a reject it would otherwise swallow.
            if self.channel.is_closed:
                self._drop(len(acks) + len(others) + len(self._pending))
                self._pending.clear()
                return
            settled = self._settled_above
            payload: list[bytes] = []
            for tag, frame in others:
                payload.append(frame)
                settled.add(tag)
            settled.update(acks)
            watermark = self._watermark
            while watermark + 1 in settled:
                watermark += 1
                settled.discard(watermark)
            self._watermark = watermark
            loop = asyncio.get_running_loop()
            self._pending.update(dict.fromkeys(acks, loop.time()))
            if len(self._pending) >= self._pending_limit:
                self._write_pending(payload, math.inf)
            elif others:
                self._write_pending(payload, -math.inf)
            if self._pending and self._flush_timer is None:
                self._flush_timer = loop.call_later(self.ACK_DELAY, self._schedule_flush)
            if payload:
                await self._write(payload)

    def _write_pending(self, payload: list[bytes], acked_by: float) -> None:
        """Add pending acks to `payload`: one multiple-ack for those up to the watermark
        (every other tag below it was already acked or rejected), and one frame each for
        those above it acked at `acked_by` or earlier (`math.inf`: all of them)."""
        pending = self._pending
        number = self.channel.number
        below = [tag for tag in pending if tag <= self._watermark]
        if below:
            payload.append(frames.ack(number, max(below), multiple=True))
            for tag in below:
                del pending[tag]
            self.stats.multiple_ack_frames += 1
        alone = sorted(tag for tag, acked in pending.items() if acked <= acked_by)
        for tag in alone:
            payload.append(frames.ack(number, tag))
            del pending[tag]
        self.stats.single_ack_frames += len(alone)

    async def _write(self, payload: list[bytes]) -> None:
        # One write through the fast path; aiormq's public calls, one each, without it.
        await self._write_frames(b"".join(payload))

    def _schedule_flush(self) -> None:
        self._flush_timer = None
        # Owned here: close() awaits it, and a failure is logged, never lost.
        task = asyncio.get_running_loop().create_task(self._flush_due())
        self._flushing.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "sending delayed acks failed; the broker redelivers",
                queue=self.options.queue,
                exc_info=task.exception(),
            )

    async def close(self) -> None:
        """Send the pending acks now and wait for flushes under way: nothing this
        acknowledger started outlives it."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        await self.flush()
        await asyncio.gather(*self._flushing, return_exceptions=True)

    async def flush(self) -> None:
        """Send every pending ack now."""
        await self._flush(math.inf)

    async def _flush_due(self) -> None:
        """The timer's flush: the acks below the watermark, and those that waited
        `ACK_HOLD` for it; the timer runs again while some are left."""
        loop = asyncio.get_running_loop()
        await self._flush(loop.time() - self.ACK_HOLD)
        if self._pending and self._flush_timer is None and not self.channel.is_closed:
            self._flush_timer = loop.call_later(self.ACK_DELAY, self._schedule_flush)

    async def _flush(self, acked_by: float) -> None:
        async with self._lock:
            if not self._pending:
                return
            if self.channel.is_closed:
                self._drop(len(self._pending))
                self._pending.clear()
                return
            payload: list[bytes] = []
            self._write_pending(payload, acked_by)
            if payload:
                await self._write(payload)

    def settled_elsewhere(self, tag: int) -> None:
        """A delivery of this channel was settled without this acknowledger (the fast path
        rejected one it could not decode): counted as settled, so that the low-water mark
        of the coalesced acks passes it."""
        self._settled_above.add(tag)
        self.stats.reject += 1

    def _drop(self, count: int) -> None:
        self.stats.dropped_stale += count
        logger.info(
            "dropping acknowledgements for a closed channel; the broker redelivers",
            queue=self.options.queue,
            messages=count,
        )
