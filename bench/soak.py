"""Soak benchmark (issue 20): steady load through both pipelines for --minutes, a fault
every --fault-every seconds, then the ledger: every booking ticketed once, every
notification in a digest, and what the service's memory, latency, restarts and dead
letters did meanwhile.

The service is a real `ingest run` subprocess (tests/reliability/harness.ServiceProcess,
with the service's own retry delays and digest windows rather than the suite's short
ones) on a PostgreSQL database made for the run, reached through a TCP proxy
(tests/support.TcpProxy) so that it can be cut, mailing its digests to the aiosmtpd
recorder of bench/service.py in a process of its own. A publisher sends valid bookings
(users 1-3, open events, which the service seeds) at --rate per second, persistent and
confirmed (ingest's Publisher: a sample carries x-published-at, for the service's own
publish-to-ack figure), each with a unique message_id that holds its index and the time
of its first publish attempt. A batch not confirmed (the broker went away) is published
again under the same ids: the pipelines deduplicate by message_id, and the copies are
counted (`republished`). Bookings due while the broker is away go out when it is back.

The faults, in turn, on a fixed schedule (one due while the previous one still runs waits
for it): the service's AMQP connections closed (management API), PostgreSQL cut for
--postgres-cut seconds, SIGKILL then a new process, SIGTERM then a new process, the
broker restarted (`rabbitmqctl stop_app`, --broker-down seconds, `start_app`). A service
that exits on its own is started again and counted (`unexpected_exits`).

After the load: a bounded wait (--drain-timeout) for every ticket and every digest, the
work and retry queues quiet for a few seconds, then a SIGTERM (exit code 0 expected) and
the checks, read directly from the database (not through the proxy) and from the digests
received. Printed: a JSON line per fault and per minute of the run, one for the result,
then Markdown tables (the figures and the faults). Exits 1 when a booking has no ticket
or a ticket is duplicated, or a notification is in no digest.

- lost: bookings without a ticket; duplicate_tickets: tickets beyond one per booking.
- notifications: missing (in no digest), repeated (in more than one: at-least-once email
  after a crash between sending a digest and recording it), resent_message_ids (digests
  received again under the same Message-ID: the same email, sent again).
- publish→ticket: from a booking's first publish attempt (its message_id) to its ticket's
  created_at (PostgreSQL's now() at the insert), every booking, exact (percentile_cont);
  the acknowledgement follows the insert by one confirmed publish of its notifications
  (about 10-20 ms). Also per segment, by when the ticket was written: before the first
  fault, then from each fault to the next (a booking held up by a fault counts for it,
  even when published before it). This is the figure to trust across restarts; the
  service's own publish→ack (its live snapshot over the last minute, of the stamped
  sample) is in the per-minute lines and summarised (median and largest of the
  per-minute p99s), but it is lost with each process.
- publish→mailed: from the first publish attempt to the digest's arrival at the SMTP
  server, includes the digest window (10 s by default); within 2 % (log histogram).
- RSS: the service's VmRSS every --sample-every seconds. Its slope is pooled within
  process generations (one intercept per process, so a restart's drop is no slope; the
  first 60 s of each left out: warm-up), in MB per 10 minutes; each generation's own
  slope is in the result's JSON.
- restarts: pipeline restarts (`ingest_pipeline_restarts` of /metrics, summed over the
  processes, read every sample and just before a kill) and the processes started.
- failed publishes outside the broker restarts: the broker went away when this run did
  not stop it (another client of a shared broker did): the figures include that outage.
- dead letters: the depth of both .dlq queues at the end; left_in_queues: the work and
  retry queues after the clean stop (unacknowledged messages are back there by then).
- recovery (per fault): from the fault's start to the first sample after its end where
  both work queues hold at most two seconds of load (within --sample-every seconds).

Needs RabbitMQ with its management API (and `rabbitmqctl` on this machine for the broker
restart) and PostgreSQL. Queues, database, processes and files made for the run are
removed after it, on failure too (the service logs are kept with --logs DIR).

    python bench/soak.py [--minutes 30] [--rate 2000] [--fault-every 180]
                         [--faults connections,postgres,sigkill,sigterm,broker]
                         [--postgres-cut 60] [--broker-down 5] [--drain-timeout 600]
                         [--postgres URL] [--url AMQP_URL] [--management URL]
                         [--logs DIR] [--markdown FILE]

--markdown FILE writes the section (its heading, what it is, the tables) into FILE:
replacing the section of the same heading when FILE has one, else appended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import structlog
import uvloop
from _common import delete_queue, postgres_fetch, postgres_unreachable, scratch_database
from service import POSTGRES_URL, smtp_server
from sqlalchemy.engine import make_url

from ingest.exceptions import PublishError
from ingest.rabbitmq import OutgoingMessage, Publisher
from ingest.rabbitmq.acknowledger import retry_queue_name
from ingest.service.settings import PipelineSettings
from pipelines import bookings, notifications

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/: the reliability harness, the broker and the proxy
from tests.reliability.harness import ServiceProcess  # noqa: E402
from tests.support import Broker, TcpProxy  # noqa: E402

FAULTS = ("connections", "postgres", "sigkill", "sigterm", "broker")
EVENTS = ("cinema", "musical", "comedy")  # none closed: every booking becomes a ticket
WARMUP_S = 60.0  # left out of each process's RSS slope
QUIET_S = 5.0  # the work and retry queues stay empty this long before the clean stop
RECOVERED_AFTER_S = 2.0  # a fault is over once the work queues hold this much load or less
MAX_BATCH = 1000  # bookings per confirmed publish, when the publisher is catching up
TICK_S = 0.02
# The settings tests/reliability/harness.ServiceProcess gives for short tests (retries
# within seconds, half-second digest windows): the soak runs the service's defaults.
SUITE_SETTINGS = (
    "INGEST_PIPELINES__BOOKINGS__RETRY_DELAYS",
    "INGEST_PIPELINES__BOOKINGS__RETRY_MAX_ATTEMPTS",
    "INGEST_PIPELINES__NOTIFICATIONS__RETRY_DELAYS",
    "INGEST_PIPELINES__NOTIFICATIONS__RETRY_MAX_ATTEMPTS",
    "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT",
)
HEADING = "### A soak with faults (issue 20)"
RESTARTS = re.compile(r'^ingest_pipeline_restarts_total\{pipeline="(\w+)"\} (\S+)$', re.M)


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class SoakService(ServiceProcess):
    """The reliability suite's service process with the service's own defaults."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        for key in SUITE_SETTINGS:
            env.pop(key, None)
        env.update(self.extra)
        return env

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    @property
    def work_queues(self) -> list[str]:
        """Both pipelines' queues and their retry queues, at the pipelines' own delays."""
        return [
            name
            for queue, delays in (
                (self.bookings_queue, bookings.RETRY.delays),
                (self.notifications_queue, notifications.RETRY.delays),
            )
            for name in (queue, *(retry_queue_name(queue, delay) for delay in delays))
        ]


