"""Replicas benchmark (issues 14 and 19): the notifications pipeline end to end in several
`ingest run` processes, digests going to an aiosmtpd server in a process of its own.

Setups (default settings: durable windows, so every one keeps its open windows in the
database the replicas share):
  partitioned_x1/_x2/_x3      1, 2 and 3 replicas sharing 16 partitions, on SQLite (with
                              several processes one of them flushes)
  competing_x3                3 replicas competing for one queue, on SQLite
  competing_durable_x3        3 replicas competing for one queue, windows in a PostgreSQL
                              database made for the run (SQLite, saying so, when PostgreSQL
                              is unreachable); a due window is claimed by one of them
  competing_durable_x3_kill   the same, one replica SIGKILLed --kill-after seconds after
                              publishing starts (mid-window): its stored windows are
                              flushed by the others, its unacknowledged deliveries
                              redelivered to them

For each setup: the replicas start and are ready, then --notifications notifications for
--recipients recipients are published through the exchange (or to the queue), as fast as
confirms allow; the replicas run until every notification was mailed (or 600 s). Printed,
as JSON lines and a table, timed from the first publish: msgs_per_s, notifications
acknowledged per second until the last acknowledgement (the replicas' /metrics; what
decides whether the queue piles up); mailed_msgs_per_s, to the last digest less the last
window's batch timeout; all_mailed_s; the replicas' CPU per message and largest peak RSS;
and the digest checks of bench/service.py: every notification in exactly one digest,
digests per recipient, resent Message-IDs, and the most partial digests (fewer than the
batch size) one recipient got within 0.9 windows (1: one digest per recipient per window).
Window store errors and flush retries (from /metrics) and the replicas' warnings (from
their logs) say what went wrong, if anything.

    python bench/replicas.py [--notifications 10000] [--recipients 500] [--window 5]
                             [--prefetch 1000] [--kill-after 3] [--setup NAME ...]
                             [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    cpu_seconds,
    delete_exchange,
    delete_queues,
    peak_rss_mb,
    postgres_database,
    postgres_unreachable,
)
from service import (
    POSTGRES_URL,
    MailWatch,
    check_digests,
    email_batcher,
    notification_messages,
    read_digests,
    smtp_server,
)

from ingest.rabbitmq import OutgoingMessage, Partitions, Publisher
from ingest.service.settings import PipelineSettings

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PARTITIONS = 16
FIRST_PORT = 8790
MAIL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Setup:
    replicas: int
    partitions: int = 0  # 0: all on one queue
    postgresql: bool = False  # the shared database: PostgreSQL, else SQLite
    kill: bool = False  # one replica SIGKILLed --kill-after s after publishing starts


SETUPS = {
    "partitioned_x1": Setup(1, PARTITIONS),
    "partitioned_x2": Setup(2, PARTITIONS),
    "partitioned_x3": Setup(3, PARTITIONS),
    "competing_x3": Setup(3),
    "competing_durable_x3": Setup(3, postgresql=True),
    "competing_durable_x3_kill": Setup(3, postgresql=True, kill=True),
}
# Counters read from each replica's /metrics: acknowledgements, and what the windows did.
METRIC = re.compile(
    r"^ingest_(messages_processed|window_flushes|window_store_errors)_total\{([^}]*)\} (\S+)$",
    re.MULTILINE,
)


@dataclass
class Replica:
    """One `ingest run` process, and what was read from it before it was killed."""

    index: int
    process: subprocess.Popen[bytes]
    log: Path
    cpu_at_kill: float | None = None
    metrics_at_kill: Counter[str] = field(default_factory=Counter)

    @property
    def port(self) -> int:
        return FIRST_PORT + self.index

    @property
    def alive(self) -> bool:
        return self.cpu_at_kill is None

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid) if self.alive else self.cpu_at_kill or 0.0

    def metrics(self) -> Counter[str]:
        return scrape(self.port) if self.alive else self.metrics_at_kill

    def kill(self) -> None:
        """SIGKILL, after reading what is lost with the process: its CPU and counters."""
        self.metrics_at_kill = scrape(self.port)
        self.cpu_at_kill = cpu_seconds(self.process.pid)
        self.process.send_signal(signal.SIGKILL)


def replica_environment(
    setup: Setup, queue: str, args: argparse.Namespace, directory: Path, urls: dict[str, str]
) -> dict[str, str]:
    """Default settings, but for the queue, its partitions, the prefetch and the window."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    base.update(
        {
            "INGEST_CONFIG": str(directory / "none.toml"),
            "INGEST_AMQP_URL": URL,
            "INGEST_DATABASE_URL": urls["database"],
            "INGEST_SMTP_URL": urls["smtp"],
            "INGEST_LOG_LEVEL": "WARNING",
            "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
            "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": queue,
            "INGEST_PIPELINES__NOTIFICATIONS__PARTITIONS": str(setup.partitions),
            "INGEST_PIPELINES__NOTIFICATIONS__STANDBY_DELAY": "2",
            "INGEST_PIPELINES__NOTIFICATIONS__PREFETCH_COUNT": str(args.prefetch),
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": str(args.window),
            "INGEST_REPLICAS": str(setup.replicas),
        }
    )
    return base


