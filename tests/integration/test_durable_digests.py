"""The notifications pipeline on durable windows (its default), on SQLite and PostgreSQL:
windows beyond the prefetch, one digest per recipient however many recipients, a window
mailed once by two processes, a flusher killed after sending, a database cut off, a mail
server gone past the attempts."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import uuid
from collections import Counter, defaultdict
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

import aiormq

from ingest.rabbitmq import REASON_HEADER, OutgoingMessage, Publisher
from tests.reliability.harness import ServiceProcess
from tests.support import TcpProxy, postgres_through_a_proxy

from .conftest import Broker, drain_queue, eventually, queue_depth
from .service import SmtpServer, metric, run_cli, running_service, smtp_server

REF = re.compile(r"\(ref (\S+)\)")


def notifications(recipients: int, each: int) -> list[OutgoingMessage]:
    """`each` notifications for every one of `recipients` recipients, interleaved."""
    prefix = uuid.uuid4().hex[:8]
    return [
        OutgoingMessage(
            json.dumps({"type": "email", "recipient": f"r{r}@example.com", "n": n}).encode(),
            "",
            message_id=f"{prefix}-{r}-{n}",
            content_type="application/json",
        )
        for n in range(each)
        for r in range(recipients)
    ]


async def publish(broker: Broker, queue: str, messages: list[OutgoingMessage]) -> list[str]:
    async with Publisher(broker.amqp_url, declare_queues={}) as publisher:
        for start in range(0, len(messages), 500):
            await publisher.publish_batch(
                [
                    OutgoingMessage(
                        m.body,
                        queue,
                        message_id=m.message_id,
                        content_type=m.content_type,
                    )
                    for m in messages[start : start + 500]
                ]
            )
    return [m.message_id for m in messages]


def refs_by_digest(inbox: list[EmailMessage]) -> dict[str, list[str]]:
    """Each Message-ID received (a repeat under `<id>#2`, ...) and the refs it listed."""
    digests: dict[str, list[str]] = {}
    for message in inbox:
        message_id, n = str(message["Message-ID"]), 1
        while f"{message_id}#{n}" in digests:
            n += 1
        digests[f"{message_id}#{n}"] = REF.findall(message.get_payload())
    return digests


async def mailed(smtp: SmtpServer, ids: list[str], timeout: float = 60) -> Counter[str]:
    """Wait until every one of `ids` was in a digest; how many digests listed each."""

    async def done() -> bool:
        refs = {ref for refs in refs_by_digest(smtp.inbox.messages).values() for ref in refs}
        return set(ids) <= refs

    await eventually(done, timeout=timeout)
    return Counter(r for refs in refs_by_digest(smtp.inbox.messages).values() for r in refs)


def service_settings(broker: Broker, queue: str, database_url: str, **email: Any) -> Any:
    return {
        "amqp_url": broker.amqp_url,
        "database_url": database_url,
        "pipelines": {
            "bookings": {"enabled": False},
            "notifications": {"queue": queue, "batchers": {"email": email}},
        },
    }


async def test_thousands_of_recipients_get_one_digest_each_past_the_prefetch(
    broker: Broker, queue_name: str, database_url: str
) -> None:
    async with (
        smtp_server() as smtp,
        running_service(
            **service_settings(broker, queue_name, database_url, batch_timeout=6.0),
            smtp_url=f"smtp://127.0.0.1:{smtp.port}",
        ),
    ):
        # 3,000 notifications in open windows at once: thirty times the prefetch (100).
        ids = await publish(broker, queue_name, notifications(1000, 3))
        refs = await mailed(smtp, ids, timeout=90)
    assert set(refs.values()) == {1}
    per_recipient = Counter(str(m["To"]) for m in smtp.inbox.messages)
    assert len(per_recipient) == 1000
    assert set(per_recipient.values()) == {1}


async def test_open_windows_are_in_the_metrics_and_the_snapshot(
    broker: Broker, queue_name: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path}/tickets.db"
    async with running_service(
        **service_settings(broker, queue_name, database, batch_timeout=60.0),
        mail_outbox=tmp_path / "outbox",
    ) as running:
        await publish(broker, queue_name, notifications(2, 5))

        async def stored() -> bool:
            _, text = await running.get_async("/metrics")
            labels = {"pipeline": "notifications", "batcher": "email"}
            return (
                metric(text, "ingest_open_window_messages", **labels) == 10
                and metric(text, "ingest_open_windows", **labels) == 2
            )

        await eventually(stored, timeout=15)
        _, body = await running.get_async("/api/snapshot")
        view = json.loads(body)["pipelines"]["notifications"]["open_batches"]["email"]
        assert (view["stored"], view["batches"], view["messages"]) == (True, 2, 10)
        assert view["oldest_s"] >= 0
        assert not (tmp_path / "outbox").exists()  # nothing mailed yet


async def test_two_processes_mail_each_window_once(
    broker: Broker, queue_name: str, database_url: str, tmp_path: Path
) -> None:
    async with smtp_server() as smtp:
        processes = [
            ServiceProcess(
                tmp_path / f"replica{i}",
                broker,
                queue_name,
                smtp_port=smtp.port,
                extra={
                    "INGEST_DATABASE_URL": database_url,
                    "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
                    "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": "4",
                },
            )
            for i in range(2)
        ]
        for process in processes:
            process.directory.mkdir()
        try:
            await asyncio.gather(*(p.start() for p in processes))
            ids = await publish(broker, f"{queue_name}-notifications", notifications(50, 30))
            refs = await mailed(smtp, ids)
        finally:
            for process in processes:
                await process.stop()
    assert set(refs.values()) == {1}
    assert sorted(Counter(str(m["To"]) for m in smtp.inbox.messages).values()) == [1] * 50


async def test_a_flusher_killed_after_sending_resends_the_same_message_id_only(
    broker: Broker, queue_name: str, database_url: str, tmp_path: Path
) -> None:
    async with smtp_server() as smtp:
        # A claim's windows are mailed side by side and completed together: the first
        # digest is accepted at once, the others of its claim take 3 s, and the process
        # is killed in between.
        smtp.inbox.delay_after_first = 3.0
        environment = {
            "INGEST_DATABASE_URL": database_url,
            "INGEST_PIPELINES__BOOKINGS__ENABLED": "false",
            # Windows of one (one notification per recipient), due together by their
            # timeout, whenever each was stored: closed and claimed together. (Closed
            # by size, the first could be claimed alone while the others arrive, and be
            # done before the kill: nothing to resend.)
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__BATCH_TIMEOUT": "2",
            "INGEST_PIPELINES__NOTIFICATIONS__BATCHERS__EMAIL__CONCURRENCY": "1",
        }
        first, second = (
            ServiceProcess(tmp_path / name, broker, queue_name, smtp.port, environment)
            for name in ("first", "second")
        )
        first.directory.mkdir()
        second.directory.mkdir()
        await first.start()
        ids = await publish(broker, f"{queue_name}-notifications", notifications(10, 1))
        await eventually(lambda: _at_least(smtp, 1), timeout=30)
        await first.stop(signal.SIGKILL)
        smtp.inbox.delay_after_first = None
        try:
            await second.start()
            await mailed(smtp, ids)
        finally:
            await second.stop()
    digests = refs_by_digest(smtp.inbox.messages)
    received = Counter(key.partition("#")[0] for key in digests)
    assert max(received.values()) == 2  # sent, killed before its window was completed
    assert all(count <= 2 for count in received.values())
    # A notification is only ever in the digest of its window, repeated as it was.
    listed_in: defaultdict[str, set[str]] = defaultdict(set)
    for key, refs in digests.items():
        for ref in refs:
            listed_in[ref].add(key.partition("#")[0])
    assert all(len(message_ids) == 1 for message_ids in listed_in.values())


async def _at_least(smtp: SmtpServer, count: int) -> bool:
    return len(smtp.inbox.messages) >= count


async def test_a_database_cut_off_holds_the_intake_and_loses_nothing(
    broker: Broker, queue_name: str, database_url: str
) -> None:
    proxy, proxied = await postgres_through_a_proxy(database_url)
    try:
        await _outage(broker, queue_name, proxy, proxied)
    finally:
        await proxy.cut()  # its listening socket too


async def _outage(broker: Broker, queue_name: str, proxy: TcpProxy, proxied: str) -> None:
    settings = service_settings(broker, queue_name, proxied, batch_timeout=1.0)
    settings["pipelines"]["notifications"]["circuit_breaker"] = {"open_delay": 1.0}
    async with (
        smtp_server() as smtp,
        running_service(**settings, smtp_url=f"smtp://127.0.0.1:{smtp.port}") as running,
    ):
        ids = await publish(broker, queue_name, notifications(20, 10))
        await proxy.cut()
        ids += await publish(broker, queue_name, notifications(20, 10))

        async def circuit_open() -> bool:
            _, text = await running.get_async("/metrics")
            return metric(text, "ingest_circuit_state", pipeline="notifications") == 2

        await eventually(circuit_open, timeout=20)
        await asyncio.sleep(5)
        await proxy.resume()
        refs = await mailed(smtp, ids, timeout=90)
        _, text = await running.get_async("/metrics")
    assert set(refs.values()) == {1}
    assert metric(text, "ingest_acks_total", pipeline="notifications", action="dead_letter") == 0


async def test_a_window_failing_past_its_attempts_is_dead_lettered_and_replays(
    broker: Broker,
    queue_name: str,
    tmp_path: Path,
    amqp: aiormq.abc.AbstractChannel,
) -> None:
    smtp = SmtpServer()  # not started yet: refused
    database = f"sqlite+aiosqlite:///{tmp_path}/tickets.db"
    settings = service_settings(broker, queue_name, database, batch_timeout=0.5)
    settings["pipelines"]["notifications"] |= {"retry_delays": [0.2], "retry_max_attempts": 2}
    environment = {
        "INGEST_AMQP_URL": broker.amqp_url,
        "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": queue_name,
    }
    async with running_service(**settings, smtp_url=f"smtp://127.0.0.1:{smtp.port}") as running:
        ids = await publish(broker, queue_name, notifications(2, 1))

        async def dead_lettered() -> bool:
            return await queue_depth(amqp, f"{queue_name}.dlq") == 2

        await eventually(dead_lettered, timeout=30)
        _, text = await running.get_async("/metrics")
        flushes = {"pipeline": "notifications", "batcher": "email"}
        assert metric(text, "ingest_window_flushes_total", **flushes, outcome="dead_letter") == 2
        assert metric(text, "ingest_window_flushes_total", **flushes, outcome="retry") == 2
        code, shown = await run_cli("dlq", "show", "notifications", **environment)
        assert code == 0
        assert "handle_batch raised" in shown
        smtp.start()
        try:
            code, replayed = await run_cli("dlq", "replay", "notifications", **environment)
            assert code == 0, replayed
            refs = await mailed(smtp, ids, timeout=30)
        finally:
            smtp.stop()
    assert set(refs.values()) == {1}


async def test_a_dead_letter_carries_the_payload_and_the_reason(
    broker: Broker, queue_name: str, tmp_path: Path, amqp: aiormq.abc.AbstractChannel
) -> None:
    smtp = SmtpServer()  # never started
    database = f"sqlite+aiosqlite:///{tmp_path}/tickets.db"
    settings = service_settings(broker, queue_name, database, batch_timeout=0.3)
    settings["pipelines"]["notifications"] |= {"retry_delays": [0.1], "retry_max_attempts": 1}
    async with running_service(**settings, smtp_url=f"smtp://127.0.0.1:{smtp.port}"):
        (sent,) = notifications(1, 1)
        await publish(broker, queue_name, [sent])

        async def dead_lettered() -> bool:
            return await queue_depth(amqp, f"{queue_name}.dlq") == 1

        await eventually(dead_lettered, timeout=30)
    (dead,) = await drain_queue(amqp, f"{queue_name}.dlq")
    properties = dead.header.properties
    assert json.loads(dead.body) == json.loads(sent.body)
    assert properties.message_id == sent.message_id
    reason = (properties.headers or {})[REASON_HEADER]
    assert reason.startswith("handle_batch raised")