# --- the load ---


@dataclass
class Load:
    """Publishes bookings `soak-<run>-<index>-<ms of the first attempt>` at `rate` a
    second from `start` (those due while publishing was impossible go out as soon as it
    is possible again) until `until`, both on the monotonic clock."""

    url: str
    queue: str
    run: str
    rate: float
    sent: int = 0  # bookings 0..sent-1 are confirmed, at least once
    republished: int = 0
    max_lag_s: float = 0.0
    failed_at: list[float] = field(default_factory=list)  # monotonic, each failed publish

    async def run_until(self, start: float, until: float) -> None:
        declare = PipelineSettings().queue_declare(self.queue)
        async with Publisher(
            self.url, connection_name="ingest-soak-publisher", declare_queues={self.queue: declare}
        ) as publisher:
            while (now := time.monotonic()) < until:
                due = int((now - start) * self.rate)
                if due <= self.sent:
                    await asyncio.sleep(TICK_S)
                    continue
                self.max_lag_s = max(self.max_lag_s, (due - self.sent) / self.rate)
                batch = self.bookings(self.sent, min(due, self.sent + MAX_BATCH))
                await self.publish(publisher, batch)
                self.sent += len(batch)

    def bookings(self, first: int, end: int) -> list[OutgoingMessage]:
        stamp = int(time.time() * 1000)
        return [
            OutgoingMessage(
                f"{EVENTS[i % 3]},{i // 3 % 3 + 1}".encode(),
                self.queue,
                message_id=f"soak-{self.run}-{i}-{stamp}",
            )
            for i in range(first, end)
        ]

    async def publish(self, publisher: Publisher, batch: list[OutgoingMessage]) -> None:
        """Until the broker confirmed the whole batch: a batch it did not confirm may be
        partly in the queue, and goes again under the same message_ids."""
        while True:
            try:
                await publisher.publish_batch(batch)
                return
            except PublishError as error:
                self.failed_at.append(time.monotonic())
                self.republished += len(batch)
                note(f"publish of {len(batch)} bookings failed, again in 1 s: {error}")
                await asyncio.sleep(1.0)


# --- what arrives: digests ---


class LogHistogram:
    """Milliseconds in buckets 2 % wide: percentiles within 2 %, in constant memory."""

    STEP = math.log(1.02)

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.largest = 0.0

    def add(self, ms: float) -> None:
        self.counts[int(math.log(max(ms, 1.0)) / self.STEP)] += 1
        self.total += 1
        self.largest = max(self.largest, ms)

    def percentile(self, share: float) -> float | None:
        if not self.total:
            return None
        rank = share * (self.total - 1)
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen > rank:
                return round(math.exp((bucket + 0.5) * self.STEP))
        return round(self.largest)


