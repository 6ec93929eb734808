"""RabbitMQ drain benchmark: the same queue of persistent `event,user_id` messages drained
by bare client consumers, FastStream and ingest pipelines, in one run on one broker.

Scenarios (each fills its own queue, then drains it in a fresh process):
  bare_aiormq               aiormq consumer, prefetch 1000, ack(multiple=True) every 100
  bare_aio_pika             aio-pika consumer, same settings
  faststream                FastStream subscriber with a trivial handler, prefetch 1000
  ingest_processors_only    no-op handle_message, acked by the processors
  ingest_three_batchers     batchers cinema / musical / default (100 each), user as batch key
  ingest_three_batchers_x2  the same in two processes competing for the queue, as
                            `ingest run --workers 2` runs them
  bookings_sqlite           the bookings pipeline end to end: users looked up and tickets
                            inserted in SQLite, one notification published per ticket
  backlog_rss               `ingest run` (both pipelines) with --backlog messages waiting:
                            the service's peak RSS over 60 s (no throughput figure)

One JSON line per scenario: scenario, messages, msgs_per_s, ratio_to_bare (to
bare_aiormq), cpu_s, peak_rss_mb, latency_p50_ms and latency_p99_ms (publish to ack: the
queue is filled first, so this is mostly time spent waiting in it).

    python bench/rabbitmq.py [--messages 100000] [--scenario NAME ...] [--backlog 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiormq
from _common import delete_queue, peak_rss_mb

SCENARIOS = (
    "bare_aiormq",
    "bare_aio_pika",
    "faststream",
    "ingest_processors_only",
    "ingest_three_batchers",
    "ingest_three_batchers_x2",
    "bookings_sqlite",
    "backlog_rss",
)
EVENTS = ("cinema", "musical", "default")
PREFETCH = 1000
ACK_EVERY = 100


class Latencies:
    """Publish-to-ack latencies, from the publish time each message_id starts with (a
    header would cost every consumer a table decode per message)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.worker_peaks: list[float] = []  # peak RSS of each worker process, if any

    def acked(self, message_ids: list[str | None]) -> None:
        now = time.time()
        self.seconds.extend(now - float(m.partition("/")[0]) for m in message_ids if m)

    def summary(self) -> dict[str, float]:
        if len(self.seconds) < 2:
            return {}
        cuts = statistics.quantiles(self.seconds, n=100)
        return {
            "latency_p50_ms": round(cuts[49] * 1000, 1),
            "latency_p99_ms": round(cuts[98] * 1000, 1),
        }


async def fill(url: str, queue: str, count: int) -> None:
    """Declare `queue` (durable) and publish `count` persistent bookings, confirmed; each
    message_id starts with its publish time."""
    connection = await aiormq.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.queue_declare(queue, durable=True)
    window: list[Any] = []
    for i in range(count):
        body = f"{EVENTS[i % 3]},{i % 3 + 1}".encode()
        properties = aiormq.spec.Basic.Properties(
            delivery_mode=2, message_id=f"{time.time():.6f}/{i}"
        )
        window.append(channel.basic_publish(body, routing_key=queue, properties=properties))
        if len(window) == 1000:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)
    await connection.close()


async def bare_aiormq(url: str, queue: str, count: int, latencies: Latencies) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=PREFETCH)
    done = asyncio.Event()
    received = 0
    pending: list[Any] = []

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal received
        received += 1
        pending.append(message.header.properties.message_id)
        if received % ACK_EVERY == 0 or received == count:
            await channel.basic_ack(message.delivery_tag, multiple=True)  # type: ignore[arg-type]
            latencies.acked(pending)
            pending.clear()
        if received == count:
            done.set()

    await channel.basic_consume(queue, on_message)
    await done.wait()
    await connection.close()


async def bare_aio_pika(url: str, queue: str, count: int, latencies: Latencies) -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    amqp_queue = await channel.declare_queue(queue, durable=True)
    done = asyncio.Event()
    received = 0
    pending: list[Any] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        received += 1
        pending.append(message.message_id)
        if received % ACK_EVERY == 0 or received == count:
            await message.ack(multiple=True)
            latencies.acked(pending)
            pending.clear()
        if received == count:
            done.set()

    await amqp_queue.consume(on_message)
    await done.wait()
    await connection.close()


