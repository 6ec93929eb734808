"""Service benchmark (issue 11): the bookings and notifications pipelines as `ingest run`
hosts them, against the bare aiormq drain of the same run, with what each message costs the
service, RabbitMQ and PostgreSQL in CPU.

Scenarios (each fills its own queue, then drains it in a fresh process):
  bare_aiormq                    the baseline: aiormq consumer, prefetch 1000, ack every 100
  bare_aiormq_confirmed_publish  the same, plus one confirmed persistent publish per message
                                 (awaited per 100): the broker-CPU reference for a booking
  bookings_postgresql            the bookings pipeline end to end: users looked up, tickets
                                 inserted in a database made for the run, one notification
                                 per ticket published with confirms (skipped, saying why,
                                 when PostgreSQL is unreachable)
  bookings_sqlite                the same on SQLite
  bookings_by_hand_postgresql    the same work written by hand (bench/by_hand.py: aiormq and
                                 asyncpg, the pipeline's window, batch sizes and batches in
                                 flight, nothing else): what one process of Python does
                                 with this shape here, and so what the pipeline adds
  bookings_postgresql_x2         the same in two processes on one queue, as
                                 `ingest run --workers 2` (bookings_sqlite_x2 without
                                 PostgreSQL)
  notifications_durable          --notifications notifications for each --recipients count,
                                 as digests to an aiosmtpd server in a process of its own,
                                 with durable windows (the default: open windows kept in a
                                 PostgreSQL database made for the run, SQLite when it is
                                 unreachable); one row per count, e.g.
                                 notifications_durable_1000
  notifications_in_memory        the same with durable_windows false: the in-memory batcher,
                                 whose windows the prefetch bounds (the "before" figure)

One JSON line per scenario, then a Markdown table: msgs_per_s, ratio_to_bare (to
bare_aiormq of the same run), service_cpu_us_per_msg (the draining processes' utime+stime),
broker_cpu_us_per_msg (RabbitMQ's Erlang VM over the drain, not the fill; with the broker
on this machine, its quorum-queue WAL is rolled over before each fill, so that no drain
pays for the runs before it: wal_roll_overs_in_drain says how many came anyway, 0 unless
--keep-wal; bench/_raft_wal.py),
machine_idle_pct (the share of all the machine's cores' time spent idle over the drain:
the room left for more throughput; near 0, the rate is set by CPU, not by waits),
service_busy_cores (the service's CPU seconds per second of the drain), loop_run_pct,
loop_runqueue_pct and loop_waited_pct (one process: the share of the drain its event
loop's thread ran, waited for a core, and had nothing to do, waiting for the broker or
the database), peak_rss_mb
(imported_rss_mb: the drain process's RSS once the service's modules are imported, before
anything runs), and per scenario what it checks. Timed from the start of the drain to its
last acknowledgement.

Notifications are timed from the first delivery. With durable windows the drain (the
acknowledgements) ends long before the last digest, so three figures: msgs_per_s, the
notifications acknowledged per second up to the last acknowledgement (what decides whether
the queue piles up); mailed_msgs_per_s, to the last digest the SMTP server received, less
the last window's batch timeout; all_mailed_s, first delivery to last digest. The drain
process stays up until every notification was mailed (or --mail-timeout), and its CPU and
peak RSS cover that whole time, flushes included. Checked from the digests received:
every notification in exactly one digest (missing, repeated, wrong_recipient), digests per
recipient, Message-IDs received more than once (resent_message_ids), and
most_partial_digests_in_one_window: for each recipient, the most digests smaller than the
batch size (closed by timeout) received within 0.9 batch timeouts; 1 is one digest per
recipient per window. ratio_to_bookings is msgs_per_s over the bookings' of the same run.

    python bench/service.py [--messages 100000] [--notifications 100000]
                            [--recipients 1000 [10000 ...]] [--notifications-prefetch N]
                            [--mail-timeout 300] [--queue-type quorum|classic]
                            [--scenario NAME ...] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.server
import importlib
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import _raft_wal as raft_wal
import aiormq
from _common import (
    Probe,
    broker_background_pct,
    cpu_seconds,
    delete_queues,
    fill_queue,
    find_broker_pid,
    peak_rss_mb,
    postgres_database,
    postgres_unreachable,
    rss_mb,
)
from rabbitmq import ACK_EVERY, PREFETCH, Latencies, bare_aiormq

OPEN_EVENTS = ("cinema", "musical")  # no closed events: every booking becomes a ticket
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REF = re.compile(r"\(ref ([^)\s]+)\)")  # pipelines.mail.digest: one line per notification


@dataclass(frozen=True)
class Drain:
    """What a drain process is given (as JSON on its command line)."""

    url: str
    queue: str
    count: int
    pipeline: str = "bookings"
    database_url: str = ""
    smtp_url: str = ""
    prefetch: int | None = None  # notifications: None is the pipeline's own (100)
    queue_type: str = "quorum"
    durable_windows: bool = True  # notifications: INGEST_PIPELINES__..__DURABLE_WINDOWS
    smtp_record: str = ""  # notifications: the SMTP recorder's file, read until all mailed
    mail_timeout: float = 300.0  # notifications: the most to wait for it after the drain
    # bookings: settings on top of the pipeline's own (`--bookings prefetch_count=1500`)
    bookings: dict[str, Any] = field(default_factory=dict)
    # bookings by hand: the pipeline's window and {batcher: [batch size, in flight]}
    prefetch_by_hand: int = 0
    batchers_by_hand: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def notifications_queue(self) -> str:
        return self.queue if self.pipeline == "notifications" else f"{self.queue}-notifications"


# --- drains: each runs in a process of its own and returns its scenario's own fields ---


async def bare(drain: Drain, probe: Probe) -> dict[str, Any]:
    await bare_aiormq(drain.url, drain.queue, drain.count, Latencies())
    return {}


async def bare_confirmed_publish(drain: Drain, probe: Probe) -> dict[str, Any]:
    """The bare consumer, publishing per message one persistent notification like the
    bookings pipeline's; each hundred is confirmed, then acknowledged, in order."""
    connection = await aiormq.connect(drain.url)
    consuming = await connection.channel()
    publishing = await connection.channel(publisher_confirms=True)
    await declare_notifications_queue(drain, publishing)
    await consuming.basic_qos(prefetch_count=PREFETCH)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    received = 0
    window: list[Awaitable[Any]] = []
    previous: asyncio.Future[None] | None = None

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal received, previous
        received += 1
        booking = message.header.properties.message_id
        body = {"type": "email", "recipient": "foo@email.com", "event": "cinema", "user_id": 1}
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=2, message_id=f"{booking}/notification", content_type="application/json"
        )
        window.append(
            publishing.basic_publish(
                json.dumps({**body, "booking": booking}).encode(),
                routing_key=drain.notifications_queue,
                properties=properties,
            )
        )
        last = received == drain.count
        if received % ACK_EVERY and not last:
            return
        batch = window[:]
        window.clear()
        before, previous = previous, loop.create_future()
        mine = previous
        await asyncio.gather(*batch)
        if before is not None:
            await before  # a multiple ack must not cover an earlier, unconfirmed window
        await consuming.basic_ack(message.delivery_tag, multiple=True)  # type: ignore[arg-type]
        mine.set_result(None)
        if last:
            done.set()

    await consuming.basic_consume(drain.queue, on_message)
    await done.wait()
    await probe.stop()
    await connection.close()
    return {}