class Digests:
    """Reads the SMTP recorder's file as it grows (bench/service.py's `serve_smtp`: one
    JSON line per digest, its refs): how many digests named each booking's notification
    (a byte per booking, not a set of ids: 30 minutes at 2,000/s is 3.6 million), the
    Message-IDs received more than once, and publish-to-mailed times."""

    def __init__(self, record: Path, run: str) -> None:
        self.record = record
        self.pattern = re.compile(rf"^soak-{run}-(\d+)-(\d+)/notification$")
        self.counts = bytearray()
        self.mailed = 0  # distinct notifications in at least one digest
        self.repeated = 0
        self.foreign = 0  # refs that are not this run's notifications
        self.digests = 0
        self.message_ids: Counter[str] = Counter()
        self.latency = LogHistogram()
        self._offset = 0

    def read(self) -> int:
        if not self.record.exists():
            return self.mailed
        with self.record.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        complete = chunk.rfind(b"\n") + 1  # a line being written waits for the next read
        self._offset += complete
        for line in chunk[:complete].splitlines():
            self._digest(json.loads(line))
        return self.mailed

    def _digest(self, digest: dict[str, Any]) -> None:
        self.digests += 1
        self.message_ids[str(digest.get("message_id"))] += 1
        for ref in digest["refs"]:
            found = self.pattern.match(ref)
            if found is None:
                self.foreign += 1
                continue
            index, stamp = int(found[1]), int(found[2])
            if index >= len(self.counts):
                self.counts.extend(bytes(index + 1 - len(self.counts) + 100_000))
            seen = self.counts[index]
            if seen == 0:
                self.mailed += 1
                self.latency.add(digest["at"] * 1000 - stamp)
            else:
                self.repeated += 1
            self.counts[index] = min(255, seen + 1)

    def missing(self, count: int) -> int:
        """Of bookings 0..count-1, those whose notification is in no digest."""
        return self.counts[:count].count(0) + max(0, count - len(self.counts))


# --- samples: RSS, queues, restarts, the service's own latency ---


@dataclass
class Sample:
    t: float  # seconds since the load started
    generation: int  # the service process: 1 for the first, +1 per start
    rss_mb: float | None
    ready: dict[str, int | None]  # ready messages in each pipeline's queue


@dataclass
class Restarts:
    """`ingest_pipeline_restarts` per process generation (a counter of one process)."""

    by_generation: dict[int, dict[str, float]] = field(default_factory=dict)

    async def read(self, service: SoakService) -> None:
        status, text = await service.get("/metrics")
        if status != 200:
            return
        found = re.findall(
            r'^ingest_pipeline_restarts_total\{pipeline="(\w+)"\} (\S+)$', text, re.M
        )
        self.by_generation[service.starts] = {name: float(value) for name, value in found}

    def total(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in self.by_generation.values():
            total.update({name: int(value) for name, value in counts.items()})
        return dict(total)


def vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # gone meanwhile
        return None
    return None


async def ready_messages(url: str, queues: list[str]) -> dict[str, int | None]:
    """Ready messages per queue (passive declares on a connection of its own); None for
    a queue that is not there or when the broker does not answer."""
    depths: dict[str, int | None] = dict.fromkeys(queues)
    try:
        connection = await asyncio.wait_for(aiormq.connect(url), 10)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError):
        return depths
    try:
        for queue in queues:
            channel = await connection.channel()
            try:
                declared = await channel.queue_declare(queue, passive=True)
                depths[queue] = int(declared.message_count or 0)
                await channel.close()
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
    except (aiormq.exceptions.AMQPError, OSError):
        pass
    finally:
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError):
            await connection.close()
    return depths


