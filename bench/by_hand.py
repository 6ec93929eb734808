"""The bookings pipeline's work written by hand, without ingest: the reference for what
one process of Python does with this shape on this machine (issue 23).

As few steps as the work allows, with the same overlap as the pipeline's defaults: aiormq
consumes with the pipeline's prefetch, bookings are parsed and grouped per event into
batches of the pipeline's sizes, and each batcher has as many batches in flight as the
pipeline has batch processors. A batch looks up its users (one query), inserts its
tickets (one statement, the pipeline's), publishes one persistent notification per ticket
with confirms and, once all are confirmed, is acknowledged: with one `multiple` ack up to
the oldest booking still in flight, and one ack per booking when more than half the window
is done but held behind it. Every second, the batches still filling go as they are.

No retries, no metrics, no events, no tracing, no supervision: what the pipeline spends
beyond this is the framework's; where it waits beyond this, the framework waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiormq
import asyncpg
import orjson

INSERT = (
    "INSERT INTO tickets (message_id, user_id, event)"
    " SELECT * FROM unnest($1::text[], $2::int[], $3::text[])"
    " ON CONFLICT (message_id) DO NOTHING"
)
USERS = "SELECT id, email FROM users WHERE id = ANY($1::bigint[])"
ROUTED = ("cinema", "musical")
BATCH_TIMEOUT = 1.0


@dataclass(frozen=True)
class Shape:
    """The pipeline's window and batchers: name -> (batch size, batches in flight)."""

    prefetch: int
    batchers: Mapping[str, tuple[int, int]]


@dataclass
class Booking:
    tag: int
    message_id: str
    user_id: int
    event: str


class Acks:
    """Delivery tags settled as their batches end: one `multiple` ack up to the oldest
    still in flight; when more than half the window is done behind it, one ack each."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, window: int) -> None:
        self.channel = channel
        self.window = window
        self.done: set[int] = set()
        self.acked_to = 0  # every tag up to here is acknowledged
        self.singly: set[int] = set()  # acknowledged one by one, ahead of acked_to
        self.lock = asyncio.Lock()

    async def settle(self, tags: list[int]) -> None:
        # One batch at a time: a frame sent while another batch's are on their way could
        # acknowledge a tag twice, which closes the channel.
        async with self.lock:
            self.done.update(tags)
            upto, last = self.acked_to, 0  # last: the newest of them not yet acknowledged
            while upto + 1 in self.done:
                upto += 1
                self.done.discard(upto)
                if upto in self.singly:
                    self.singly.discard(upto)
                else:
                    last = upto
            self.acked_to = upto
            if last:
                await self.channel.basic_ack(last, multiple=True)
            held = self.done - self.singly
            if len(self.done) > self.window // 2 and held:
                for tag in sorted(held):
                    await self.channel.basic_ack(tag)
                self.singly |= held


async def drain(
    url: str,
    queue: str,
    notifications_queue: str,
    database_url: str,
    count: int,
    shape: Shape,
    settled: Callable[[int], None],
    stopped: Callable[[], Awaitable[None]],
) -> None:
    """Drain `count` bookings from `queue`; `settled(n)` after each acknowledgement with
    the number settled so far, `stopped()` after the last, before anything is closed."""
    pool = await asyncpg.create_pool(
        database_url.replace("+asyncpg", ""),
        min_size=sum(n for _, n in shape.batchers.values()),
        max_size=sum(n for _, n in shape.batchers.values()),
    )
    connection = await aiormq.connect(url)
    consuming = await connection.channel()
    publishing = await connection.channel(publisher_confirms=True)
    await consuming.basic_qos(prefetch_count=shape.prefetch)
    acks = Acks(consuming, shape.prefetch)
    slots = {name: asyncio.Semaphore(n) for name, (_, n) in shape.batchers.items()}
    open_batches: dict[str, list[Booking]] = {name: [] for name in shape.batchers}
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    done = asyncio.Event()
    received = settled_count = 0

    async def handle(name: str, batch: list[Booking]) -> None:
        nonlocal settled_count
        async with slots[name], pool.acquire() as db:
            rows = await db.fetch(USERS, list({b.user_id for b in batch}))
            emails = {row["id"]: row["email"] for row in rows}
            await db.execute(
                INSERT,
                [b.message_id for b in batch],
                [b.user_id for b in batch],
                [b.event for b in batch],
            )
        await asyncio.gather(
            *(
                publishing.basic_publish(
                    bytes(
                        memoryview(
                            orjson.dumps(
                                {
                                    "type": "email",
                                    "recipient": emails[b.user_id],
                                    "event": b.event,
                                    "user_id": b.user_id,
                                    "booking": b.message_id,
                                }
                            )
                        )
                    ),
                    routing_key=notifications_queue,
                    properties=aiormq.spec.Basic.Properties(
                        delivery_mode=2,
                        message_id=f"{b.message_id}/notification",
                        content_type="application/json",
                    ),
                )
                for b in batch
            )
        )
        await acks.settle([b.tag for b in batch])
        settled_count += len(batch)
        settled(settled_count)
        if settled_count == count:
            done.set()

    def close(name: str) -> None:
        batch, open_batches[name] = open_batches[name], []
        if batch:
            task = asyncio.create_task(handle(name, batch))
            in_flight.add(task)
            task.add_done_callback(ended)

    def ended(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            done.set()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal received
        received += 1
        event, _, user = message.body.decode().partition(",")
        name = event if event in ROUTED else "default"
        booking = Booking(
            message.delivery_tag or 0, message.header.properties.message_id or "", int(user), event
        )
        open_batches[name].append(booking)
        if len(open_batches[name]) >= shape.batchers[name][0]:
            close(name)
        if received == count:
            for other in open_batches:
                close(other)

    async def timeouts() -> None:
        while True:
            await asyncio.sleep(BATCH_TIMEOUT)
            for name in open_batches:
                close(name)

    ticking = asyncio.create_task(timeouts())
    await consuming.basic_consume(queue, on_message)
    try:
        finished = asyncio.ensure_future(done.wait())
        closed = (consuming.closing, publishing.closing)
        await asyncio.wait((finished, *closed), return_when=asyncio.FIRST_COMPLETED)
        if failures:
            raise failures[0]
        if not done.is_set():
            finished.cancel()
            raise RuntimeError(f"a channel closed: {[c.exception() for c in closed if c.done()]}")
        await stopped()
    finally:
        ticking.cancel()
        await connection.close()
        await pool.close()
