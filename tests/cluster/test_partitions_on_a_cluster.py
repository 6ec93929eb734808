"""Key-affine scale-out, proved on a real three-node RabbitMQ cluster with three replicas
of the service (subprocesses): one digest per recipient across the replicas, a killed
replica's partitions taken over by the others, a stopped broker node costing nothing."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest

from ingest.exceptions import PublishError
from ingest.rabbitmq import Partitions, Publisher
from ingest.service.settings import PipelineSettings
from tests.cluster.rabbit import Cluster
from tests.integration.service import SmtpServer, run_cli
from tests.reliability.harness import ServiceProcess
from tests.support import Broker, eventually

PARTITIONS = 6
REPLICAS = 3
STANDBY_DELAY_S = 4.0
WINDOW_S = 5.0  # the email batcher's batch_timeout: one digest per recipient per window
RECIPIENTS = [f"person{n:02d}@example.com" for n in range(30)]


class Replicas:
    """Three `ingest run` processes sharing the partitions, a database and a mail server."""

    def __init__(self, cluster: Cluster, directory: Path, smtp: SmtpServer) -> None:
        prefix = f"test-{uuid.uuid4().hex[:10]}"
        self.partitions = Partitions(f"{prefix}-notifications", PARTITIONS)
        broker = Broker(cluster.urls, f"http://127.0.0.1:{cluster.nodes[0].management_port}")
        self.environment = {
            "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
            "INGEST_PIPELINES__NOTIFICATIONS__PARTITIONS": str(PARTITIONS),
            "INGEST_PIPELINES__NOTIFICATIONS__STANDBY_DELAY": str(STANDBY_DELAY_S),
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": str(WINDOW_S),
            # A partition holds a window's notifications of all its recipients (600 over 6
            # partitions, unevenly): past its consumer's prefetch, the rest would wait for
            # acks and make second digests.
            "INGEST_PIPELINES__NOTIFICATIONS__PREFETCH_COUNT": "300",
            "INGEST_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/shared.db",
            "INGEST_REPLICAS": str(REPLICAS),
        }
        self.processes = [
            ServiceProcess(
                directory / f"replica{i}",
                broker,
                prefix,
                smtp_port=smtp.port,
                extra={**self.environment, "INGEST_REPLICA_INDEX": str(i)},
            )
            for i in range(REPLICAS)
        ]
        for process in self.processes:
            process.directory.mkdir(parents=True)
        self.cluster = cluster
        self.urls = cluster.urls

    async def start(self) -> None:
        await asyncio.gather(*(p.start(ready_timeout=60) for p in self.processes))

    async def stop(self) -> None:
        for process in self.processes:
            if process.process is not None and process.process.returncode is None:
                await process.stop()

    def pids(self) -> list[int]:
        return [p.process.pid for p in self.processes if p.process is not None]

    async def active(self) -> dict[str, int | None]:
        return await asyncio.to_thread(self.cluster.active_consumer_pids, self.partitions.queues)

    async def publish(self, count: int, *, spread_s: float = 0.0) -> list[str]:
        """`count` notifications for the 30 recipients in turn, through the exchange, over
        about `spread_s` seconds; their message ids."""
        ids = [f"n-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
        declare = PipelineSettings().queue_declare
        window = 50
        async with Publisher(
            self.urls, after_connect=self.partitions.publisher_hook(declare)
        ) as publisher:
            for start in range(0, count, window):
                batch = [
                    self.partitions.message(
                        f"email,{RECIPIENTS[i % 30]}".encode(),
                        RECIPIENTS[i % 30],
                        message_id=ids[i],
                    )
                    for i in range(start, min(count, start + window))
                ]
                # The publisher's node may be the one a test stops: as a careful publisher
                # would, send the unconfirmed batch again, over a new connection (the
                # consumers skip an id they hold).
                for attempt in range(3):
                    try:
                        await publisher.publish_batch(batch)
                        break
                    except PublishError:
                        if attempt == 2:
                            raise
                        await asyncio.sleep(1.0)
                if spread_s:
                    await asyncio.sleep(spread_s * window / count)
        return ids


@pytest.fixture
async def replicas(cluster: Cluster, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Replicas]:
    started = Replicas(cluster, tmp_path, smtp)
    try:
        await started.start()
        yield started
    finally:
        for process in started.processes:
            if process.process is not None and process.process.returncode is None:
                process.process.kill()
                await process.process.wait()


def references(smtp: SmtpServer) -> Counter[str]:
    """How many digests listed each notification."""
    refs: Counter[str] = Counter()
    for message in smtp.inbox.messages:
        refs.update(re.findall(r"\(ref (\S+)\)", message.get_payload()))
    return refs


async def delivered(
    smtp: SmtpServer, ids: list[str], timeout: float, replicas: Replicas
) -> Counter[str]:
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(references(smtp)):
        if time.monotonic() > deadline:
            missing = set(ids) - set(references(smtp))
            raise AssertionError(
                f"{len(missing)} of {len(ids)} notifications never mailed; "
                + await asyncio.to_thread(where_they_wait, replicas, missing)
            )
        await asyncio.sleep(0.2)
    return references(smtp)


def where_they_wait(replicas: Replicas, missing: set[str]) -> str:
    """Where notifications that were never mailed are: the partitions' depths and
    consumers, the shared window store, the replicas' last log lines."""
    lines = []
    for queue in replicas.partitions.queues:
        try:
            q = replicas.cluster.api(f"queues/%2F/{quote(queue, safe='')}")
            lines.append(
                f"{queue}: ready {q.get('messages_ready')} unacked "
                f"{q.get('messages_unacknowledged')} consumers {q.get('consumers')} "
                f"leader {q.get('leader') or q.get('node')}"
            )
        except OSError as exc:
            lines.append(f"{queue}: {exc!r}")
    database = replicas.processes[0].directory.parent / "shared.db"
    with sqlite3.connect(database, timeout=10) as db:
        marks = ",".join("?" * len(missing))
        stored = db.execute(
            f"SELECT window_id IS NULL, count(*) FROM ingest_window_messages "
            f"WHERE message_id IN ({marks}) GROUP BY 1",
            list(missing),
        ).fetchall()
        done = db.execute(
            f"SELECT count(*) FROM ingest_window_done WHERE message_id IN ({marks})",
            list(missing),
        ).fetchone()
        windows = db.execute(
            "SELECT count(*), min(not_before), max(attempts), max(last_error) "
            "FROM ingest_window_windows"
        ).fetchone()
    lines.append(f"missing in the store (open?, count): {stored}; done: {done}")
    lines.append(f"closed windows (count, not_before, attempts, error): {windows}")
    for process in replicas.processes:
        lines.append(f"--- {process.directory.name}: {process.log()[-1500:]}")
    return "\n".join(lines)


