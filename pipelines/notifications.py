"""The notifications pipeline: one digest email per recipient per batch window."""

from __future__ import annotations

import asyncio
import random
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, PositiveFloat

from ingest import Batcher, BatchInfo, Handlers, Message, Processors
from ingest.rabbitmq import (
    OutgoingMessage,
    Partitions,
    Publisher,
    QueueDeclare,
    RetryPolicy,
)
from ingest.rabbitmq.window_dead_letters import PublishedDeadLetters
from ingest.service.declaration import Declaration, Wiring
from ingest.service.hosted import HostedPipeline, Route
from ingest.service.settings import PipelineSettings, Settings
from ingest.sql import SqlWindowStore
from ingest.windows import DurableWindows
from pipelines.db import Database
from pipelines.mail import Mailer, digest, mailer_for, sender_of, window_message_id
from pipelines.payloads import Notification, PayloadError, parse_notification

logger = structlog.get_logger("pipelines.notifications")

QUEUE = "notifications_queue"
RECIPIENT_HEADER = "recipient"
# In-memory windows hold their notifications unacknowledged: the prefetch bounds them. With
# durable windows, acknowledged once stored, it bounds only what is on its way to the
# database (100: 4,925 msgs/s, 1,000: 9,069; docs/PERFORMANCE.md).
PREFETCH = 100
DURABLE_PREFETCH = 1_000
BATCHERS = {"email": Batcher(batch_size=75, batch_timeout=10.0, concurrency=5)}
# Durable: each of 2 flushers mails the windows of its claim side by side. 20 digests
# under way keep a mail server busy, and at most 2 x 10 x 75 notifications are held in
# memory; 2 claims of 10 cost less than 5 of 4 (102 against 119 µs a notification at ten
# a digest; docs/PERFORMANCE.md).
DURABLE_BATCHERS = {"email": replace(BATCHERS["email"], concurrency=2)}
CLAIM_LIMIT = 10
RETRY = RetryPolicy(max_attempts=5, delays=(2.0, 10.0, 30.0, 60.0))


# Digests for one recipient are sent one at a time (check, send, record), so that two
# batches carrying the same notification side by side cannot both email it. Recipients
# share this many locks by hash: bounded memory, and different recipients rarely wait.
RECIPIENT_LOCKS = 64


class NotificationHandlers(Handlers):
    def __init__(self, db: Database, mailer: Mailer, sender: str, max_body_bytes: int) -> None:
        self.db = db
        self.mailer = mailer
        self.sender = sender
        self.max_body_bytes = max_body_bytes
        self._locks = [asyncio.Lock() for _ in range(RECIPIENT_LOCKS)]

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        """The notification as its JSON payload (what a durable window stores, and what a
        dead letter of it carries), its id in the metadata."""
        try:
            notification = parse_notification(message.data, self.max_body_bytes)
        except PayloadError as error:
            return message.failed(str(error))
        if not message.metadata.get("message_id"):
            message.metadata["message_id"] = f"generated:{uuid.uuid4().hex}"
        message.data = {
            **notification.details,
            "type": notification.type,
            "recipient": notification.recipient,
        }
        return message.put_batcher("email").put_batch_key(notification.recipient)

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        """One digest for the batch's recipient.

        A durable window (`batch_info.window`) holds each notification once (the store
        skips an id it holds or completed), and its digest's Message-ID is the window's:
        sent again after a crash, it is the same email. Otherwise notifications already
        sent (same message_id, e.g. a redelivered booking) are left out; the email goes
        before the record of it, so a crash in between repeats an email rather than
        losing one."""
        unique: dict[str, Notification] = {}
        for message in messages:
            unique.setdefault(str(message.metadata["message_id"]), as_notification(message.data))
        recipient = str(batch_info.batch_key)
        if batch_info.window is not None:
            message_id = window_message_id(batch_info.window, self.sender)
            await self.mailer.send(digest(self.sender, recipient, list(unique.items()), message_id))
            return messages
        async with self._locks[hash(recipient) % RECIPIENT_LOCKS]:
            already = await self.db.sent(unique)
            fresh = [(mid, n) for mid, n in unique.items() if mid not in already]
            if fresh:
                await self.mailer.send(digest(self.sender, recipient, fresh))
                await self.db.record_sent(recipient, [mid for mid, _ in fresh])
        # Debug: not a line per digest on the success path (the metrics count them).
        logger.debug(
            "digest sent" if fresh else "digest skipped: all sent before",
            recipient=recipient,
            notifications=len(fresh),
            duplicates=len(messages) - len(fresh),
            trigger=batch_info.trigger,
        )
        return messages


def as_notification(data: dict[str, Any]) -> Notification:
    """The notification of a message's data (see handle_message)."""
    details = {k: v for k, v in data.items() if k not in ("type", "recipient")}
    return Notification(str(data["type"]), str(data["recipient"]), details)


def sample_notifications(count: int) -> list[bytes]:
    """Random notifications for the book's three users."""
    emails = ("foo@email.com", "bar@email.com", "baz@email.com")
    return [f"email,{random.choice(emails)}".encode() for _ in range(count)]


