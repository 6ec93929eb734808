"""Replicas benchmark (issue 14): the notifications pipeline end to end with 1, 2 and 3
replicas (`ingest run` processes) sharing 16 partitions, and, for comparison, 3 replicas
competing for one queue; digests go to an aiosmtpd server in a process of its own.

For each setup: the replicas start and are ready, then --notifications notifications for
--recipients recipients are published through the exchange (or to the queue), as fast as
confirms allow. Printed, as JSON lines and a table: msgs/s from the first publish to the
last digest (and without the last batch window), the replicas' CPU per message, digests per
recipient, the most digests one recipient got within one window (1 is key-affine), and
whether every notification was in exactly one digest.

    python bench/replicas.py [--notifications 10000] [--recipients 500] [--window 5]
                             [--prefetch 1000] [--setup NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import cpu_seconds
from service import check_digests, notification_messages, smtp_server

from ingest.rabbitmq import OutgoingMessage, Partitions, Publisher
from ingest.service.settings import PipelineSettings

URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PARTITIONS = 16
SETUPS = {  # name: (replicas, partitions)
    "partitioned_x1": (1, PARTITIONS),
    "partitioned_x2": (2, PARTITIONS),
    "partitioned_x3": (3, PARTITIONS),
    "competing_x3": (3, 0),
}


def start_replicas(
    replicas: int, partitions: int, queue: str, args: argparse.Namespace, directory: Path, smtp: str
) -> list[subprocess.Popen[bytes]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    base.update(
        {
            "INGEST_CONFIG": str(directory / "none.toml"),
            "INGEST_AMQP_URL": URL,
            "INGEST_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/shared.db",
            "INGEST_SMTP_URL": smtp,
            "INGEST_LOG_LEVEL": "WARNING",
            "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
            "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": queue,
            "INGEST_PIPELINES__NOTIFICATIONS__PARTITIONS": str(partitions),
            "INGEST_PIPELINES__NOTIFICATIONS__STANDBY_DELAY": "2",
            "INGEST_PIPELINES__NOTIFICATIONS__PREFETCH_COUNT": str(args.prefetch),
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": str(args.window),
            "INGEST_REPLICAS": str(replicas),
        }
    )
    processes = []
    for index in range(replicas):
        env = {**base, "INGEST_REPLICA_INDEX": str(index), "INGEST_HTTP_PORT": str(8790 + index)}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "ingest", "run"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(directory / f"replica{index}.log").open("wb"),
            )
        )
    deadline = time.monotonic() + 60
    for index in range(replicas):
        while not ready(8790 + index):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {index} not ready: see {directory}")
            time.sleep(0.2)
    return processes


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


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


def most_in_one_window(record: Path, window: float) -> tuple[float, int]:
    """Digests per recipient, and the most digests one recipient got within `window`."""
    times: dict[str, list[float]] = defaultdict(list)
    for line in record.read_text().splitlines():
        digest = json.loads(line)
        times[digest["to"][0]].append(digest["at"])
    most = 0
    for stamps in times.values():
        stamps.sort()
        start = 0
        for end, stamp in enumerate(stamps):
            while stamp - stamps[start] >= window:
                start += 1
            most = max(most, end - start + 1)
    total = sum(len(s) for s in times.values())
    return round(total / max(1, len(times)), 2), most


def run_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import random

    replicas, partitions = SETUPS[name]
    queue = f"bench-replicas-{uuid.uuid4().hex[:8]}"
    messages, expected = notification_messages(
        args.notifications, args.recipients, random.Random(14)
    )
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        with smtp_server(temporary) as smtp:
            processes = start_replicas(replicas, partitions, queue, args, directory, smtp.url)
            try:
                cpu_before = sum(cpu_seconds(p.pid) for p in processes)
                started = time.monotonic()
                asyncio.run(publish(queue, partitions, messages))
                while len(check_digests_refs(smtp.record)) < len(expected):
                    if time.monotonic() - started > 600:
                        break
                    time.sleep(0.1)
                seconds = time.monotonic() - started
                cpu = sum(cpu_seconds(p.pid) for p in processes) - cpu_before
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(60)
            check = check_digests(smtp.record, expected)
            per_recipient, most = most_in_one_window(smtp.record, args.window)
    count = len(expected)
    return {
        "setup": name,
        "replicas": replicas,
        "partitions": partitions,
        "notifications": count,
        "recipients": args.recipients,
        "seconds": round(seconds, 2),
        "msgs_per_s": round(count / seconds),
        "msgs_per_s_without_last_window": round(count / max(0.1, seconds - args.window)),
        "service_cpu_us_per_msg": round(cpu * 1e6 / count, 1),
        "digests": check["digests"],
        "digests_per_recipient": per_recipient,
        "most_digests_one_recipient_one_window": most,
        "every_notification_once": check["every_notification_once"],
    }


def check_digests_refs(record: Path) -> set[str]:
    if not record.exists():
        return set()
    return {ref for line in record.read_text().splitlines() for ref in json.loads(line)["refs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=10_000)
    parser.add_argument("--recipients", type=int, default=500)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--setup", action="append", choices=list(SETUPS))
    args = parser.parse_args()
    rows = []
    for name in args.setup or list(SETUPS):
        row = run_setup(name, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    columns = [
        "setup",
        "msgs_per_s",
        "msgs_per_s_without_last_window",
        "service_cpu_us_per_msg",
        "digests_per_recipient",
        "most_digests_one_recipient_one_window",
        "every_notification_once",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