@dataclass
class Soak:
    """One run: what it made, what it saw."""

    args: argparse.Namespace
    run: str
    service: SoakService
    broker: Broker
    proxy: TcpProxy
    database_url: str  # direct, not through the proxy
    digests: Digests
    load: Load
    start: float = 0.0  # monotonic, when the load started
    samples: list[Sample] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    restarts: Restarts = field(default_factory=Restarts)
    generation_started: dict[int, float] = field(default_factory=dict)
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    service_latency: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while a fault acts
    finished: bool = False  # the service's last stop: not an exit to restart from

    def now(self) -> float:
        return round(time.monotonic() - self.start, 1)

    async def start_service(self) -> None:
        await self.service.start()
        self.generation_started[self.service.starts] = time.monotonic() - self.start

    # -- sampling --

    async def sample_until(self, done: asyncio.Event) -> None:
        every = self.args.sample_every
        next_minute = 60.0
        while not done.is_set():
            await self.sample()
            if self.now() >= next_minute:
                await self.minute(next_minute)
                next_minute += 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every)

    async def sample(self) -> None:
        service = self.service
        if not self.lock.locked() and not self.finished and service.pid is None:
            async with self.lock:  # exited on its own: a supervisor would start it again
                await self.exited_on_its_own()
        pid = service.pid
        rss = await asyncio.to_thread(vm_rss_mb, pid) if pid is not None else None
        queues = {service.bookings_queue: "bookings", service.notifications_queue: "notifications"}
        ready = await ready_messages(self.args.url, list(queues))
        named = {queues[queue]: depth for queue, depth in ready.items()}
        self.samples.append(Sample(self.now(), service.starts, rss, named))
        if pid is not None and not self.lock.locked():
            await self.restarts.read(service)
        self.digests.read()

    async def exited_on_its_own(self) -> None:
        assert self.service.process is not None
        code = self.service.process.returncode
        self.unexpected_exits.append({"t_s": self.now(), "code": code})
        note(f"the service exited on its own ({code}): starting it again\n{self.service.log()}")
        await self.start_service()

    async def minute(self, minute: float) -> None:
        """A line per minute: the last sample, and the service's own publish→ack figures
        over that minute (from its live snapshot)."""
        status, text = await self.service.get("/api/snapshot")
        latency: dict[str, Any] = {}
        if status == 200:
            for name, pipeline in json.loads(text)["pipelines"].items():
                figures = pipeline.get("latency_ms")
                latency[name] = figures
                if figures:
                    self.service_latency.setdefault(name, []).append(figures)
        last = self.samples[-1]
        emit(
            "minute",
            minute=int(minute // 60),
            t_s=last.t,
            generation=last.generation,
            rss_mb=None if last.rss_mb is None else round(last.rss_mb, 1),
            ready=last.ready,
            published=self.load.sent,
            mailed=self.digests.mailed,
            service_publish_to_ack_ms=latency,
        )

    # -- faults --

    async def faults_until(self, until: float) -> None:
        """One fault every --fault-every seconds, in turn, until `until` (monotonic)."""
        every = self.args.fault_every
        for number in range(1, 1_000_000):
            due = self.start + number * every
            if due >= until:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            kind = self.args.faults[(number - 1) % len(self.args.faults)]
            fault: dict[str, Any] = {"number": number, "fault": kind, "at_s": self.now()}
            fault["at_ms"] = int(time.time() * 1000)
            note(f"fault {number}: {kind} at {fault['at_s']} s")
            async with self.lock:
                fault.update(await self.inject(kind))
            fault["ended_s"] = self.now()
            self.faults.append(fault)
            emit("fault", **{k: v for k, v in fault.items() if k != "at_ms"})

    async def inject(self, kind: str) -> dict[str, Any]:
        actions: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            "connections": self.close_connections,
            "postgres": self.cut_postgres,
            "sigkill": lambda: self.restart_service(signal.SIGKILL),
            "sigterm": lambda: self.restart_service(signal.SIGTERM),
            "broker": self.restart_broker,
        }
        return await actions[kind]()

    async def close_connections(self) -> dict[str, Any]:
        """The service's connections (named `... pid <pid>)`), closed by the broker."""
        pid = self.service.pid
        listed = await self.broker.api_async("GET", "connections?columns=name,client_properties")
        names = [
            c["name"]
            for c in listed
            if str(c.get("client_properties", {}).get("connection_name", "")).endswith(
                f"pid {pid})"
            )
        ]
        for name in names:
            with contextlib.suppress(OSError):  # closed meanwhile
                await self.broker.api_async(
                    "DELETE", f"connections/{urllib.parse.quote(name, safe='')}"
                )
        started = time.monotonic()
        with contextlib.suppress(RuntimeError):  # gone and back between two polls
            await self.until(self.not_ready, 10, "readiness lost")
        await self.until(self.service.ready, 60, "readiness after the connections")
        return {"connections_closed": len(names), "ready_again_s": self.since(started)}

    async def not_ready(self) -> bool:
        return not await self.service.ready()

    async def cut_postgres(self) -> dict[str, Any]:
        await self.proxy.cut()
        try:
            await asyncio.sleep(self.args.postgres_cut)
            alive = await self.service.alive()
        finally:
            await self.proxy.resume()
        return {"cut_s": self.args.postgres_cut, "alive_during_cut": alive}

    async def restart_service(self, signum: int) -> dict[str, Any]:
        if self.service.pid is None:
            await self.exited_on_its_own()
        await self.restarts.read(self.service)
        code, stop_s = await self.service.stop(signum)
        started = time.monotonic()
        await self.start_service()
        return {"exit_code": code, "stop_s": round(stop_s, 1), "ready_s": self.since(started)}

    async def restart_broker(self) -> dict[str, Any]:
        """`rabbitmqctl stop_app`, --broker-down seconds, `start_app`: the node's
        connections are closed and refused, its queues stay."""
        await rabbitmqctl("stop_app")
        try:
            await asyncio.sleep(self.args.broker_down)
        finally:
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")
        started = time.monotonic()
        await self.until(self.broker.answers, 60, "the management API after the restart")
        await self.until(self.service.ready, 120, "readiness after the restart")
        return {"down_s": self.args.broker_down, "ready_again_s": self.since(started)}

    @staticmethod
    def since(started: float) -> float:
        return round(time.monotonic() - started, 1)

    @staticmethod
    async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout:g} s")
            await asyncio.sleep(0.2)


async def rabbitmqctl(command: str) -> None:
    process = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", command)
    if await process.wait():
        raise RuntimeError(f"rabbitmqctl {command} exited with {process.returncode}")


# --- the end: drain, stop, check ---


async def ticketed(soak: Soak) -> int:
    rows = await postgres_fetch(
        soak.database_url,
        "SELECT count(*) FROM tickets WHERE message_id LIKE $1",
        f"soak-{soak.run}-%",
    )
    return int(rows[0][0])