async def test_each_partition_is_consumed_by_its_owner(replicas: Replicas) -> None:
    owner = {
        replicas.partitions.queue_of(p): replicas.pids()[p % REPLICAS] for p in range(PARTITIONS)
    }

    async def owned() -> bool:
        return await replicas.active() == owner

    await eventually(owned, timeout=15)  # the management API shows consumers a little later


async def test_a_burst_is_one_digest_per_recipient_across_the_replicas(
    replicas: Replicas, smtp: SmtpServer
) -> None:
    environment = {**replicas.environment, "INGEST_AMQP_URL": replicas.urls}
    environment["INGEST_PIPELINES__NOTIFICATIONS__QUEUE"] = replicas.partitions.queue
    lines = [f"email,{RECIPIENTS[i % 30]}" for i in range(600)]
    burst = replicas.processes[0].directory / "burst.csv"
    burst.write_text("\n".join(lines) + "\n")
    # As a person would: `ingest publish`, which routes each line by its recipient.
    code, output = await run_cli("publish", "notifications", "--file", str(burst), **environment)
    assert code == 0, output
    assert f"to {replicas.partitions.exchange}" in output

    async def all_mailed() -> bool:
        return sum(references(smtp).values()) >= 600

    deadline = time.monotonic() + WINDOW_S + 30
    while not await all_mailed():
        assert time.monotonic() < deadline, f"{sum(references(smtp).values())} of 600 mailed"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # a second digest for anyone would be there by now
    digests = Counter(str(m["To"]) for m in smtp.inbox.messages)
    assert digests == dict.fromkeys(RECIPIENTS, 1)
    refs = references(smtp)
    assert len(refs) == 600  # every notification (ingest publish gives each its own id)
    assert set(refs.values()) == {1}


async def test_a_killed_replicas_partitions_move_to_the_others_and_nothing_is_lost(
    replicas: Replicas, smtp: SmtpServer
) -> None:
    victim = replicas.processes[1]
    assert victim.process is not None
    load = asyncio.create_task(replicas.publish(1500, spread_s=6.0))
    await asyncio.sleep(2.0)
    victim.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await victim.process.wait()
    survivors = set(replicas.pids()) - {victim.process.pid}

    moved_after: float | None = None
    while moved_after is None:
        active = await replicas.active()
        if all(pid in survivors for pid in active.values()):
            moved_after = time.monotonic() - killed_at
        elif time.monotonic() - killed_at > 30:
            raise AssertionError(f"partitions not taken over: {active}")
        else:
            await asyncio.sleep(0.25)
    print(f"partitions moved {moved_after:.1f} s after the kill")
    assert moved_after <= 15, moved_after
    ids = await load
    refs = await delivered(smtp, ids, timeout=90, replicas=replicas)
    repeated = {ref: n for ref, n in refs.items() if n > 1}
    assert not repeated, f"emailed twice: {repeated}"


async def test_a_stopped_broker_node_loses_nothing(
    cluster: Cluster, replicas: Replicas, smtp: SmtpServer
) -> None:
    load = asyncio.create_task(replicas.publish(1500, spread_s=6.0))
    await asyncio.sleep(2.0)
    # Every queue of the pipeline is replicated, its retry queues too: a classic one on
    # the node about to stop could not be declared, and its partition's consumers would
    # never start again (seen: 330 of 1,500 never mailed).
    ours = tuple(replicas.partitions.queues)
    queues = await asyncio.to_thread(cluster.api, "queues/%2F")
    kinds = {q["name"]: q["type"] for q in queues if q["name"].startswith(ours)}
    assert any(".retry." in name for name in kinds), kinds
    assert set(kinds.values()) == {"quorum"}, kinds
    stopped = cluster.nodes[1]
    await asyncio.to_thread(stopped.ctl, "stop_app")
    try:
        ids = await load
        refs = await delivered(smtp, ids, timeout=120, replicas=replicas)
        repeated = {ref: n for ref, n in refs.items() if n > 1}
        assert not repeated, f"emailed twice: {repeated}"
        # The replicas are consuming again, from the two nodes left.
        active = await replicas.active()
        assert all(pid in replicas.pids() for pid in active.values()), active
    finally:
        await asyncio.to_thread(stopped.ctl, "start_app")
        await asyncio.to_thread(stopped.await_startup)
