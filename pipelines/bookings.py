"""The bookings pipeline (the book's tickets app): parse, check availability, batch per
event, insert tickets idempotently, publish one notification per ticket."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import orjson
from pydantic import Field

from ingest import Batcher, BatchInfo, Handlers, Message, Processors
from ingest.rabbitmq import OutgoingMessage, Partitions, Publisher, RetryPolicy
from ingest.service.declaration import Declaration
from ingest.service.hosted import HostedPipeline
from ingest.service.settings import PipelineSettings, Settings
from ingest.service.upload_form import UploadForm
from pipelines.db import Database, TicketRow
from pipelines.mail import mailer_for, sender_of
from pipelines.notifications import NOTIFICATIONS, partitions_of
from pipelines.payloads import Booking, PayloadError, parse_booking
from pipelines.uploads import FileUploads

QUEUE = "bookings_queue"
JSON = "application/json"
ROUTED_EVENTS = ("cinema", "musical")
# Four batch processors per batcher: a batch waits about 7 ms for its INSERT's commit and
# 15-20 ms for its notifications' confirms, and the next ones are on their way meanwhile.
# With two, every batch processor was waiting and the service idle for a quarter of a
# drain; four drained 3-17 % faster in four alternated pairs (docs/PERFORMANCE.md).
BATCHERS = {
    "cinema": Batcher(batch_size=75, batch_timeout=1.0, concurrency=4),
    "musical": Batcher(batch_size=100, batch_timeout=1.0, concurrency=4),
    "default": Batcher(batch_size=50, batch_timeout=1.0, concurrency=4),
}
# On classic queues the broker spends more per booking (62 against 36 µs here) and the
# service waited: the four batch processors of the busiest batcher were all busy (a batch
# took 45-48 ms, its confirms 34), and the service slept a fifth of a drain with the rest
# of the window queued behind them (docs/PERFORMANCE.md). Eight each, within a smaller
# window (what it holds then waits in batch processors rather than in the intake): 5-14 %
# faster in three alternated pairs, the same peak RSS. On quorum queues the service was
# already busy or waiting for a core 97-99 % of a drain, and eight were not faster (2 of
# 6 pairs), so they keep four.
CLASSIC_BATCHERS = {name: replace(batcher, concurrency=8) for name, batcher in BATCHERS.items()}
CLASSIC_PREFETCH = 3_225
RETRY = RetryPolicy(max_attempts=5, delays=(1.0, 5.0, 15.0, 30.0))
SAMPLE_EVENTS = ("cinema", "musical", "spectaculars")


class Notifier(Protocol):
    async def notify(self, messages: list[OutgoingMessage]) -> None: ...


class QueueNotifier:
    """Publishes notifications to the notifications pipeline's queue, with confirms: a
    batch's notifications go out in one write and `notify` returns once the broker
    confirmed every one, else raises `PublishError` (the batch fails and is retried)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def notify(self, messages: list[OutgoingMessage]) -> None:
        await self.publisher.publish_batch(messages)