async def drain(soak: Soak) -> dict[str, Any]:
    """Until every booking has its ticket and every notification its digest (or
    --drain-timeout), then until the work and retry queues stay empty for QUIET_S; then
    a clean stop (SIGTERM)."""
    count = soak.load.sent
    started = time.monotonic()
    deadline = started + soak.args.drain_timeout
    complete_s: float | None = None
    while time.monotonic() < deadline:
        tickets = await ticketed(soak)
        if tickets >= count and soak.digests.read() >= count:
            complete_s = soak.since(started)
            break
        await asyncio.sleep(2)
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        ready = await ready_messages(soak.args.url, soak.service.work_queues)
        if any(ready.values()):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        await asyncio.sleep(1)
    async with soak.lock:
        soak.finished = True
        await soak.restarts.read(soak.service)
        code, stop_s = await soak.service.stop(signal.SIGTERM)
    soak.digests.read()
    return {
        "all_done_after_load_s": complete_s,
        "final_stop_exit_code": code,
        "final_stop_s": round(stop_s, 1),
    }


async def ledger(soak: Soak) -> dict[str, Any]:
    """Tickets against the bookings published: lost, duplicated, unexpected."""
    count = soak.load.sent
    rows = await postgres_fetch(
        soak.database_url,
        """
        WITH t AS (SELECT split_part(message_id, '-', 3)::bigint AS i FROM tickets
                   WHERE message_id LIKE $1)
        SELECT count(*), count(DISTINCT i), count(DISTINCT i) FILTER (WHERE i < $2),
               count(*) FILTER (WHERE i >= $2)
        FROM t
        """,
        f"soak-{soak.run}-%",
        count,
    )
    tickets, distinct, expected, unexpected = (int(value) for value in rows[0])
    figures: dict[str, Any] = {
        "bookings": count,
        "tickets": tickets,
        "lost": count - expected,
        "duplicate_tickets": tickets - distinct,
        "unexpected_tickets": unexpected,
    }
    if figures["lost"]:
        missing = await postgres_fetch(
            soak.database_url,
            """
            SELECT g FROM generate_series(0, $2 - 1) AS g
            EXCEPT SELECT split_part(message_id, '-', 3)::bigint FROM tickets
                   WHERE message_id LIKE $1
            ORDER BY 1 LIMIT 10
            """,
            f"soak-{soak.run}-%",
            count,
        )
        figures["lost_examples"] = [f"soak-{soak.run}-{row[0]}-*" for row in missing]
    return figures


async def ticket_latency(soak: Soak) -> dict[str, Any]:
    """Publish→ticket milliseconds, exact, overall and per segment of the run by when
    the ticket was written: before the first fault, then from each fault to the next."""
    thresholds = [fault["at_ms"] for fault in soak.faults]
    rows = await postgres_fetch(
        soak.database_url,
        """
        WITH t AS (
            SELECT split_part(message_id, '-', 4)::bigint AS stamp,
                   extract(epoch FROM created_at) * 1000 AS done
            FROM tickets WHERE message_id LIKE $1)
        SELECT width_bucket(done::bigint, $2::bigint[]) AS segment, count(*) AS n,
               percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY done - stamp) AS p,
               max(done - stamp) AS largest
        FROM t GROUP BY GROUPING SETS ((segment), ()) ORDER BY segment NULLS FIRST
        """,
        f"soak-{soak.run}-%",
        thresholds,
    )
    figures: dict[int | None, dict[str, Any]] = {
        row["segment"]: {
            "bookings": row["n"],
            "p50_ms": round(row["p"][0], 1),
            "p99_ms": round(row["p"][1], 1),
            "max_ms": round(float(row["largest"]), 1),
        }
        for row in rows
    }
    overall = figures.get(None, {})
    # Every segment, those in which no ticket was written too (a fault that held them up).
    segments = [
        {
            "segment": segment,
            "ticketed_after": "the start" if segment == 0 else soak.faults[segment - 1]["fault"],
            **figures.get(segment, {"bookings": 0}),
        }
        for segment in range(len(soak.faults) + 1)
    ]
    return {"publish_to_ticket": overall, "publish_to_ticket_by_segment": segments}


def rss_figures(soak: Soak) -> dict[str, Any]:
    """VmRSS first, last and largest, and its slope in MB per 10 minutes pooled within
    process generations (each generation's first WARMUP_S left out), with each
    generation's own."""
    measured = [s for s in soak.samples if s.rss_mb is not None]
    if not measured:
        return {}
    generations: list[dict[str, Any]] = []
    sxy = sxx = 0.0
    for generation in sorted({s.generation for s in measured}):
        own = [s for s in measured if s.generation == generation]
        born = soak.generation_started.get(generation, own[0].t)
        steady = [s for s in own if s.t - born >= WARMUP_S]
        row: dict[str, Any] = {
            "generation": generation,
            "from_s": own[0].t,
            "to_s": own[-1].t,
            "rss_first_mb": round(own[0].rss_mb or 0, 1),
            "rss_last_mb": round(own[-1].rss_mb or 0, 1),
            "slope_mb_per_10min": None,
        }
        if len(steady) >= 3:
            mean_t = sum(s.t for s in steady) / len(steady)
            mean_r = sum(s.rss_mb or 0 for s in steady) / len(steady)
            own_xy = sum((s.t - mean_t) * ((s.rss_mb or 0) - mean_r) for s in steady)
            own_xx = sum((s.t - mean_t) ** 2 for s in steady)
            if own_xx:
                row["slope_mb_per_10min"] = round(own_xy / own_xx * 600, 2)
            sxy, sxx = sxy + own_xy, sxx + own_xx
        generations.append(row)
    return {
        "rss_first_mb": round(measured[0].rss_mb or 0, 1),
        "rss_last_mb": round(measured[-1].rss_mb or 0, 1),
        "rss_max_mb": round(max(s.rss_mb or 0 for s in measured), 1),
        "peak_rss_mb": round(soak.service.peak_rss_mb, 1),  # VmHWM, any generation
        "rss_slope_mb_per_10min": round(sxy / sxx * 600, 2) if sxx else None,
        "rss_generations": generations,
    }


