"""Dead letters: look at a work queue's dead-letter queue, move its messages back, or purge
it::

    async with DeadLetters(url, "orders_queue") as dead:
        for letter in await dead.show(limit=20, reason="unknown user"):
            print(letter.reason, letter.message_id)
        replayed = await dead.replay(reason="database", progress=print)
        purged = await dead.purge()

`show` reads every dead letter without acknowledging it and hands them all back untouched
(closing its channel requeues them), listing the oldest first by when they failed: a
quorum queue puts back what was taken in an order of its own (RabbitMQ 3.10 scrambled 300
of them after one look), so the queue's order is not one to show. `replay` publishes each
matching one to the work queue with publisher confirms — with its message_id (an
idempotent consumer still holds) and its attempts reset — and acknowledges it in the
dead-letter queue only once its copy is confirmed: a crash in the middle loses nothing
and at worst replays one twice. Both read the reasons `ingest` writes and those of the
broker's own dead-lettering (`x-death`: a quorum queue's delivery limit, an expiry); what
a dead letter shows of its headers is bounded (ingest.text: another tool may have written
any reason), so a reason filter matches within what is shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from ingest.rabbitmq._aiormq.publishing import copy_publisher
from ingest.rabbitmq._copies import copy_properties
from ingest.rabbitmq.acknowledger import (
    ATTEMPTS_HEADER,
    EXCEPTION_HEADER,
    FAILED_AT_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
)
from ingest.rabbitmq.connection import open_connection
from ingest.rabbitmq.instrumentation import PublishSpan, PublishTracer
from ingest.text import bounded

# What a replayed copy leaves behind: the failure it had; its attempts start again.
FAILURE_HEADERS = (ATTEMPTS_HEADER, REASON_HEADER, EXCEPTION_HEADER, FAILED_AT_HEADER, "x-death")
REPLAY_WINDOW = 100  # copies awaiting their confirms at once
# How long `show` waits for a queue to count again what it took and gave back.
RETURN_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    attempts: int
    failed_at: datetime | None
    message_id: str | None
    body: bytes
    queue: str | None  # the queue it failed in, when it says

    @classmethod
    def of(cls, message: DeliveredMessage) -> DeadLetter:
        properties = message.header.properties
        headers: dict[str, Any] = dict(properties.headers or {})
        deaths = headers.get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths, list) and isinstance(deaths[0], dict) else {}
        reason = headers.get(REASON_HEADER) or death.get("reason") or "no reason given"
        attempts = headers.get(ATTEMPTS_HEADER, death.get("count", 0))
        failed_at: Any = headers.get(FAILED_AT_HEADER) or death.get("time")
        if isinstance(failed_at, int | float) and not isinstance(failed_at, bool):
            failed_at = datetime.fromtimestamp(failed_at, UTC)
        return cls(
            reason=_text(reason),
            attempts=attempts if isinstance(attempts, int) else 0,
            failed_at=failed_at if isinstance(failed_at, datetime) else None,
            message_id=properties.message_id,
            body=bytes(message.body),
            queue=_text(headers.get(QUEUE_HEADER) or death.get("queue")) or None,
        )

    def matches(self, reason: str | None) -> bool:
        return reason is None or reason.lower() in self.reason.lower()


@dataclass(frozen=True, slots=True)
class Replayed:
    replayed: int
    skipped: int  # left in the dead-letter queue (another reason)


class DeadLetters:
    """The dead letters of a work queue (`<queue>.dlq`), or of several (a partitioned
    pipeline's partitions, each with its own): counted, shown, replayed into the queue
    each came from, or purged."""

    def __init__(
        self,
        url: str,
        queue: str | Sequence[str],
        dead_letter_queue: str | None = None,
        name: str = "ingest-dlq",
        tracer: PublishTracer | None = None,
    ) -> None:
        queues = [queue] if isinstance(queue, str) else list(queue)
        self.url = url
        # Sees each replayed copy go out (a PRODUCER span; its trace context in the headers).
        self.tracer = tracer
        self.queue = ", ".join(queues)
        # (work queue, its dead-letter queue)
        self.pairs = [(q, dead_letter_queue or f"{q}.dlq") for q in queues]
        self.dead_letter_queue = ", ".join(dlq for _, dlq in self.pairs)
        self.name = name
        self._connection: aiormq.abc.AbstractConnection | None = None

    async def __aenter__(self) -> DeadLetters:
        self._connection = await open_connection(self.url, name=self.name)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def count(self) -> int:
        total = 0
        async with self._channel() as channel:
            for _, dead_letter_queue in self.pairs:
                declared = await channel.queue_declare(dead_letter_queue, passive=True)
                total += int(declared.message_count or 0)
        return total

    async def show(self, limit: int = 20, reason: str | None = None) -> list[DeadLetter]:
        """The `limit` oldest dead letters by when they failed (whose reason contains
        `reason`), the oldest first, the same on every call; all of them stay in their
        queue. Every dead letter is read to find them; at most twice `limit` are kept."""
        kept: list[DeadLetter] = []
        for _, dead_letter_queue in self.pairs:
            taken = 0
            async with self._channel() as channel:
                async for message in _taken(channel, dead_letter_queue):
                    taken += 1
                    letter = DeadLetter.of(message)
                    if letter.matches(reason):
                        kept.append(letter)
                        if len(kept) >= 2 * limit:
                            kept = sorted(kept, key=_age)[:limit]
            # The channel closed: everything taken went back.
            await self._counted_again(dead_letter_queue, taken)
        return sorted(kept, key=_age)[:limit]

    async def _counted_again(self, queue: str, count: int) -> None:
        """Wait until `queue` counts `count` messages or more, for RETURN_WAIT_S at most: a
        quorum queue takes back what a closed channel returns a moment later, and a `show`,
        `count` or `replay` right after would find it short (even empty). Someone else
        taking from the queue meanwhile only makes this wait its whole time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETURN_WAIT_S
        async with self._channel() as channel:
            while True:
                declared = await channel.queue_declare(queue, passive=True)
                if int(declared.message_count or 0) >= count or loop.time() >= deadline:
                    return
                await asyncio.sleep(0.05)

    async def replay(
        self,
        limit: int | None = None,
        reason: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Replayed:
        """Move dead letters (whose reason contains `reason`; at most `limit`) back to
        their work queue; each is removed from the dead-letter queue once its copy is
        confirmed."""
        replayed = skipped = 0
        for queue, dead_letter_queue in self.pairs:
            left = None if limit is None else limit - replayed
            if left == 0:
                break
            done = await self._replay(queue, dead_letter_queue, left, reason, progress)
            replayed, skipped = replayed + done.replayed, skipped + done.skipped
        return Replayed(replayed, skipped)

    async def _replay(
        self,
        queue: str,
        dead_letter_queue: str,
        limit: int | None,
        reason: str | None,
        progress: Callable[[int], None] | None,
    ) -> Replayed:
        replayed = skipped = 0
        async with self._channel() as taking, self._channel(confirms=True) as publishing:
            window: list[DeliveredMessage] = []
            async for message in _taken(taking, dead_letter_queue):
                if not DeadLetter.of(message).matches(reason):
                    skipped += 1  # held unacknowledged until the end, then handed back
                    continue
                window.append(message)
                if len(window) >= REPLAY_WINDOW or replayed + len(window) == limit:
                    replayed += await self._move(queue, window, taking, publishing, progress)
                    window = []
                if limit is not None and replayed >= limit:
                    break
            replayed += await self._move(queue, window, taking, publishing, progress)
        return Replayed(replayed, skipped)

    async def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        purged = 0
        async with self._channel() as channel:
            for _, dead_letter_queue in self.pairs:
                answer = await channel.queue_purge(dead_letter_queue)
                purged += int(answer.message_count or 0)
        return purged

    async def _move(
        self,
        queue: str,
        window: Sequence[DeliveredMessage],
        taking: aiormq.abc.AbstractChannel,
        publishing: aiormq.abc.AbstractChannel,
        progress: Callable[[int], None] | None,
    ) -> int:
        if not window:
            return 0
        publish = copy_publisher(publishing)
        spans = [self._span(queue, message) for message in window]
        try:
            await asyncio.gather(
                *(
                    publish(m.body, queue, _replay_properties(m, span), None)
                    for m, span in zip(window, spans, strict=True)
                )
            )
        except BaseException as exc:
            for span in spans:
                if span is not None:
                    span.end(exc)
            raise
        for span in spans:
            if span is not None:
                span.end(None)
        for message in window:
            await taking.basic_ack(message.delivery_tag)  # type: ignore[arg-type]
        if progress is not None:
            progress(len(window))
        return len(window)

    def _span(self, queue: str, message: DeliveredMessage) -> PublishSpan | None:
        if self.tracer is None:
            return None
        properties = message.header.properties
        return self.tracer.start("", queue, properties.message_id, properties.headers, None)

    @asynccontextmanager
    async def _channel(self, confirms: bool = False) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        if self._connection is None:
            raise RuntimeError("use DeadLetters as `async with DeadLetters(...) as dead:`")
        channel = await self._connection.channel(
            publisher_confirms=confirms, on_return_raises=confirms
        )
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()


async def _taken(
    channel: aiormq.abc.AbstractChannel, queue: str
) -> AsyncIterator[DeliveredMessage]:
    """Every message of `queue` at the time of the call, taken with basic.get and left
    unacknowledged (a message taken is not given again on the same channel)."""
    declared = await channel.queue_declare(queue, passive=True)
    for _ in range(int(declared.message_count or 0)):
        message = await channel.basic_get(queue, no_ack=False)
        if message.delivery_tag is None:  # basic.get-empty: someone else took the rest
            return
        yield message


def _age(letter: DeadLetter) -> tuple[datetime, str]:
    """Oldest first: when it failed (not said: first of all; the broker's `x-death` time
    is read without a zone, and is UTC), then its message_id."""
    failed_at = letter.failed_at or _LONG_AGO
    if failed_at.tzinfo is None:
        failed_at = failed_at.replace(tzinfo=UTC)
    return (failed_at, letter.message_id or "")


_LONG_AGO = datetime.min.replace(tzinfo=UTC)


def _replay_properties(
    message: DeliveredMessage, span: PublishSpan | None
) -> spec.Basic.Properties:
    original = message.header.properties
    headers = {
        key: value for key, value in (original.headers or {}).items() if key not in FAILURE_HEADERS
    }
    if span is not None:
        headers.update(span.headers)
    properties, _ = copy_properties(original, headers)
    return properties


def _text(value: Any) -> str:
    """A header's value as a bounded text, bytes decoded ("" for none)."""
    if isinstance(value, bytes | bytearray):
        return bounded(bytes(value).decode("utf-8", "backslashreplace"))
    return "" if value is None else bounded(str(value))
