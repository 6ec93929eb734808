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
  bookings_postgresql_x2         the same in two processes on one queue, as
                                 `ingest run --workers 2` (bookings_sqlite_x2 without
                                 PostgreSQL)
  notifications_smtp             --notifications notifications for --recipients recipients,
                                 sent as digests to an aiosmtpd server in a process of its
                                 own; checks that each is in exactly one digest

One JSON line per scenario, then a Markdown table: msgs_per_s, ratio_to_bare (to
bare_aiormq of the same run), service_cpu_us_per_msg (the draining processes' utime+stime),
broker_cpu_us_per_msg (RabbitMQ's Erlang VM over the drain, not the fill), peak_rss_mb, and
per scenario what it checks. Timed from the start of the drain to its last acknowledgement;
notifications from the first delivery, with and without the last batch window.

    python bench/service.py [--messages 100000] [--notifications 100000] [--recipients 1000]
                            [--notifications-prefetch N] [--queue-type quorum|classic]
                            [--scenario NAME ...] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    from ingest.service.settings import PipelineSettings

    declare = PipelineSettings.model_validate({"queue_type": drain.queue_type}).queue_declare(
        drain.notifications_queue
    )
    await publishing.queue_declare(
        drain.notifications_queue, durable=True, arguments=dict(declare.arguments)
    )
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


class Progress:
    """What a pipeline's acknowledgers settled, read off its events."""

    def __init__(self, count: int, on_settled: Callable[[int], None] | None = None) -> None:
        self.count = count
        self.on_settled = on_settled
        self.failed = 0
        self.settled = 0
        self.first_delivery: float | None = None
        self.last_processed = 0.0
        self.done = asyncio.Event()

    def on_event(self, event: Any) -> None:
        if event.kind == "processor.start" and self.first_delivery is None:
            self.first_delivery = time.perf_counter()
        elif event.kind == "processor.stop":
            self.last_processed = time.perf_counter()
        elif event.kind == "ack":
            self.failed += event.failed
            self.settled += event.successful + event.failed
            if self.on_settled is not None:
                self.on_settled(event.successful + event.failed)
            if self.settled >= self.count:
                self.done.set()


async def hosted(
    drain: Drain,
    progress: Progress,
    stopped: Callable[[], Awaitable[None]],
    stop: Callable[[], bool] | None = None,
) -> None:
    """Run the pipeline as `ingest run` builds it until `progress` is done (or `stop()`),
    then call `stopped` before anything is torn down."""
    from ingest.service.hosting import build
    from ingest.service.logging import FAILURE_EVENTS, log_failures
    from ingest.service.metrics import Metrics
    from ingest.service.settings import Settings

    settings = Settings(
        amqp_url=drain.url,
        database_url=drain.database_url,
        smtp_url=drain.smtp_url or None,
        pipelines={
            "bookings": {"queue": drain.queue, "queue_type": drain.queue_type},
            "notifications": {
                "queue": drain.notifications_queue,
                "queue_type": drain.queue_type,
                "prefetch_count": drain.prefetch,
            },
        },
    )
    item = build(settings, [drain.pipeline])[drain.pipeline]
    assert item.startup is not None
    assert item.shutdown is not None
    await item.startup()
    try:
        # As `serve()` does: the service's metrics and failure log watch the pipeline.
        Metrics().watch(item.pipeline, item.ready, item.stats)
        item.pipeline.events.subscribe(log_failures, kinds=FAILURE_EVENTS)
        item.pipeline.events.subscribe(
            progress.on_event, kinds={"processor.start", "processor.stop", "ack"}
        )
        async with item.pipeline:
            if stop is None:
                await progress.done.wait()
            else:
                while not stop():  # noqa: ASYNC110 - set by another process
                    await asyncio.sleep(0.01)
            await stopped()
    finally:
        await item.shutdown()


async def bookings(drain: Drain, probe: Probe) -> dict[str, Any]:
    progress = Progress(drain.count)
    await hosted(drain, progress, probe.stop)
    return {"failed": progress.failed, **await bookings_outcome(drain)}


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

    uvloop.run(hosted(drain, progress, stopped, stop.is_set))
    reports.put((cpu[0], peak_rss_mb(), progress.failed))


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
            if not all(worker.is_alive() for worker in workers):
                raise RuntimeError("a bookings worker exited before the queue was drained")
            await asyncio.sleep(0.01)
        await probe.stop()
    finally:
        stop.set()
    failed = 0
    for _ in workers:
        cpu, peak, worker_failed = reports.get(timeout=120)
        probe.workers_cpu += cpu
        probe.worker_peaks.append(peak)
        failed += worker_failed
    for worker in workers:
        worker.join()
    return {"workers": 2, "failed": failed, **await bookings_outcome(drain)}


async def notifications(drain: Drain, probe: Probe) -> dict[str, Any]:
    """Timed from the first delivery to the last acknowledgement, which comes after the
    last digests' batch timeout (10 s): also given without that last window."""
    progress = Progress(drain.count)
    await hosted(drain, progress, probe.stop)
    assert probe.stopped_at is not None
    assert progress.first_delivery is not None
    busy = progress.last_processed - progress.first_delivery
    return {
        "seconds": probe.stopped_at - progress.first_delivery,
        "trailing_wait_s": round(probe.stopped_at - progress.last_processed, 2),
        "msgs_per_s_without_last_window": round(drain.count / busy),
        "failed": progress.failed,
    }


DRAINS: dict[str, Callable[[Drain, Probe], Awaitable[dict[str, Any]]]] = {
    "bare_aiormq": bare,
    "bare_aiormq_confirmed_publish": bare_confirmed_publish,
    "bookings_postgresql": bookings,
    "bookings_sqlite": bookings,
    "bookings_postgresql_x2": bookings_two_workers,
    "notifications_smtp": notifications,
}
SCENARIOS = tuple(DRAINS)


def run_drain(scenario: str, drain: Drain, broker_pid: int | None) -> dict[str, Any]:
    """In the drain process: one drain, measured by a probe."""
    import structlog
    import uvloop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if not scenario.startswith("bare"):
        # Imported before the clock starts, as a running service would have them.
        for module in ("ingest.service.hosting", "pipelines.bookings", "pipelines.notifications"):
            importlib.import_module(module)
    postgres = drain.database_url if drain.database_url.startswith("postgresql") else None
    probe = Probe(broker_pid, postgres)

    async def measured() -> dict[str, Any]:
        await probe.start()
        extra = await DRAINS[scenario](drain, probe)
        await probe.stop()
        return extra

    return {"scenario": scenario, **probe.result(drain.count, uvloop.run(measured()))}


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
    service's), recording the refs of every digest it receives."""
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
    """The benchmark's SMTP server: each digest's recipient and refs, one JSON line each,
    written before the 250 that lets the pipeline acknowledge its notifications."""
    import email
    import email.policy

    import uvloop
    from aiosmtpd.smtp import SMTP

    with open(record, "a", encoding="utf-8") as file:

        class Recorder:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                refs = REF.findall(message.get_body().get_content())  # type: ignore[union-attr]
                record = {"to": envelope.rcpt_tos, "refs": refs, "at": time.time()}
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


def check_digests(record: Path, expected: dict[str, str]) -> dict[str, Any]:
    seen: Counter[str] = Counter()
    digests = wrong_recipient = 0
    for line in record.read_text().splitlines():
        digest = json.loads(line)
        digests += 1
        for ref in digest["refs"]:
            seen[ref] += 1
            wrong_recipient += digest["to"] != [expected.get(ref)]
    return {
        "digests": digests,
        "every_notification_once": seen.keys() == expected.keys()
        and all(n == 1 for n in seen.values()),
        "missing": len(expected.keys() - seen.keys()),
        "repeated": sum(n - 1 for n in seen.values()),
        "wrong_recipient": wrong_recipient,
    }


@dataclass
class Run:
    url: str
    postgres: str
    messages: int
    notifications: int
    recipients: int
    notifications_prefetch: int | None = None
    queue_type: str = "quorum"
    broker_pid: int | None = None
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


def run_scenario(run: Run, scenario: str) -> dict[str, Any]:
    """Fill a queue of its own, drain it, check; whatever happens, delete the queues and
    databases made for it."""
    label = scenario
    with contextlib.ExitStack() as cleanup:
        queue = f"bench-{scenario}-{uuid.uuid4().hex[:8]}"
        drain = Drain(run.url, queue, run.messages, queue_type=run.queue_type)
        cleanup.callback(delete_queues, run.url, [queue, f"{queue}-notifications"])
        directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ingest-bench-"))
        sqlite = f"sqlite+aiosqlite:///{directory}/tickets.db"
        extra: dict[str, Any] = {}
        smtp: SmtpServer | None = None
        if scenario == "notifications_smtp":
            smtp = cleanup.enter_context(smtp_server(directory))
            drain = Drain(
                run.url,
                queue,
                run.notifications,
                "notifications",
                sqlite,
                smtp.url,
                run.notifications_prefetch,
                run.queue_type,
            )
            messages, expected = notification_messages(run.notifications, run.recipients, run.rng)
            extra = {
                "recipients": run.recipients,
                "prefetch": run.notifications_prefetch or "default (100)",
                "database": "sqlite",
            }
        else:
            messages = booking_messages(run.messages, run.rng)
            if scenario.startswith("bookings"):
                on_postgres = "postgresql" in scenario and not run.postgres_error
                if not on_postgres:
                    label = scenario.replace("postgresql", "sqlite")
                url = cleanup.enter_context(postgres_database(run.postgres)) if on_postgres else ""
                drain = Drain(
                    run.url,
                    queue,
                    run.messages,
                    "bookings",
                    url or sqlite,
                    queue_type=run.queue_type,
                )
                extra = {"database": "postgresql" if on_postgres else "sqlite"}
        print(f"{label}: filling {queue} with {len(messages)} messages", file=sys.stderr)
        content_type = "application/json" if smtp else None
        asyncio.run(fill_queue(run.url, queue, messages, content_type, run.queue_type))
        background = broker_background_pct(run.broker_pid)
        print(f"{label}: draining", file=sys.stderr)
        smtp_cpu = cpu_seconds(smtp.pid) if smtp else 0.0
        result = {**drain_process(scenario, drain, run.broker_pid), "scenario": label, **extra}
        result["broker_background_cpu_pct"] = background
        if smtp is not None:
            smtp_cpu = cpu_seconds(smtp.pid) - smtp_cpu
            result["smtp_server_cpu_us_per_msg"] = round(smtp_cpu * 1e6 / drain.count, 1)
            result.update(check_digests(smtp.record, expected))
            result["digests_per_s"] = round(result["digests"] / result["seconds"], 1)
        return result


TABLE = (
    ("scenario", "scenario"),
    ("msgs/s", "msgs_per_s"),
    ("ratio to bare", "ratio_to_bare"),
    ("service CPU µs/msg", "service_cpu_us_per_msg"),
    ("broker CPU µs/msg", "broker_cpu_us_per_msg"),
    ("peak RSS MB", "peak_rss_mb"),
)
NOTES = (
    "postgres_cpu_us_per_msg",
    "broker_cpu_ratio_to_confirmed_publish",
    "tickets",
    "notifications_queued",
    "failed",
    "digests_per_s",
    "every_notification_once",
    "msgs_per_s_without_last_window",
    "trailing_wait_s",
    "smtp_server_cpu_us_per_msg",
    "broker_background_cpu_pct",
    "skipped",
    "error",
)


def compare(rows: list[dict[str, Any]]) -> None:
    """Ratios to the bare drain's throughput, and the bookings' broker CPU to that of the
    bare consumer with one confirmed publish per message (the bound issue 11 sets)."""
    by_name = {row["scenario"]: row for row in rows}
    bare_rate = by_name.get("bare_aiormq", {}).get("msgs_per_s")
    reference = by_name.get("bare_aiormq_confirmed_publish", {}).get("broker_cpu_us_per_msg")
    for row in rows:
        if bare_rate and "msgs_per_s" in row:
            row["ratio_to_bare"] = round(row["msgs_per_s"] / bare_rate, 2)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--notifications", type=int, default=100_000)
    parser.add_argument("--recipients", type=int, default=1_000)
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
    parser.add_argument("--drain", nargs=2, metavar=("SCENARIO", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--smtp-server", metavar="RECORD", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    )
    run.broker_pid = find_broker_pid()
    scenarios = args.scenario or SCENARIOS
    if any("postgresql" in scenario for scenario in scenarios):
        run.postgres_error = postgres_unreachable(args.postgres)
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        if scenario == "bookings_postgresql" and run.postgres_error:
            rows.append({"scenario": scenario, "skipped": run.postgres_error})
            print(f"{scenario}: skipped, {run.postgres_error}", file=sys.stderr)
            continue
        try:
            rows.append(run_scenario(run, scenario))
        except Exception as exc:
            rows.append({"scenario": scenario, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{scenario}: failed, {exc!r}", file=sys.stderr)
    compare(rows)
    for row in rows:
        print(json.dumps(row), flush=True)
    print()
    print(table(rows))
    if run.broker_pid is None:
        print("\nNo RabbitMQ (beam.smp) process on this machine: no broker CPU figures.")
    sys.exit(1 if any("error" in row for row in rows) else 0)


if __name__ == "__main__":
    main()