def recoveries(soak: Soak) -> None:
    """Each fault's recovery_s, from the samples (see the module's docstring)."""
    limit = RECOVERED_AFTER_S * soak.args.rate
    for fault in soak.faults:
        fault["recovery_s"] = None
        for sample in soak.samples:
            depths = list(sample.ready.values())
            if sample.t < fault["ended_s"] or None in depths:
                continue
            if sum(d or 0 for d in depths) <= limit:
                fault["recovery_s"] = round(sample.t - fault["at_s"], 1)
                break


def unplanned(soak: Soak) -> int:
    """Failed publishes outside this run's broker restarts (and the 30 s after each)."""
    windows = [
        (soak.start + fault["at_s"], soak.start + fault["ended_s"] + 30)
        for fault in soak.faults
        if fault["fault"] == "broker"
    ]
    return sum(
        1 for at in soak.load.failed_at if not any(start <= at <= end for start, end in windows)
    )


def service_latency(soak: Soak) -> dict[str, Any]:
    """The median and the largest of the service's per-minute publish→ack p99s."""
    figures: dict[str, Any] = {}
    for name, minutes in soak.service_latency.items():
        p99s = sorted(minute["p99"] for minute in minutes)
        p50s = sorted(minute["p50"] for minute in minutes)
        figures[name] = {
            "minutes": len(minutes),
            "median_p50_ms": p50s[len(p50s) // 2],
            "median_p99_ms": p99s[len(p99s) // 2],
            "max_p99_ms": p99s[-1],
        }
    return figures


def log_events(directory: Path) -> dict[str, int]:
    """The service's warnings and errors (its JSON logs, every process), by event."""
    seen: Counter[str] = Counter()
    for path in sorted(directory.glob("service-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    seen[f"(not JSON) {line[:100]}"] += 1
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                seen[f"{entry['level']}: {str(entry.get('event'))[:100]}"] += 1
    return dict(seen.most_common(12))


async def dead_letters(soak: Soak) -> dict[str, Any]:
    service = soak.service
    dlq = await ready_messages(soak.args.url, service.dead_letter_queues)
    left = await ready_messages(soak.args.url, service.work_queues)
    return {
        "dead_letters": {queue.rsplit("-", 1)[-1]: depth for queue, depth in dlq.items()},
        "left_in_queues": {queue: depth for queue, depth in left.items() if depth},
    }


async def results(soak: Soak, drained: dict[str, Any]) -> dict[str, Any]:
    args, load, mail = soak.args, soak.load, soak.digests
    recoveries(soak)
    duration = args.minutes * 60
    return {
        "kind": "result",
        "minutes": args.minutes,
        "rate": args.rate,
        "fault_every_s": args.fault_every,
        "postgres_cut_s": args.postgres_cut,
        "broker_down_s": args.broker_down,
        "published_per_s": round(load.sent / duration, 1),
        "republished": load.republished,
        "failed_publishes": len(load.failed_at),
        # The broker went away when this run did not stop it: another client of a shared
        # broker did (its figures then include that outage).
        "failed_publishes_outside_broker_faults": unplanned(soak),
        "max_publish_lag_s": round(load.max_lag_s, 1),
        "faults": dict(Counter(fault["fault"] for fault in soak.faults)),
        **await ledger(soak),
        "notifications_mailed": mail.mailed,
        "notifications_missing": mail.missing(load.sent),
        "notifications_repeated": mail.repeated,
        "foreign_refs": mail.foreign,
        "digests": mail.digests,
        "resent_message_ids": sum(1 for n in mail.message_ids.values() if n > 1),
        **await ticket_latency(soak),
        "publish_to_mailed": {
            "p50_ms": mail.latency.percentile(0.5),
            "p99_ms": mail.latency.percentile(0.99),
            "max_ms": round(mail.latency.largest),
        },
        "service_publish_to_ack": service_latency(soak),
        **rss_figures(soak),
        "pipeline_restarts": soak.restarts.total(),
        "processes_started": soak.service.starts,
        "unexpected_exits": [
            {k: v for k, v in exit.items() if k != "log"} for exit in soak.unexpected_exits
        ],
        **await dead_letters(soak),
        **drained,
        "log_events": log_events(soak.service.directory),
        "fault_list": [{k: v for k, v in f.items() if k != "at_ms"} for f in soak.faults],
    }


# --- the run ---


async def run_soak(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Make what the run needs, run it, check; whatever happens, stop the service and
    remove its queues, database, proxy and SMTP server."""
    run = uuid.uuid4().hex[:8]
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(scratch_database("postgresql", args.postgres))
        smtp = stack.enter_context(smtp_server(str(directory)))
        url = make_url(database)
        proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
        await proxy.resume()
        stack.push_async_callback(proxy.cut)
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        broker = Broker(args.url, args.management)
        service = SoakService(
            directory,
            broker,
            f"soak-{run}",
            database_url=proxied,
            # Its own upload directory: the checkout's var/uploads may be another's.
            extra={"INGEST_SMTP_URL": smtp.url, "INGEST_UPLOAD_DIR": str(directory / "uploads")},
        )
        queues = [service.bookings_queue, service.notifications_queue]
        stack.push_async_callback(delete_queues, args.url, queues)
        stack.push_async_callback(kill, service)
        load = Load(args.url, service.bookings_queue, run, args.rate)
        soak = Soak(args, run, service, broker, proxy, database, Digests(smtp.record, run), load)
        note(f"soak-{run}: starting the service (logs in {directory})")
        await soak.start_service()
        soak.start = time.monotonic()
        soak.generation_started[1] = 0.0  # started just before the clock: no clock then
        until = soak.start + args.minutes * 60
        done = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(soak.sample_until(done))
            try:
                async with asyncio.TaskGroup() as running:
                    running.create_task(load.run_until(soak.start, until))
                    running.create_task(soak.faults_until(until))
                note(f"load over: {load.sent} bookings; waiting for every ticket and digest")
                drained = await drain(soak)
            finally:
                done.set()
        result = await results(soak, drained)
    return result


async def kill(service: SoakService) -> None:
    process = service.process
    if process is not None and process.returncode is None:
        process.kill()
        await process.wait()


async def delete_queues(url: str, queues: list[str]) -> None:
    for queue in queues:
        await delete_queue(url, queue)


# --- printing ---


def table(result: dict[str, Any]) -> str:
    latency = result["publish_to_ticket"]
    before = next((s for s in result["publish_to_ticket_by_segment"] if s["segment"] == 0), None)
    mailed = result["publish_to_mailed"]
    acks = result["service_publish_to_ack"]
    rows = [
        ("load", f"{result['minutes']:g} min at {result['rate']:g} bookings/s on PostgreSQL"),
        ("bookings published", f"{result['bookings']} ({result['published_per_s']}/s)"),
        ("republished (unconfirmed batches)", result["republished"]),
        (
            "failed publishes outside the broker restarts (another client's)",
            result["failed_publishes_outside_broker_faults"],
        ),
        ("faults", ", ".join(f"{n} x {kind}" for kind, n in result["faults"].items())),
        ("lost bookings (no ticket)", result["lost"]),
        ("duplicate tickets", result["duplicate_tickets"]),
        ("notifications in no digest", result["notifications_missing"]),
        ("notifications in more than one digest", result["notifications_repeated"]),
        ("digests resent under the same Message-ID", result["resent_message_ids"]),
        ("dead letters", _pairs(result["dead_letters"])),
        ("publish→ticket p50 / p99 / max (ms)", _triple(latency)),
        ("  before the first fault", _triple(before) if before else "—"),
        ("publish→mailed p50 / p99 (ms)", f"{mailed['p50_ms']} / {mailed['p99_ms']}"),
        (
            "service publish→ack p99, median / worst minute (ms)",
            "; ".join(
                f"{name} {f['median_p99_ms']} / {f['max_p99_ms']}" for name, f in acks.items()
            )
            or "—",
        ),
        (
            "RSS first / last / largest (MB)",
            f"{result.get('rss_first_mb')} / {result.get('rss_last_mb')} / "
            f"{result.get('rss_max_mb')}",
        ),
        ("RSS slope (MB per 10 min, within processes)", result.get("rss_slope_mb_per_10min")),
        ("pipeline restarts", _pairs(result["pipeline_restarts"]) or 0),
        ("processes started", result["processes_started"]),
        ("unexpected exits", len(result["unexpected_exits"])),
    ]
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {'—' if value is None else value} |" for name, value in rows]
    return "\n".join([*lines, "", faults_table(result)])


def faults_table(result: dict[str, Any]) -> str:
    """A row per fault: when, how long, when recovered, the publish→ticket p99 and max of
    the bookings ticketed from it to the next fault, and what the fault reported."""
    segments = {s["segment"]: s for s in result["publish_to_ticket_by_segment"]}
    lines = [
        "| # | fault | at (s) | ended (s) | recovered (s after its start) "
        "| publish→ticket p99 / max until the next fault (ms) | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = ("number", "fault", "at_s", "ended_s", "recovery_s")
    for fault in result["fault_list"]:
        segment = segments.get(fault["number"], {})
        latency = f"{segment.get('p99_ms', '—')} / {segment.get('max_ms', '—')}"
        detail = _pairs({k: v for k, v in fault.items() if k not in shown})
        lines.append(
            f"| {fault['number']} | {fault['fault']} | {fault['at_s']} | {fault['ended_s']} "
            f"| {fault['recovery_s']} | {latency} | {detail} |"
        )
    return "\n".join(lines)


def _triple(figures: dict[str, Any]) -> str:
    return f"{figures.get('p50_ms')} / {figures.get('p99_ms')} / {figures.get('max_ms')}"


def _pairs(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items())


FAULT_WORDS = {
    "connections": "the service's connections closed by the broker",
    "postgres": "PostgreSQL cut off for {postgres_cut:g} s",
    "sigkill": "SIGKILL then a new process",
    "sigterm": "SIGTERM then a new process",
    "broker": "the broker's app stopped for {broker_down:g} s",
}


def section(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown section for docs/RELIABILITY.md: heading, what ran, the tables."""
    command = f"python bench/soak.py --minutes {args.minutes:g} --rate {args.rate:g}"
    command += f" --fault-every {args.fault_every:g}"
    if args.faults != list(FAULTS):
        command += f" --faults {','.join(args.faults)}"
    faults = "; ".join(FAULT_WORDS[kind].format(**vars(args)) for kind in args.faults)
    text = (
        f"Produced by `{command}` on {datetime.now(UTC):%Y-%m-%d} ({os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}; RabbitMQ, PostgreSQL "
        "and the service on the same machine). The service runs as `ingest run` with its "
        "default settings (retry delays, 10 s digest windows kept in the database, circuit "
        "breaker) on a PostgreSQL database reached through a TCP proxy, under a steady load "
        "of bookings (users 1-3, open events, unique message_ids) from a publisher that "
        "publishes again what the broker did not confirm. One fault every "
        f"{args.fault_every:g} s, in turn: {faults}. After the load, every booking must "
        "have exactly one ticket and every notification be in a digest; the script exits 1 "
        "otherwise. *publish→ticket* runs from a booking's first publish attempt to its "
        "ticket's insert, for every booking (the acknowledgement follows within one "
        "confirmed publish); the row under it covers the tickets written before the first "
        "fault, the faults table's column those written from that fault to the next. The "
        "*RSS slope* is a least-squares fit within each process (a restart is no slope; "
        "each process's first 60 s left out). *Recovered* is when both work queues held "
        "two seconds of load or less again, counted from the fault's start."
    )
    return f"{HEADING}\n\n{textwrap.fill(text, 92)}\n\n{table(result)}\n"


def write_section(path: Path, text: str) -> None:
    """Replace the section under HEADING in `path` (up to the next heading of its level
    or above), else append it."""
    old = path.read_text() if path.exists() else ""
    start = old.find(HEADING + "\n")
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text if old else text)
        return
    rest = old[start + len(HEADING) :]
    following = re.search(r"^#{1,3} ", rest, re.M)
    end = start + len(HEADING) + following.start() if following else len(old)
    path.write_text(old[:start] + text + ("\n" + old[end:] if following else ""))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="of load (30)")
    parser.add_argument("--rate", type=float, default=2000.0, help="bookings a second (2000)")
    parser.add_argument(
        "--fault-every", type=float, default=180.0, help="seconds between faults (180)"
    )
    parser.add_argument(
        "--postgres-cut", type=float, default=60.0, help="seconds PostgreSQL is cut (60)"
    )
    parser.add_argument(
        "--broker-down", type=float, default=5.0, help="seconds between stop_app and start_app"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="the most seconds to wait after the load for every ticket and digest (600)",
    )
    parser.add_argument(
        "--faults",
        type=lambda text: text.split(","),
        default=list(FAULTS),
        help=f"the faults, in turn (default: {','.join(FAULTS)})",
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds (5)")
    parser.add_argument(
        "--url", default=os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    parser.add_argument(
        "--management", default=os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")
    )
    parser.add_argument("--postgres", default=os.environ.get("POSTGRES_URL", POSTGRES_URL))
    parser.add_argument("--logs", type=Path, help="keep the service's logs in this directory")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the section into FILE")
    return parser.parse_args()


def main() -> int:
    args = arguments()
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        note(f"unknown faults {', '.join(unknown)}: choose among {', '.join(FAULTS)}")
        return 2
    structlog.configure(  # the Publisher's warnings (the broker away) to stderr
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    problem = postgres_unreachable(args.postgres)
    if problem:
        note(f"the soak needs PostgreSQL (to cut it off): {problem}")
        return 2
    if "broker" in args.faults and shutil.which("rabbitmqctl") is None:
        note(
            "the broker fault needs rabbitmqctl, which is not on this machine: leave it out"
            " (--faults connections,postgres,sigkill,sigterm)"
        )
        return 2
    with contextlib.ExitStack() as files:
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            directory = args.logs
        else:
            directory = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        try:
            result = uvloop.run(cancel_on_sigterm(run_soak(args, directory)))
        except (asyncio.CancelledError, KeyboardInterrupt):
            note("interrupted: the service, queues, database and proxy made for it are gone")
            return 130
    print(json.dumps(result), flush=True)
    print()
    print(table(result))
    if args.markdown is not None:
        write_section(args.markdown, section(result, args))
        note(f"section written to {args.markdown}")
    failed = (
        result["lost"]
        or result["duplicate_tickets"]
        or result["unexpected_tickets"]
        or result["notifications_missing"]
    )
    return 1 if failed else 0


async def cancel_on_sigterm(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """SIGTERM as Ctrl-C: the run is cancelled and cleans up after itself."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


if __name__ == "__main__":
    sys.exit(main())