def start_replicas(
    setup: Setup, queue: str, args: argparse.Namespace, directory: Path, urls: dict[str, str]
) -> list[Replica]:
    base = replica_environment(setup, queue, args, directory, urls)
    replicas = []
    for index in range(setup.replicas):
        env = {
            **base,
            "INGEST_REPLICA_INDEX": str(index),
            "INGEST_HTTP_PORT": str(FIRST_PORT + index),
        }
        log = directory / f"replica{index}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "ingest", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        replicas.append(Replica(index, process, log))
    deadline = time.monotonic() + 60
    for replica in replicas:
        while not ready(replica.port):
            if replica.process.poll() is not None or time.monotonic() > deadline:
                tail = replica.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"replica {replica.index} not ready:\n{tail}")
            time.sleep(0.2)
    return replicas


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def scrape(port: int) -> Counter[str]:
    """The replica's acknowledgements (`processed`), window flushes by outcome
    (`flush_done`, `flush_retry`, ...) and window store errors by operation."""
    counts: Counter[str] = Counter()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return counts
    for name, labels, value in METRIC.findall(text):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "messages_processed":
            counts["processed"] += int(float(value))
        elif name == "window_flushes":
            counts[f"flush_{label.get('outcome')}"] += int(float(value))
        else:
            counts[f"store_error_{label.get('operation')}"] += int(float(value))
    return counts


async def publish(queue: str, partitions: int, messages: list[tuple[bytes, str]]) -> None:
    declare = PipelineSettings().queue_declare
    partitioned = Partitions(queue, partitions) if partitions else None
    hook = partitioned.publisher_hook(declare) if partitioned else None
    async with Publisher(
        URL, after_connect=hook, declare_queues={} if partitioned else {queue: declare(queue)}
    ) as publisher:
        for start in range(0, len(messages), 500):
            window = messages[start : start + 500]
            await publisher.publish_batch(
                [
                    partitioned.message(body, json.loads(body)["recipient"], message_id=mid)
                    if partitioned
                    else OutgoingMessage(body, queue, message_id=mid)
                    for body, mid in window
                ]
            )


def kill_later(victim: Replica, after: float, cleanup: contextlib.ExitStack) -> None:
    """SIGKILL `victim` `after` seconds from now, while the run goes on."""

    def kill() -> None:
        victim.kill()
        print(f"killed replica {victim.index} at {after} s", file=sys.stderr)

    timer = threading.Timer(after, kill)
    timer.start()
    cleanup.callback(timer.join)
    cleanup.callback(timer.cancel)  # first: a run that failed before the kill


@dataclass
class Timeline:
    """Seconds from the first publish: to the last acknowledgement and to the last
    notification mailed."""

    started: float = field(default_factory=time.monotonic)
    drained: float | None = None
    mailed: float | None = None


def watch(replicas: list[Replica], record: Path, count: int, timeline: Timeline) -> None:
    """Until every notification was mailed (or MAIL_TIMEOUT_S): when all were
    acknowledged (the replicas' counters, polled until then: each poll costs them a
    /metrics page), when all were mailed. A killed replica's acknowledgements after its
    last poll are not counted, and those of its redelivered messages are counted twice:
    counters that stopped within 1% of the count for 2 s are taken as drained."""
    mail = MailWatch(record)
    acknowledged, changed = 0, 0.0
    while time.monotonic() - timeline.started < MAIL_TIMEOUT_S:
        now = time.monotonic() - timeline.started
        if timeline.drained is None:
            total = sum(replica.metrics()["processed"] for replica in replicas)
            if total != acknowledged:
                acknowledged, changed = total, now
            stalled = acknowledged >= 0.99 * count and now - changed >= 2
            if acknowledged >= count or stalled:
                timeline.drained = changed
        if mail.read() >= count:
            timeline.mailed = now
            if timeline.drained is None:  # acknowledged after the digest (in memory)
                timeline.drained = now
            return
        time.sleep(0.5)