async def faststream(url: str, queue: str, count: int, latencies: Latencies) -> None:
    """FastStream at its best: no access log (FastStream writes two lines per message at
    the level it is given) and a handler that takes only the body. Asking for the message,
    or its message_id through `Context`, halves its throughput here, so its latency is
    not measured."""
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(url, logger=None)
    done = asyncio.Event()
    received = 0

    @broker.subscriber(RabbitQueue(queue, durable=True), channel=Channel(prefetch_count=PREFETCH))
    async def handle(body: bytes) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    async with broker:
        await broker.start()
        await done.wait()


def _ingest(batchers: bool) -> Any:
    async def drain(url: str, queue: str, count: int, latencies: Latencies) -> None:
        await ingest_pipeline(url, queue, count, batchers, latencies)

    return drain


async def ingest_pipeline(
    url: str,
    queue: str,
    count: int,
    batchers: bool,
    latencies: Latencies,
    on_acked: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    from ingest import Batcher, BatchInfo, Handlers, Message, Pipeline, Processors
    from ingest.rabbitmq import RabbitMQOptions, RabbitMQProducer

    done = asyncio.Event()
    acked = 0

    class Route(Handlers):
        async def handle_message(self, processor: str, message: Message, context: Any) -> Message:
            if batchers:
                event, _, user = message.data.partition(b",")
                message.batcher = event.decode()
                message.batch_key = user
            return message

        async def handle_batch(
            self, batcher: str, messages: list[Message], batch_info: BatchInfo, context: Any
        ) -> list[Message]:
            return messages

    def on_event(event: Any) -> None:
        nonlocal acked
        if event.kind == "ack":
            acked += len(event.messages)
            latencies.acked([m.metadata.get("message_id") for m in event.messages])
            if on_acked is not None:
                on_acked(len(event.messages))
            if acked >= count:
                done.set()

    producer = RabbitMQProducer(
        RabbitMQOptions(
            queue=queue,
            url=url,
            prefetch_count=PREFETCH,
            metadata=("message_id",),
            dead_letter_queue="",
        )
    )
    pipeline = Pipeline(
        "bench",
        Route(),
        producer,
        processors=Processors(concurrency=2, max_demand=100),
        batchers={e: Batcher(batch_size=100, batch_timeout=1.0) for e in EVENTS}
        if batchers
        else None,
    )
    pipeline.events.subscribe(on_event)
    async with pipeline:
        if stop is None:
            await done.wait()
        else:
            while not stop():  # noqa: ASYNC110 - set by another process
                await asyncio.sleep(0.05)


def _worker(url: str, queue: str, count: int, counter: Any, stop: Any, stamps: Any) -> None:
    import uvloop

    latencies = Latencies()

    def on_acked(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    uvloop.run(ingest_pipeline(url, queue, count, True, latencies, on_acked, stop.is_set))
    stamps.put((latencies.seconds, peak_rss_mb()))


async def ingest_two_workers(url: str, queue: str, count: int, latencies: Latencies) -> None:
    context = multiprocessing.get_context("fork")
    counter, stop, stamps = context.Value("q", 0), context.Event(), context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, queue, count, counter, stop, stamps))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    while counter.value < count:  # noqa: ASYNC110 - counted by other processes
        await asyncio.sleep(0.01)
    stop.set()
    for _ in workers:
        seconds, peak = stamps.get()
        latencies.seconds.extend(seconds)
        latencies.worker_peaks.append(peak)
    for worker in workers:
        worker.join()


async def bookings_sqlite(url: str, queue: str, count: int, latencies: Latencies) -> None:
    from ingest.service.hosting import build
    from ingest.service.settings import Settings

    directory = tempfile.mkdtemp()
    settings = Settings(
        amqp_url=url,
        database_url=f"sqlite+aiosqlite:///{directory}/tickets.db",
        mail_outbox=Path(directory) / "outbox",
        # Classic queues, as the queue is filled and as every other scenario here reads;
        # bench/service.py measures both types.
        pipelines={
            "bookings": {"queue": queue, "queue_type": "classic"},
            "notifications": {"queue": f"{queue}-notifications", "queue_type": "classic"},
        },
    )
    hosted = build(settings, ["bookings"])["bookings"]
    done = asyncio.Event()
    acked = 0

    def on_event(event: Any) -> None:
        nonlocal acked
        if event.kind == "ack":
            acked += len(event.messages)
            latencies.acked([m.metadata.get("message_id") for m in event.messages])
            if acked >= count:
                done.set()

    assert hosted.startup is not None
    assert hosted.shutdown is not None
    await hosted.startup()
    hosted.pipeline.events.subscribe(on_event)
    async with hosted.pipeline:
        await done.wait()
    await hosted.shutdown()
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_delete(f"{queue}-notifications")
    await channel.queue_delete(f"{queue}.dlq")
    await connection.close()