async def declare_notifications_queue(drain: Drain, channel: aiormq.abc.AbstractChannel) -> None:
    """The notifications queue, of the run's queue type, as the bookings pipeline's
    start-up declares it."""
    from ingest.service.settings import PipelineSettings

    declare = PipelineSettings.model_validate({"queue_type": drain.queue_type}).queue_declare(
        drain.notifications_queue
    )
    await channel.queue_declare(
        drain.notifications_queue, durable=True, arguments=dict(declare.arguments)
    )


class Progress:
    """What a pipeline's acknowledgers settled, read off its events."""

    def __init__(self, count: int, on_settled: Callable[[int], None] | None = None) -> None:
        self.count = count
        self.on_settled = on_settled
        self.failed = 0
        self.settled = 0
        self.first_delivery: float | None = None
        self.first_delivery_at = 0.0  # the same on the wall clock, as the SMTP server's
        self.last_processed = 0.0
        self.drained = 0.0  # the last acknowledgement
        self.done = asyncio.Event()

    def on_event(self, event: Any) -> None:
        if event.kind == "processor.start" and self.first_delivery is None:
            self.first_delivery = time.perf_counter()
            self.first_delivery_at = time.time()
        elif event.kind == "processor.stop":
            self.last_processed = time.perf_counter()
        elif event.kind == "ack":
            self.failed += event.failed
            self.settled += event.successful + event.failed
            if self.on_settled is not None:
                self.on_settled(event.successful + event.failed)
            if self.settled >= self.count and not self.done.is_set():
                self.drained = time.perf_counter()
                self.done.set()