def run_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = SETUPS[name]
    on_postgres = setup.postgresql and not args.postgres_error
    if setup.postgresql and args.postgres_error:
        print(f"{name}: on SQLite, {args.postgres_error}", file=sys.stderr)
    queue = f"bench-replicas-{uuid.uuid4().hex[:8]}"
    messages, expected = notification_messages(
        args.notifications, args.recipients, random.Random(14)
    )
    with contextlib.ExitStack() as cleanup:
        temporary = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ingest-replicas-"))
        directory = Path(temporary)
        database = (
            cleanup.enter_context(postgres_database(args.postgres))
            if on_postgres
            else f"sqlite+aiosqlite:///{directory}/shared.db"
        )
        smtp = cleanup.enter_context(smtp_server(temporary))
        urls = {"database": database, "smtp": smtp.url}
        cleanup.callback(delete_topology, queue, setup.partitions)  # once replicas stopped
        replicas = start_replicas(setup, queue, args, directory, urls)
        cleanup.callback(stop_replicas, replicas)
        cpu_before = sum(replica.cpu() for replica in replicas)
        timeline = Timeline()
        victim = replicas[-1] if setup.kill else None
        if victim is not None:
            kill_later(victim, args.kill_after, cleanup)
        asyncio.run(publish(queue, setup.partitions, messages))
        watch(replicas, smtp.record, len(expected), timeline)
        cpu = sum(replica.cpu() for replica in replicas) - cpu_before
        figures = {
            "database": "postgresql" if on_postgres else "sqlite",
            "killed_at_s": args.kill_after if victim and not victim.alive else None,
            "service_cpu_us_per_msg": round(cpu * 1e6 / len(expected), 1),
            "peak_rss_mb": round(max(peak_rss_mb(r.process.pid) for r in replicas if r.alive), 1),
            **window_outcomes(replicas),
            **digest_figures(smtp.record, expected, timeline, args.window),
            "log_warnings": warnings(replicas),
        }
    return {"setup": name, "replicas": setup.replicas, "partitions": setup.partitions, **figures}


def delete_topology(queue: str, partitions: int) -> None:
    """The queues (each with its dead-letter and retry queues) and the exchange that the
    replicas and the publisher declared for the setup."""
    if not partitions:
        delete_queues(URL, [queue])
        return
    partitioned = Partitions(queue, partitions)
    delete_queues(URL, partitioned.queues)
    asyncio.run(delete_exchange(URL, partitioned.exchange))


def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.terminate()
    for replica in replicas:
        replica.process.wait(60)


def window_outcomes(replicas: list[Replica]) -> dict[str, Any]:
    """Window flushes by outcome and store errors, summed over the replicas (a killed
    one's as read before the kill)."""
    total: Counter[str] = Counter()
    for replica in replicas:
        total.update(replica.metrics())
    del total["processed"]
    return {"window_outcomes": dict(sorted(total.items()))}


def digest_figures(
    record: Path, expected: dict[str, str], timeline: Timeline, window: float
) -> dict[str, Any]:
    count = len(expected)
    batch_size, _ = email_batcher()
    digests = read_digests(record)
    last = time.monotonic() - timeline.started if timeline.mailed is None else timeline.mailed
    drained = timeline.drained if timeline.drained is not None else last
    return {
        "notifications": count,
        "recipients": len(set(expected.values())),
        "msgs_per_s": round(count / drained),
        "drained_s": round(drained, 2),
        "mailed_msgs_per_s": round(count / max(0.1, last - window)),
        "all_mailed_s": round(last, 2) if timeline.mailed is not None else None,
        **check_digests(digests, expected, batch_size, window),
    }


def warnings(replicas: list[Replica]) -> dict[str, int]:
    """The replicas' log lines at warning level or above, counted by their event."""
    seen: Counter[str] = Counter()
    for replica in replicas:
        for line in replica.log.read_text(errors="replace").splitlines():
            if re.search(r"\[(warning|error|critical)\s*\]|\b(Traceback|ERROR|CRITICAL)\b", line):
                seen[re.sub(r"^\S+ \[\w+\s*\] ", "", line)[:80]] += 1
    return dict(seen.most_common(5))


COLUMNS = (
    "setup",
    "database",
    "msgs_per_s",
    "mailed_msgs_per_s",
    "all_mailed_s",
    "service_cpu_us_per_msg",
    "peak_rss_mb",
    "digests_per_recipient",
    "most_partial_digests_in_one_window",
    "every_notification_once",
    "missing",
    "repeated",
    "resent_message_ids",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=10_000)
    parser.add_argument("--recipients", type=int, default=500)
    parser.add_argument("--window", type=float, default=5.0, help="the batch timeout (s)")
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--kill-after", type=float, default=3.0)
    parser.add_argument("--setup", action="append", choices=list(SETUPS))
    parser.add_argument("--postgres", default=os.environ.get("POSTGRES_URL", POSTGRES_URL))
    args = parser.parse_args()
    names = args.setup or list(SETUPS)
    needs_postgres = any(SETUPS[name].postgresql for name in names)
    args.postgres_error = postgres_unreachable(args.postgres) if needs_postgres else None
    rows = []
    for name in names:
        row = run_setup(name, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "—")) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