class NotificationsSettings(PipelineSettings):
    """`INGEST_PIPELINES__NOTIFICATIONS__...`: the common settings, and two of its own."""

    # Consume P partition queues behind a consistent-hash exchange (0: one queue); a
    # replica subscribes to those it does not own this much later.
    partitions: int = Field(default=0, ge=0, le=1000)
    standby_delay: PositiveFloat = 5.0
    # Digest windows kept in the database (notifications acknowledged once stored) rather
    # than in unacknowledged deliveries, bounded by the prefetch.
    durable_windows: bool = True


NOTIFICATIONS = Declaration(
    "notifications",
    queue=QUEUE,
    settings=NotificationsSettings,
    processors=Processors(concurrency=2, max_demand=20),
    batchers=BATCHERS,
    retry=RETRY,
    prefetch_count=PREFETCH,
    handler_timeout=10.0,
)


def partitions_of(settings: Settings) -> Partitions | None:
    """The notifications' partitions (INGEST_PIPELINES__NOTIFICATIONS__PARTITIONS), keyed
    by the recipient, or None for one queue."""
    config = NOTIFICATIONS.config(settings)
    if not config.partitions:
        return None
    return Partitions(NOTIFICATIONS.queue_of(settings), config.partitions, header=RECIPIENT_HEADER)


def by_recipient(message: Message) -> int:
    """The partition key inside a replica: the recipient header the exchange hashed."""
    headers = message.metadata.get("headers") or {}
    recipient = headers.get(RECIPIENT_HEADER) if isinstance(headers, dict) else None
    text = recipient.decode() if isinstance(recipient, bytes) else str(recipient or "")
    return zlib.crc32(text.encode("utf-8", "surrogateescape"))


@NOTIFICATIONS.factory
def build(settings: Settings, *, source: Path | None = None) -> HostedPipeline:
    config = NOTIFICATIONS.config(settings)
    # A file is read once and the service stops: windows kept for later would wait.
    durable = config.durable_windows and source is None
    partitions = partitions_of(settings)
    consumer = None
    if partitions is not None:  # one consumer per partition, standing by for the others'
        consumer = partial(
            partitions.consumer_options,
            replica=settings.replica(),
            declare_of=config.queue_declare,
            standby_delay=config.standby_delay,
        )
    prefetch = DURABLE_PREFETCH if durable else PREFETCH
    wiring = NOTIFICATIONS.wire(settings, source, prefetch_count=prefetch, consumer=consumer)
    batchers = wiring.batchers(DURABLE_BATCHERS if durable else BATCHERS)
    flushers = batchers["email"].concurrency
    # Each flusher's claim holds a connection (PostgreSQL), beside appends and lookups.
    db = Database(settings.database_url.get_secret_value(), flushers + 5 if durable else None)
    # One connection kept open per digest under way.
    mailer = mailer_for(settings, connections=flushers * CLAIM_LIMIT if durable else flushers)
    windows = durable_windows(wiring, db) if durable else None
    if windows is not None:
        batchers = {"email": replace(batchers["email"], windows=windows.options)}
    handlers = NotificationHandlers(db, mailer, sender_of(settings), settings.max_body_bytes)
    # Partitioned: one recipient's notifications in order, through one processor and one
    # batch processor of this replica.
    by_key = by_recipient if partitions is not None else None
    pipeline = wiring.pipeline(handlers, batchers=batchers, partition_by=by_key)

    async def startup() -> None:
        await db.start()
        if windows is not None:
            await windows.store.start()

    async def shutdown() -> None:
        await mailer.close()
        if windows is not None:
            await windows.close()
        await db.close()

    return wiring.host(
        pipeline,
        startup=startup,
        shutdown=shutdown,
        samples=sample_notifications,
        route=route_to(partitions, config.queue_declare, settings.max_body_bytes)
        if partitions
        else None,
    )


@dataclass(frozen=True)
class Windows:
    """The digests' durable windows and what they hold open."""

    options: DurableWindows
    store: SqlWindowStore
    publisher: Publisher

    async def close(self) -> None:
        await self.publisher.close()
        await self.store.close()


def durable_windows(wiring: Wiring[NotificationsSettings], db: Database) -> Windows:
    """Digest windows kept in the pipeline's database, their dead letters published to the
    queue's dead-letter queue (the first partition's, when partitioned)."""
    assert wiring.options is not None  # durable: from a queue only
    consumed = wiring.options.for_producer(0)
    store = SqlWindowStore(db.engine)
    publisher = wiring.publisher("windows", stamp_publish_time=False)
    dead_letters = PublishedDeadLetters(
        publisher, consumed.dlq_name or f"{consumed.queue}.dlq", consumed.queue
    )
    retry = wiring.config.retry_policy(RETRY)
    options = DurableWindows(
        store,
        dead_letters,
        max_attempts=retry.max_attempts,
        delays=retry.delays,
        claim_limit=CLAIM_LIMIT,
    )
    return Windows(options, store, publisher)


def route_to(
    partitions: Partitions, declare_of: Callable[[str], QueueDeclare], max_body_bytes: int
) -> Route:
    """`ingest publish notifications` through the partitions' exchange, keyed by each
    payload's recipient (an invalid payload goes out keyless and is dead-lettered by its
    consumer, as from a queue)."""

    def message(body: bytes) -> OutgoingMessage:
        try:
            recipient = parse_notification(body, max_body_bytes).recipient
        except PayloadError:
            recipient = ""
        return partitions.message(body, recipient, message_id=uuid.uuid4().hex)

    return Route(message, partitions.publisher_hook(declare_of), partitions.exchange)
