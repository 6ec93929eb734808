"""Replicas without partitions, on a real three-node RabbitMQ cluster: three replicas of
the service compete for ONE notifications queue, their digest windows in the database they
share (durable windows, the default). One digest per recipient per window, whichever
replica took each notification; a replica killed mid-window loses nothing and puts no
notification in two different digests."""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.rabbitmq import OutgoingMessage, Publisher
from ingest.service.settings import PipelineSettings
from tests.cluster.rabbit import Cluster
from tests.integration.service import SmtpServer
from tests.reliability.harness import ServiceProcess
from tests.support import Broker, eventually

REPLICAS = 3
WINDOW_S = 5.0
RECIPIENTS = [f"person{n:02d}@example.com" for n in range(30)]
REF = re.compile(r"\(ref (\S+)\)")


class Competing:
    """Three `ingest run` processes on one queue, a database and a mail server."""

    def __init__(self, cluster: Cluster, directory: Path, smtp: SmtpServer) -> None:
        prefix = f"test-{uuid.uuid4().hex[:10]}"
        broker = Broker(cluster.urls, f"http://127.0.0.1:{cluster.nodes[0].management_port}")
        environment = {
            "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": str(WINDOW_S),
            "INGEST_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/shared.db",
        }
        self.processes = [
            ServiceProcess(directory / f"replica{i}", broker, prefix, smtp.port, environment)
            for i in range(REPLICAS)
        ]
        for process in self.processes:
            process.directory.mkdir(parents=True)
        self.urls = cluster.urls
        self.queue = self.processes[0].notifications_queue

    async def publish(self, count: int, spread_s: float = 0.0) -> list[str]:
        """`count` notifications for the 30 recipients in turn, over about `spread_s`."""
        ids = [f"n-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
        declare = {self.queue: PipelineSettings().queue_declare(self.queue)}
        async with Publisher(self.urls, declare_queues=declare) as publisher:
            for start in range(0, count, 50):
                await publisher.publish_batch(
                    [
                        OutgoingMessage(
                            f"email,{RECIPIENTS[i % 30]}".encode(), self.queue, message_id=ids[i]
                        )
                        for i in range(start, min(count, start + 50))
                    ]
                )
                if spread_s:
                    await asyncio.sleep(spread_s * 50 / count)
        return ids


@pytest.fixture
async def competing(cluster: Cluster, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Competing]:
    started = Competing(cluster, tmp_path, smtp)
    try:
        await asyncio.gather(*(p.start(ready_timeout=60) for p in started.processes))
        yield started
    finally:
        for process in started.processes:
            if process.process is not None and process.process.returncode is None:
                process.process.kill()
                await process.process.wait()


def digests(smtp: SmtpServer) -> list[tuple[str, str, list[str]]]:
    """(recipient, Message-ID, refs) of every digest received."""
    return [
        (str(m["To"]), str(m["Message-ID"]), REF.findall(m.get_payload()))
        for m in smtp.inbox.messages
    ]


async def all_mailed(smtp: SmtpServer, ids: list[str], timeout: float) -> None:
    async def done() -> bool:
        return set(ids) <= {ref for _, _, refs in digests(smtp) for ref in refs}

    await eventually(done, timeout=timeout)


async def test_a_burst_is_one_digest_per_recipient_across_competing_replicas(
    competing: Competing, smtp: SmtpServer
) -> None:
    ids = await competing.publish(600)
    await all_mailed(smtp, ids, timeout=WINDOW_S + 60)
    await asyncio.sleep(1.0)  # a second digest for anyone would be there by now
    assert Counter(to for to, _, _ in digests(smtp)) == dict.fromkeys(RECIPIENTS, 1)
    refs = Counter(ref for _, _, refs in digests(smtp) for ref in refs)
    assert len(refs) == 600
    assert set(refs.values()) == {1}


async def test_a_replica_killed_mid_window_loses_nothing_and_splits_no_digest(
    competing: Competing, smtp: SmtpServer
) -> None:
    victim = competing.processes[1]
    load = asyncio.create_task(competing.publish(1500, spread_s=6.0))
    await asyncio.sleep(2.0)
    await victim.stop(signal.SIGKILL)
    ids = await load
    await all_mailed(smtp, ids, timeout=90)
    # Every notification is in exactly one window's digest; a window whose flush was cut
    # short may be sent again, as the same email (its Message-ID).
    windows_of: defaultdict[str, set[str]] = defaultdict(set)
    for _, message_id, refs in digests(smtp):
        for ref in refs:
            windows_of[ref].add(message_id)
    assert {ref: w for ref, w in windows_of.items() if len(w) > 1} == {}
    windows = Counter(to for to, _ in {(to, message_id) for to, message_id, _ in digests(smtp)})
    # 50 each over about 6 s with 5 s windows: two windows each, a third at most when the
    # kill delayed the intake.
    assert max(windows.values()) <= 3, windows