async def hosted(
    drain: Drain,
    progress: Progress,
    stopped: Callable[[], Awaitable[None]],
    stop: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Run the pipeline as `ingest run` builds it until `progress` is done (or `stop()`),
    then call `stopped` before anything is torn down. Return the ack frames its producer
    sent, of each kind."""
    from ingest.service import garbage, tracing
    from ingest.service.hosting import build
    from ingest.service.logging import FAILURE_EVENTS, log_failures
    from ingest.service.metrics import Metrics
    from ingest.service.settings import Settings

    # As `ingest run`: traced when the OTEL_* variables say (`--traced`), before the
    # publishers are built.
    traced = tracing.start()

    settings = Settings(
        amqp_url=drain.url,
        database_url=drain.database_url,
        smtp_url=drain.smtp_url or None,
        pipelines={
            "bookings": {"queue": drain.queue, "queue_type": drain.queue_type, **drain.bookings},
            "notifications": {
                "queue": drain.notifications_queue,
                "queue_type": drain.queue_type,
                "prefetch_count": drain.prefetch,
                "durable_windows": drain.durable_windows,
            },
        },
    )
    item = build(settings, [drain.pipeline])[drain.pipeline]
    assert item.startup is not None
    assert item.shutdown is not None
    await item.startup()
    try:
        # As `serve()` does: the service's metrics and failure log watch the pipeline.
        Metrics().watch(item.pipeline, item.ready, item.stats, item.prefetch)
        item.pipeline.events.subscribe(log_failures, kinds=FAILURE_EVENTS)
        if traced is not None:
            traced.watch(item.pipeline, item.queue)
        item.pipeline.events.subscribe(
            progress.on_event, kinds={"processor.start", "processor.stop", "ack"}
        )
        async with item.pipeline:
            garbage.settle()  # as `serve()` does once the pipelines run
            if stop is None:
                await progress.done.wait()
            else:
                while not stop():  # noqa: ASYNC110 - set by another process
                    await asyncio.sleep(0.01)
            await stopped()
    finally:
        await item.shutdown()
        tracing.uninstall()
    events = item.stats.events() if item.stats is not None else {}
    return {name: events[name] for name in ACK_FRAMES if name in events}


async def bookings(drain: Drain, probe: Probe) -> dict[str, Any]:
    progress = Progress(drain.count, lambda _: probe.settled(progress.settled, drain.count))
    frames = await hosted(drain, progress, probe.stop)
    return {"failed": progress.failed, **frames, **await bookings_outcome(drain)}


async def bookings_by_hand(drain: Drain, probe: Probe) -> dict[str, Any]:
    from by_hand import Shape
    from by_hand import drain as drain_by_hand

    shape = Shape(drain.prefetch_by_hand, drain.batchers_by_hand)
    await drain_by_hand(
        drain.url,
        drain.queue,
        drain.notifications_queue,
        drain.database_url,
        drain.count,
        shape,
        lambda settled: probe.settled(settled, drain.count),
        probe.stop,
    )
    return await bookings_outcome(drain)


def by_hand_shape(drain: Drain) -> Drain:
    """`drain` with the bookings pipeline's window and batchers as `ingest run` would
    build them for it (queue type and `--bookings` settings included); its database's
    schema and its notifications queue made as the pipeline's start-up makes them."""
    from ingest.service.hosting import build
    from ingest.service.settings import Settings
    from pipelines.db import Database

    settings = Settings(
        amqp_url=drain.url,
        database_url=drain.database_url,
        pipelines={
            "bookings": {"queue": drain.queue, "queue_type": drain.queue_type, **drain.bookings}
        },
    )
    item = build(settings, ["bookings"])["bookings"]
    assert item.prefetch is not None

    async def schema() -> None:
        db = Database(drain.database_url)
        try:
            await db.start()
        finally:
            await db.close()
        connection = await aiormq.connect(drain.url)
        await declare_notifications_queue(drain, await connection.channel())
        await connection.close()

    asyncio.run(schema())
    batchers = {
        name: (int(batcher.batch_size), batcher.concurrency)  # type: ignore[arg-type]
        for name, batcher in item.pipeline.batchers.items()
    }
    return replace(drain, prefetch_by_hand=item.prefetch, batchers_by_hand=batchers)


async def bookings_outcome(drain: Drain) -> dict[str, Any]:
    """Tickets in the database and notifications waiting: one each per booking."""
    from pipelines.db import Database

    db = Database(drain.database_url)
    try:
        tickets = await db.count_tickets()
    finally:
        await db.close()
    connection = await aiormq.connect(drain.url)
    channel = await connection.channel()
    declared = await channel.queue_declare(drain.notifications_queue, passive=True)
    await connection.close()
    return {"tickets": tickets, "notifications_queued": declared.message_count}


def _worker(drain: Drain, counter: Any, stop: Any, reports: Any) -> None:
    import uvloop

    def settled(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    progress = Progress(drain.count, settled)
    cpu: list[float] = []

    async def stopped() -> None:
        cpu.append(cpu_seconds())  # since the fork: all of this worker's

    frames = uvloop.run(hosted(drain, progress, stopped, stop.is_set))
    reports.put((cpu[0], peak_rss_mb(), progress.failed, frames))


async def bookings_two_workers(drain: Drain, probe: Probe) -> dict[str, Any]:
    """Two forked processes competing for the queue, as `ingest run --workers 2` runs
    them (its supervisor only starts, signals and waits for them)."""
    context = multiprocessing.get_context("fork")
    counter, stop, reports = context.Value("q", 0), context.Event(), context.Queue()
    workers = [
        context.Process(target=_worker, args=(drain, counter, stop, reports)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        while counter.value < drain.count:  # counted by other processes
            probe.settled(counter.value, drain.count)
            if not all(worker.is_alive() for worker in workers):
                raise RuntimeError("a bookings worker exited before the queue was drained")
            await asyncio.sleep(0.01)
        await probe.stop()
    finally:
        stop.set()
    failed = 0
    frames: Counter[str] = Counter()  # the ack frames of both
    for _ in workers:
        cpu, peak, worker_failed, worker_frames = reports.get(timeout=120)
        probe.workers_cpu += cpu
        probe.worker_peaks.append(peak)
        failed += worker_failed
        frames.update(worker_frames)
    for worker in workers:
        worker.join()
    return {"workers": 2, "failed": failed, **frames, **await bookings_outcome(drain)}


class MailWatch:
    """Reads the SMTP recorder's file as it grows: how many notifications were mailed
    (refs counted, not kept: a set of them would add to the peak RSS measured)."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.refs = 0
        self._offset = 0

    def read(self) -> int:
        if not self.record.exists():
            return self.refs
        with self.record.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk.rfind(b"\n") + 1  # a line being written waits for the next read
        self._offset += complete
        self.refs += sum(len(json.loads(line)["refs"]) for line in chunk[:complete].splitlines())
        return self.refs

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.read() < count and time.monotonic() < deadline:  # noqa: ASYNC110 - the SMTP server writes it
            await asyncio.sleep(0.1)


async def notifications(drain: Drain, probe: Probe) -> dict[str, Any]:
    """Timed from the first delivery to the last acknowledgement; the pipeline then runs
    on (its flushers mail the windows still open) until every notification was mailed,
    and only then is the probe stopped, so that CPU and RSS include the flushes. The
    in-memory batcher acknowledges a batch after its digest: its last acknowledgement
    comes after the last window's timeout."""
    progress = Progress(drain.count)
    mailed = MailWatch(Path(drain.smtp_record))

    async def all_mailed() -> None:
        await mailed.wait_for(drain.count, drain.mail_timeout)
        await probe.stop()

    await hosted(drain, progress, all_mailed)
    assert progress.first_delivery is not None
    return {
        "seconds": progress.drained - progress.first_delivery,
        "first_delivery_at": progress.first_delivery_at,
        "failed": progress.failed,
        "mailed": mailed.read(),
    }


BY_HAND = "bookings_by_hand_postgresql"
DRAINS: dict[str, Callable[[Drain, Probe], Awaitable[dict[str, Any]]]] = {
    "bare_aiormq": bare,
    "bare_aiormq_confirmed_publish": bare_confirmed_publish,
    "bookings_postgresql": bookings,
    "bookings_sqlite": bookings,
    BY_HAND: bookings_by_hand,
    "bookings_postgresql_x2": bookings_two_workers,
    "notifications_durable": notifications,
    "notifications_in_memory": notifications,
}
SCENARIOS = tuple(DRAINS)
WITHOUT_INGEST = ("bare_aiormq", "bare_aiormq_confirmed_publish", BY_HAND)


def run_drain(scenario: str, drain: Drain, broker_pid: int | None) -> dict[str, Any]:
    """In the drain process: one drain, measured by a probe."""
    import structlog
    import uvloop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if scenario not in WITHOUT_INGEST:
        # Imported before the clock starts, as a running service would have them.
        for module in ("ingest.service.hosting", "pipelines.bookings", "pipelines.notifications"):
            importlib.import_module(module)
    imported = rss_mb()
    postgres = drain.database_url if drain.database_url.startswith("postgresql") else None
    probe = Probe(broker_pid, postgres)

    collecting = GarbageTime()

    async def measured() -> dict[str, Any]:
        await probe.start()
        with collecting:
            extra = await DRAINS[scenario](drain, probe)
        await probe.stop()
        return {**extra, "gc_s": round(collecting.seconds, 3)}

    result = probe.result(drain.count, uvloop.run(measured()))
    return {"scenario": scenario, **result, "imported_rss_mb": round(imported, 1)}


class GarbageTime:
    """The seconds CPython's garbage collector ran in this process while in the block
    (through `gc.callbacks`; forked workers count their own)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> GarbageTime:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


# --- the run: fill, drain in a fresh process, check, clean up ---


def booking_messages(count: int, rng: random.Random) -> list[tuple[bytes, str]]:
    """As `ingest publish bookings --count` makes them (`sample_bookings`), for open events
    only; each message_id starts with the fill's time, so it is unique across runs."""
    stamp = f"{time.time():.6f}"
    return [
        (f"{rng.choice(OPEN_EVENTS)},{rng.randint(1, 3)}".encode(), f"{stamp}/{i}")
        for i in range(count)
    ]


def notification_messages(
    count: int, recipients: int, rng: random.Random
) -> tuple[list[tuple[bytes, str]], dict[str, str]]:
    """Notifications as the bookings pipeline publishes them, the same number for every
    recipient, in random order; and the recipient each message_id must reach."""
    stamp = f"{time.time():.6f}"
    who = [i % recipients for i in range(count)]
    rng.shuffle(who)
    messages: list[tuple[bytes, str]] = []
    expected: dict[str, str] = {}
    for i, user in enumerate(who):
        recipient = f"user{user}@bench.example"
        body = {
            "type": "email",
            "recipient": recipient,
            "event": rng.choice(OPEN_EVENTS),
            "user_id": user + 1,
            "booking": f"{stamp}/{i}",
        }
        message_id = f"{stamp}/{i}/notification"
        messages.append((json.dumps(body).encode(), message_id))
        expected[message_id] = recipient
    return messages, expected


@dataclass
class SmtpServer:
    url: str
    record: Path
    pid: int


@contextlib.contextmanager
def smtp_server(directory: str) -> Iterator[SmtpServer]:
    """This script's `--smtp-server` in a process of its own (its CPU is not the
    service's), recording every digest it receives (see `serve_smtp`)."""
    record = Path(directory) / "digests.jsonl"
    process = subprocess.Popen(
        [sys.executable, __file__, "--smtp-server", str(record)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError("the benchmark's SMTP server did not start: see its error above")
        yield SmtpServer(f"smtp://127.0.0.1:{port}", record, process.pid)
    finally:
        process.terminate()
        process.wait(30)


def serve_smtp(record: str) -> None:
    """The benchmark's SMTP server: each digest's recipient, refs, Message-ID and arrival
    time (epoch seconds), one JSON line each, written before the 250 that lets the
    pipeline acknowledge its notifications (or complete their window)."""
    import email
    import email.policy

    import uvloop
    from aiosmtpd.smtp import SMTP

    with open(record, "a", encoding="utf-8") as file:

        class Recorder:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                refs = REF.findall(message.get_body().get_content())  # type: ignore[union-attr]
                record = {
                    "to": envelope.rcpt_tos,
                    "refs": refs,
                    "message_id": message["Message-ID"],
                    "at": time.time(),
                }
                file.write(json.dumps(record) + "\n")
                file.flush()
                return "250 OK"

        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: SMTP(Recorder(), hostname="bench.local"), "127.0.0.1", 0
            )
            print(server.sockets[0].getsockname()[1], flush=True)
            await asyncio.Future()  # until terminated

        uvloop.run(main())


def read_digests(record: Path) -> list[dict[str, Any]]:
    """The digests the SMTP recorder received, in their order of arrival."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def check_digests(
    digests: list[dict[str, Any]], expected: dict[str, str], batch_size: int, batch_timeout: float
) -> dict[str, Any]:
    """Every notification in exactly one digest, to its recipient; digests per recipient
    (of those expected); Message-IDs received more than once; and the most partial digests
    of one recipient within one window (see `most_partial_in_one_window`)."""
    seen: Counter[str] = Counter()
    wrong_recipient = 0
    for digest in digests:
        for ref in digest["refs"]:
            seen[ref] += 1
            wrong_recipient += digest["to"] != [expected.get(ref)]
    message_ids = Counter(digest.get("message_id") for digest in digests)
    return {
        "digests": len(digests),
        "digests_per_recipient": round(len(digests) / max(1, len(set(expected.values()))), 2),
        "most_partial_digests_in_one_window": most_partial_in_one_window(
            digests, batch_size, 0.9 * batch_timeout
        ),
        "resent_message_ids": sum(1 for n in message_ids.values() if n > 1),
        "every_notification_once": seen.keys() == expected.keys()
        and all(n == 1 for n in seen.values()),
        "missing": len(expected.keys() - seen.keys()),
        "repeated": sum(n - 1 for n in seen.values()),
        "wrong_recipient": wrong_recipient,
    }


def most_partial_in_one_window(digests: list[dict[str, Any]], batch_size: int, span: float) -> int:
    """For each recipient, among its digests of fewer than `batch_size` notifications
    (closed by timeout, not by size), the most that arrived within any `span` seconds; the
    largest over the recipients. With `span` a little under the batch timeout, 1 means one
    digest per recipient per window, more that a window was cut into several digests."""
    arrivals: dict[str, list[float]] = defaultdict(list)
    for digest in digests:
        if len(digest["refs"]) < batch_size:
            arrivals[str(digest["to"])].append(digest["at"])
    most = 0
    for stamps in arrivals.values():
        stamps.sort()
        start = 0
        for end, stamp in enumerate(stamps):
            while stamp - stamps[start] > span:
                start += 1
            most = max(most, end - start + 1)
    return most


def email_batcher() -> tuple[int, float]:
    """The notifications pipeline's digest batcher: its batch size and timeout."""
    from pipelines.notifications import BATCHERS

    email = BATCHERS["email"]
    assert isinstance(email.batch_size, int)
    return email.batch_size, email.batch_timeout


@dataclass
class Run:
    url: str
    postgres: str
    messages: int
    notifications: int
    recipients: list[int]
    notifications_prefetch: int | None = None
    queue_type: str = "quorum"
    mail_timeout: float = 300.0
    bookings: dict[str, Any] = field(default_factory=dict)
    broker_pid: int | None = None
    keep_wal: bool = False
    postgres_error: str | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(11))


def drain_process(scenario: str, drain: Drain, broker_pid: int | None) -> dict[str, Any]:
    """Run one drain in a fresh process, in a session of its own so that nothing of it
    (forked workers included) outlives a failure or a timeout."""
    command = [sys.executable, __file__, "--drain", scenario, json.dumps(asdict(drain))]
    if broker_pid is not None:
        command += ["--broker-pid", str(broker_pid)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_CONFIG"] = os.devnull + ".toml"  # no config/ingest.toml of this checkout
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=600 + drain.count / 25)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode:
        raise RuntimeError(f"the {scenario} drain exited with {process.returncode}")
    return dict(json.loads(output.strip().splitlines()[-1]))


@dataclass
class Job:
    """One row of the table: the drain to run (a key of DRAINS), what it is given, the
    messages to fill its queue with and, for notifications, what to check them against."""

    scenario: str
    label: str
    drain: Drain
    messages: list[tuple[bytes, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    smtp: SmtpServer | None = None
    expected: dict[str, str] = field(default_factory=dict)


def run_scenario(run: Run, scenario: str, recipients: int = 0) -> dict[str, Any]:
    """Fill a queue of its own, drain it, check; whatever happens, delete the queues,
    databases and processes made for it."""
    with contextlib.ExitStack() as cleanup:
        queue = f"bench-{scenario}-{uuid.uuid4().hex[:8]}"
        cleanup.callback(delete_queues, run.url, [queue, f"{queue}-notifications"])
        directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ingest-bench-"))
        if scenario.startswith("notifications"):
            job = notifications_job(run, scenario, recipients, queue, directory, cleanup)
        else:
            job = bookings_job(run, scenario, queue, directory, cleanup)
        return run_job(run, job)


def database_for(
    run: Run, postgres: bool, directory: str, cleanup: contextlib.ExitStack
) -> tuple[str, str]:
    """The URL and dialect of a database made for the run: on PostgreSQL when `postgres`
    and it is reachable, else SQLite in `directory`."""
    if postgres and not run.postgres_error:
        return cleanup.enter_context(postgres_database(run.postgres)), "postgresql"
    return f"sqlite+aiosqlite:///{directory}/tickets.db", "sqlite"


def bookings_job(
    run: Run, scenario: str, queue: str, directory: str, cleanup: contextlib.ExitStack
) -> Job:
    """The bare drains and the bookings pipeline (on SQLite, and so labelled, when
    PostgreSQL is unreachable)."""
    drain = Drain(run.url, queue, run.messages, queue_type=run.queue_type, bookings=run.bookings)
    job = Job(scenario, scenario, drain, booking_messages(run.messages, run.rng))
    if scenario.startswith("bookings"):
        url, database = database_for(run, "postgresql" in scenario, directory, cleanup)
        job.label = scenario.replace("postgresql", database)
        job.drain = replace(drain, pipeline="bookings", database_url=url)
        job.extra = {"database": database}
    if scenario == BY_HAND:
        job.drain = by_hand_shape(job.drain)
    return job


def notifications_job(
    run: Run,
    scenario: str,
    recipients: int,
    queue: str,
    directory: str,
    cleanup: contextlib.ExitStack,
) -> Job:
    """The notifications pipeline on PostgreSQL (SQLite, saying so, when unreachable),
    with or without durable windows, mailing to an SMTP recorder of its own."""
    url, database = database_for(run, True, directory, cleanup)
    smtp = cleanup.enter_context(smtp_server(directory))
    durable = scenario == "notifications_durable"
    drain = Drain(
        run.url,
        queue,
        run.notifications,
        "notifications",
        url,
        smtp.url,
        run.notifications_prefetch,
        run.queue_type,
        durable_windows=durable,
        smtp_record=str(smtp.record),
        mail_timeout=run.mail_timeout,
    )
    messages, expected = notification_messages(run.notifications, recipients, run.rng)
    extra: dict[str, Any] = {
        "recipients": recipients,
        "prefetch": run.notifications_prefetch or "default (100)",
        "database": database,
        "durable_windows": durable,
    }
    if run.postgres_error:
        extra["on_sqlite_because"] = run.postgres_error
        print(f"{scenario}: on SQLite, {run.postgres_error}", file=sys.stderr)
    return Job(scenario, f"{scenario}_{recipients}", drain, messages, extra, smtp, expected)


def run_job(run: Run, job: Job) -> dict[str, Any]:
    queue, count = job.drain.queue, job.drain.count
    local = run.broker_pid is not None  # rabbitmqctl talks to this machine's broker
    rolled = local and not run.keep_wal and raft_wal.roll_over()
    print(f"{job.label}: filling {queue} with {len(job.messages)} messages", file=sys.stderr)
    content_type = "application/json" if job.smtp else None
    asyncio.run(fill_queue(run.url, queue, job.messages, content_type, run.queue_type))
    job.messages = []  # not kept through the drain
    wal_before = raft_wal.last_file() if local else None
    background = broker_background_pct(run.broker_pid)
    print(f"{job.label}: draining", file=sys.stderr)
    smtp_cpu = cpu_seconds(job.smtp.pid) if job.smtp else 0.0
    drained = drain_process(job.scenario, job.drain, run.broker_pid)
    wal_after = raft_wal.last_file() if local else None
    result = {**drained, "scenario": job.label, **job.extra}
    result["broker_background_cpu_pct"] = background
    result["wal_rolled_over_before_fill"] = rolled
    if wal_before is not None and wal_after is not None:
        result["wal_roll_overs_in_drain"] = wal_after - wal_before
    if job.smtp is not None:
        smtp_cpu = cpu_seconds(job.smtp.pid) - smtp_cpu
        result["smtp_server_cpu_us_per_msg"] = round(smtp_cpu * 1e6 / count, 1)
        result.update(mail_figures(job, result.pop("first_delivery_at")))
    return result


def mail_figures(job: Job, first_delivery_at: float) -> dict[str, Any]:
    """The digest checks, and the times to the last digest: all_mailed_s from the first
    delivery, and mailed_msgs_per_s without the last window's batch timeout (a wait for
    notifications that never came, not work)."""
    assert job.smtp is not None
    batch_size, batch_timeout = email_batcher()
    digests = read_digests(job.smtp.record)
    figures = check_digests(digests, job.expected, batch_size, batch_timeout)
    if not digests:
        return figures
    all_mailed = max(digest["at"] for digest in digests) - first_delivery_at
    figures["all_mailed_s"] = round(all_mailed, 2)
    figures["mailed_msgs_per_s"] = round(job.drain.count / max(1e-3, all_mailed - batch_timeout))
    figures["digests_per_s"] = round(len(digests) / all_mailed, 1)
    return figures


# The acknowledger's frames (bookings): one settling a run of delivery tags, one each.
ACK_FRAMES = ("multiple_ack_frames", "single_ack_frames")
TABLE = (
    ("scenario", "scenario"),
    ("msgs/s", "msgs_per_s"),
    ("ratio to bare", "ratio_to_bare"),
    ("service CPU µs/msg", "service_cpu_us_per_msg"),
    ("broker CPU µs/msg", "broker_cpu_us_per_msg"),
    ("machine idle %", "machine_idle_pct"),
    ("service busy cores", "service_busy_cores"),
    ("peak RSS MB", "peak_rss_mb"),
)
NOTES = (
    "loop_run_pct",
    "loop_runqueue_pct",
    "loop_waited_pct",
    "steady_msgs_per_s",
    "steady_machine_idle_pct",
    "steady_service_busy_cores",
    "steady_loop_run_pct",
    "steady_loop_runqueue_pct",
    "steady_loop_waited_pct",
    "gc_s",
    *ACK_FRAMES,
    "imported_rss_mb",
    "postgres_cpu_us_per_msg",
    "broker_cpu_ratio_to_confirmed_publish",
    "tickets",
    "notifications_queued",
    "failed",
    "recipients",
    "database",
    "ratio_to_bookings",
    "mailed_msgs_per_s",
    "all_mailed_s",
    "every_notification_once",
    "missing",
    "repeated",
    "wrong_recipient",
    "digests",
    "digests_per_s",
    "digests_per_recipient",
    "most_partial_digests_in_one_window",
    "resent_message_ids",
    "smtp_server_cpu_us_per_msg",
    "on_sqlite_because",
    "broker_background_cpu_pct",
    "wal_rolled_over_before_fill",
    "wal_roll_overs_in_drain",
    "skipped",
    "error",
)


def compare(rows: list[dict[str, Any]]) -> None:
    """Ratios to the bare drain's throughput, the bookings' broker CPU to that of the
    bare consumer with one confirmed publish per message (the bound issue 11 sets), and
    the notifications' throughput to the bookings' (issue 19: at least as fast, so that a
    burst of bookings does not pile up in the notifications queue)."""
    by_name = {row["scenario"]: row for row in rows}
    bare_rate = by_name.get("bare_aiormq", {}).get("msgs_per_s")
    reference = by_name.get("bare_aiormq_confirmed_publish", {}).get("broker_cpu_us_per_msg")
    bookings = by_name.get("bookings_postgresql") or by_name.get("bookings_sqlite") or {}
    for row in rows:
        if bare_rate and "msgs_per_s" in row:
            row["ratio_to_bare"] = round(row["msgs_per_s"] / bare_rate, 2)
        if bookings.get("msgs_per_s") and row["scenario"].startswith("notifications"):
            row["ratio_to_bookings"] = round(row["msgs_per_s"] / bookings["msgs_per_s"], 2)
        if reference and row["scenario"].startswith("bookings") and "broker_cpu_us_per_msg" in row:
            row["broker_cpu_ratio_to_confirmed_publish"] = round(
                row["broker_cpu_us_per_msg"] / reference, 2
            )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join([*(title for title, _ in TABLE), "notes"]) + " |",
        "|" + "---|" * (len(TABLE) + 1),
    ]
    for row in rows:
        cells = ["—" if row.get(key) is None else str(row[key]) for _, key in TABLE]
        notes = "; ".join(f"{key} {json.dumps(row[key])}" for key in NOTES if key in row)
        lines.append("| " + " | ".join([*cells, notes]) + " |")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--notifications", type=int, default=100_000)
    parser.add_argument(
        "--recipients",
        type=int,
        nargs="+",
        default=[1_000],
        help="recipients of the notifications; several counts give a row each (1000)",
    )
    parser.add_argument(
        "--mail-timeout",
        type=float,
        default=300.0,
        help="notifications: the most seconds to wait for the last digests after the drain",
    )
    parser.add_argument(
        "--queue-type",
        choices=("quorum", "classic"),
        default="quorum",
        help="the work queues' type, as INGEST_PIPELINES__<NAME>__QUEUE_TYPE (quorum)",
    )
    parser.add_argument(
        "--notifications-prefetch",
        type=int,
        help="the notifications pipeline's prefetch_count (default: its own, 100)",
    )
    parser.add_argument(
        "--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument("--postgres", default=os.environ.get("POSTGRES_URL", POSTGRES_URL))
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument(
        "--bookings",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a setting of the bookings pipeline, its path dotted as in INGEST_PIPELINES__"
        "BOOKINGS__...: prefetch_count=1500, batchers.cinema.concurrency=4",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="drain with tracing on: OTLP/HTTP to a sink this script runs, which counts "
        "what it receives (every span is made and exported; nothing is stored)",
    )
    parser.add_argument(
        "--keep-wal",
        action="store_true",
        help="do not roll RabbitMQ's quorum-queue WAL over before each fill: a drain then "
        "pays, about one run in six, for the roll-over the runs before it caused",
    )
    parser.add_argument("--drain", nargs=2, metavar=("SCENARIO", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--smtp-server", metavar="RECORD", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_all(run: Run, scenarios: list[str]) -> list[dict[str, Any]]:
    """A row per scenario, and per recipient count for the notifications."""
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        if scenario in ("bookings_postgresql", BY_HAND) and run.postgres_error:
            rows.append({"scenario": scenario, "skipped": run.postgres_error})
            print(f"{scenario}: skipped, {run.postgres_error}", file=sys.stderr)
            continue
        notifications = scenario.startswith("notifications")
        for recipients in run.recipients if notifications else [0]:
            label = f"{scenario}_{recipients}" if notifications else scenario
            try:
                rows.append(run_scenario(run, scenario, recipients))
            except Exception as exc:
                rows.append({"scenario": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{label}: failed, {exc!r}", file=sys.stderr)
    compare(rows)
    return rows


class OtlpSink(http.server.BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports and counts them (`received`: requests, bytes)."""

    received: ClassVar[list[int]] = [0, 0]

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", 0))
        self.rfile.read(size)
        OtlpSink.received[0] += 1
        OtlpSink.received[1] += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def otlp_sink() -> http.server.ThreadingHTTPServer:
    """An OTLP/HTTP sink in a thread of this process; the drains export to it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtlpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{server.server_port}"
    os.environ["OTEL_SERVICE_NAME"] = "ingest-bench"
    return server


def bookings_settings(given: list[str]) -> dict[str, Any]:
    """`--bookings` options as the nested settings they name."""
    settings: dict[str, Any] = {}
    for item in given:
        path, _, value = item.partition("=")
        *parents, key = path.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = json.loads(value)
    return settings


def main() -> None:
    args = arguments()
    if args.smtp_server:
        serve_smtp(args.smtp_server)
        return
    if args.drain:
        scenario, given = args.drain
        print(json.dumps(run_drain(scenario, Drain(**json.loads(given)), args.broker_pid)))
        return
    # SIGTERM as Ctrl-C: the queues, databases and processes made so far are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run = Run(
        args.url,
        args.postgres,
        args.messages,
        args.notifications,
        args.recipients,
        args.notifications_prefetch,
        args.queue_type,
        args.mail_timeout,
        bookings_settings(args.bookings),
    )
    run.broker_pid = find_broker_pid()
    run.keep_wal = args.keep_wal
    sink = otlp_sink() if args.traced else None
    scenarios = args.scenario or list(SCENARIOS)
    if any("postgresql" in name or name.startswith("notifications") for name in scenarios):
        run.postgres_error = postgres_unreachable(args.postgres)
    rows = run_all(run, scenarios)
    for row in rows:
        print(json.dumps(row), flush=True)
    print()
    print(table(rows))
    if sink is not None:
        requests, size = OtlpSink.received
        print(f"\nTraced: the OTLP sink received {requests} export(s), {size / 1e6:.1f} MB.")
        sink.shutdown()
    if run.broker_pid is None:
        print("\nNo RabbitMQ (beam.smp) process on this machine: no broker CPU figures.")
    sys.exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()