class FileNotifier:
    """Without a broker: notifications to send are written as JSON lines to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def notify(self, messages: list[OutgoingMessage]) -> None:
        lines = [
            json.dumps({"message_id": m.message_id, **json.loads(m.body)}) + "\n" for m in messages
        ]
        await asyncio.to_thread(self._append, "".join(lines))

    def _append(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(text)


class Ticket:
    """A booking on its way through the pipeline: what was asked, by whom."""

    __slots__ = ("booking", "email", "message_id")

    def __init__(self, booking: Booking, message_id: str) -> None:
        self.booking = booking
        self.message_id = message_id
        self.email = ""


# A notification's body, recipient, message id and booking made into what is published:
# to the notifications queue, or through its partitions' exchange, keyed by the recipient;
# published for the booking (`cause`), it goes on in the booking's trace.
Address = Callable[[bytes, str, str, Message], OutgoingMessage]


def to_queue(queue: str) -> Address:
    def address(body: bytes, recipient: str, message_id: str, cause: Message) -> OutgoingMessage:
        return OutgoingMessage(body, queue, message_id=message_id, content_type=JSON, cause=cause)

    return address


def to_partitions(partitions: Partitions) -> Address:
    def address(body: bytes, recipient: str, message_id: str, cause: Message) -> OutgoingMessage:
        return partitions.message(
            body, recipient, message_id=message_id, content_type=JSON, cause=cause
        )

    return address


class BookingHandlers(Handlers):
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        address: Address,
        closed_events: set[str],
        max_body_bytes: int,
    ) -> None:
        self.db = db
        self.notifier = notifier
        self.address = address
        self.closed_events = closed_events
        self.max_body_bytes = max_body_bytes

    async def prepare_messages(self, messages: list[Message], context: Any) -> list[Message]:
        """Parse the chunk, then load every user it names with one query."""
        for message in messages:
            try:
                booking = parse_booking(message.data, self.max_body_bytes)
            except PayloadError as error:
                message.failed(str(error))
                continue
            message_id = message.metadata.get("message_id") or f"generated:{uuid.uuid4().hex}"
            message.data = Ticket(booking, message_id)
        parsed = [m for m in messages if m.is_ok]
        emails = await self.db.emails_of(m.data.booking.user_id for m in parsed)
        for message in parsed:
            ticket: Ticket = message.data
            email = emails.get(ticket.booking.user_id)
            if email is None:
                message.failed(f"unknown user {ticket.booking.user_id}")
            else:
                ticket.email = email
        return messages

    async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
        event = message.data.booking.event
        if event in self.closed_events:
            return message.failed("bookings-closed")
        return message.put_batcher(event if event in ROUTED_EVENTS else "default")

    async def handle_batch(
        self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
    ) -> list[Message]:
        """One insert for the batch, then its notifications, all confirmed before the
        batch is acknowledged. A redelivered booking inserts nothing but is notified
        again, under the same notification id, which the notifications pipeline
        deduplicates."""
        tickets: list[Ticket] = [m.data for m in messages]
        await self.db.insert_tickets(
            [TicketRow(t.message_id, t.booking.user_id, t.booking.event) for t in tickets]
        )
        await self.notifier.notify(
            [
                self.address(
                    json_body(
                        {
                            "type": "email",
                            "recipient": t.email,
                            "event": t.booking.event,
                            "user_id": t.booking.user_id,
                            "booking": t.message_id,
                        }
                    ),
                    t.email,
                    f"{t.message_id}/notification",
                    message,
                )
                for t, message in zip(tickets, messages, strict=True)
            ]
        )
        return messages


def json_body(value: dict[str, Any]) -> bytes:
    """`value` as JSON by orjson (0.33 against 2.26 µs a notification for `json`), copied
    to its own size: a `bytes` from orjson keeps a buffer of about 4 KB however short it
    is (ijl/orjson#483), and the notifications of the batches in hand would hold 100,000
    of them in 393 MB (16 MB copied; the bookings drain peaked 2-5 MB higher uncopied)."""
    return bytes(memoryview(orjson.dumps(value)))


def sample_bookings(count: int) -> list[bytes]:
    """Random bookings like the book's `send_messages` helper."""
    return [f"{random.choice(SAMPLE_EVENTS)},{random.randint(1, 3)}".encode() for _ in range(count)]


class BookingsSettings(PipelineSettings):
    """`INGEST_PIPELINES__BOOKINGS__...`: the common settings, and the events whose
    bookings are closed (they fail with "bookings-closed")."""

    closed_events: list[str] = Field(default_factory=list)


BOOKINGS = Declaration(
    "bookings",
    queue=QUEUE,
    settings=BookingsSettings,
    # Chunks of up to 200: one users query for each (bench/service.py, five alternated
    # pairs on quorum queues: 51.9 against 57.1 µs of CPU per booking at 50; SQLite 65
    # against 76-84; docs/PERFORMANCE.md). Under light load chunks are smaller anyway.
    processors=Processors(concurrency=2, max_demand=200),
    batchers=BATCHERS,
    retry=RETRY,
    handler_timeout=10.0,
)
# Uploaded files: rows of the same payloads as the queue's.
UPLOADS = UploadForm("bookings", ("event", "user_id"))


@BOOKINGS.factory
def build(settings: Settings, *, source: Path | None = None) -> HostedPipeline:
    classic = source is None and BOOKINGS.config(settings).queue_type == "classic"
    wiring = BOOKINGS.wire(settings, source, prefetch_count=CLASSIC_PREFETCH if classic else None)
    batchers = wiring.batchers(CLASSIC_BATCHERS if classic else BATCHERS)
    # A connection for every hook that may query at once, opened at start-up and kept.
    db = Database(settings.database_url.get_secret_value(), wiring.concurrency(batchers))
    partitions = partitions_of(settings)
    notifications = NOTIFICATIONS.config(settings)
    queue = NOTIFICATIONS.queue_of(settings)
    address = to_partitions(partitions) if partitions else to_queue(queue)
    publisher: Publisher | None = None
    if source is not None:
        notifier: Notifier = FileNotifier(source.with_name(f"{source.stem}.notifications.jsonl"))
    else:
        publisher = wiring.publisher(
            "publisher",
            # What publishing needs, declared even before the notifications consume.
            declare_queues={} if partitions else {queue: notifications.queue_declare(queue)},
            after_connect=partitions.publisher_hook(notifications.queue_declare)
            if partitions
            else None,
        )
        notifier = QueueNotifier(publisher)
    closed = set(wiring.config.closed_events)
    handlers = BookingHandlers(db, notifier, address, closed, settings.max_body_bytes)
    # Uploads from the page go through the same handlers, database and notifier.
    uploads = (
        FileUploads(
            lambda name, producer: wiring.pipeline(
                handlers, producer, name=name, batchers=batchers
            ),
            mailer_for(settings),
            sender_of(settings),
            UPLOADS,
        )
        if source is None
        else None
    )

    async def shutdown() -> None:
        if uploads is not None:
            await uploads.close()
        if publisher is not None:
            await publisher.close()
        await db.close()

    return wiring.host(
        wiring.pipeline(handlers, batchers=batchers),
        startup=db.start,
        shutdown=shutdown,
        samples=sample_bookings,
        uploads=uploads,
    )