DRAINS: Mapping[str, Any] = {
    "bare_aiormq": bare_aiormq,
    "bare_aio_pika": bare_aio_pika,
    "faststream": faststream,
    "ingest_processors_only": _ingest(False),
    "ingest_three_batchers": _ingest(True),
    "ingest_three_batchers_x2": ingest_two_workers,
    "bookings_sqlite": bookings_sqlite,
}


def run_one(scenario: str, url: str, queue: str, count: int) -> dict[str, Any]:
    import structlog
    import uvloop

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    latencies = Latencies()
    cpu = time.process_time()
    started = time.perf_counter()
    uvloop.run(DRAINS[scenario](url, queue, count, latencies))
    elapsed = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "scenario": scenario,
        "messages": count,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(count / elapsed),
        "cpu_s": round(time.process_time() - cpu + children.ru_utime + children.ru_stime, 3),
        # With workers, each is a process of its own: the largest is the figure per process.
        "peak_rss_mb": round(max([peak_rss_mb(), *latencies.worker_peaks]), 1),
        **latencies.summary(),
    }


def backlog_rss(url: str, count: int, seconds: float = 60.0) -> dict[str, Any]:
    """The whole service (`ingest run`: bookings and notifications in one process) with
    `count` bookings waiting: its peak RSS while it works through them for `seconds`."""
    queue = f"bench-backlog-{uuid.uuid4().hex[:8]}"
    asyncio.run(fill(url, queue, count))
    directory = tempfile.mkdtemp()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INGEST_")},
        "INGEST_AMQP_URL": url,
        "INGEST_CONFIG": f"{directory}/none.toml",
        "INGEST_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/tickets.db",
        "INGEST_MAIL_OUTBOX": f"{directory}/outbox",
        "INGEST_HTTP_PORT": "0",
        "INGEST_LOG_LEVEL": "WARNING",
        "INGEST_PIPELINES__BOOKINGS__QUEUE": queue,
        "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": f"{queue}-notifications",
        "INGEST_PIPELINES__BOOKINGS__QUEUE_TYPE": "classic",  # as fill() declares it
        "INGEST_PIPELINES__NOTIFICATIONS__QUEUE_TYPE": "classic",
    }
    process = subprocess.Popen([sys.executable, "-m", "ingest", "run"], env=env)
    peak = 0.0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid))
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        asyncio.run(delete_queue(url, queue))
        asyncio.run(delete_queue(url, f"{queue}-notifications"))
    return {
        "scenario": "backlog_rss",
        "messages": count,
        "seconds": seconds,
        "peak_rss_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument(
        "--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--drain", nargs=2, metavar=("SCENARIO", "QUEUE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        scenario, queue = args.drain
        print(json.dumps(run_one(scenario, args.url, queue, args.messages)))
        return
    results: dict[str, dict[str, Any]] = {}
    for scenario in args.scenario or SCENARIOS:
        if scenario == "backlog_rss":
            results[scenario] = backlog_rss(args.url, args.backlog)
            continue
        queue = f"bench-{scenario}-{uuid.uuid4().hex[:8]}"
        asyncio.run(fill(args.url, queue, args.messages))
        command = [
            sys.executable,
            __file__,
            "--messages",
            str(args.messages),
            "--url",
            args.url,
            "--drain",
            scenario,
            queue,
        ]
        try:
            output = subprocess.run(
                command, check=True, capture_output=True, text=True, timeout=900
            ).stdout
        finally:
            asyncio.run(delete_queue(args.url, queue))
        results[scenario] = json.loads(output.strip().splitlines()[-1])
    bare = results.get("bare_aiormq", {}).get("msgs_per_s")
    for result in results.values():
        if bare and "msgs_per_s" in result:
            result["ratio_to_bare"] = round(result["msgs_per_s"] / bare, 2)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
