"""The `ingest` command as a person runs it: run and SIGTERM, publish, topology, a CSV
file without a broker, and the errors that stop it at start-up."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import aiormq
import pytest

from tests.support import free_port

from .conftest import Broker, eventually, queue_depth

INGEST = [sys.executable, "-m", "ingest"]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    values = {
        k: v for k, v in os.environ.items() if not k.startswith("INGEST_") or k == "INGEST_CONFIG"
    }
    values.update(
        {
            "INGEST_CONFIG": str(tmp_path / "none.toml"),
            "INGEST_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/tickets.db",
            "INGEST_MAIL_OUTBOX": str(tmp_path / "outbox"),
            "INGEST_LOG_FORMAT": "json",
            "INGEST_HTTP_PORT": str(free_port()),
        }
    )
    values.update(extra)
    return values


async def spawn(*args: str, environment: dict[str, str]) -> asyncio.subprocess.Process:
    """Start `python -m ingest <args>`, its output captured."""
    return await asyncio.create_subprocess_exec(
        *INGEST,
        *args,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def ingest(
    *args: str, environment: dict[str, str], timeout: float = 60
) -> tuple[int, str, str]:
    process = await spawn(*args, environment=environment)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def queues(queue_name: str) -> dict[str, str]:
    return {
        "INGEST_PIPELINES__BOOKINGS__QUEUE": f"{queue_name}-bookings",
        "INGEST_PIPELINES__NOTIFICATIONS__QUEUE": f"{queue_name}-notifications",
    }


def ticket_count(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "tickets.db") as db:
        return int(db.execute("select count(*) from tickets").fetchone()[0])


async def test_sigterm_drains_and_exits_zero_with_every_message_acknowledged(
    broker: Broker, queues: dict[str, str], tmp_path: Path, amqp: aiormq.abc.AbstractChannel
) -> None:
    environment = env(
        tmp_path,
        INGEST_AMQP_URL=broker.amqp_url,
        INGEST_SHUTDOWN_TIMEOUT="20",
        # Batches that never fill and never time out: only the drain can flush them.
        INGEST_PIPELINES__BOOKINGS__BATCHERS__DEFAULT__BATCH_TIMEOUT="600",
        INGEST_PIPELINES__BOOKINGS__BATCHERS__CINEMA__BATCH_TIMEOUT="600",
        INGEST_PIPELINES__BOOKINGS__BATCHERS__MUSICAL__BATCH_TIMEOUT="600",
        **queues,
    )
    code, out, err = await ingest("publish", "bookings", "--count", "40", environment=environment)
    assert code == 0, err
    assert "published 40 message(s)" in out
    process = await spawn("run", "--pipeline", "bookings", environment=environment)
    bookings_queue = queues["INGEST_PIPELINES__BOOKINGS__QUEUE"]
    await eventually(lambda: _depth(amqp, bookings_queue, 0), timeout=30)  # all delivered
    await asyncio.sleep(0.5)
    assert ticket_count(tmp_path) == 0  # every batch is still open, waiting
    process.send_signal(signal.SIGTERM)
    _, err_bytes = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err_bytes.decode()[-2000:]
    assert await queue_depth(amqp, bookings_queue) == 0  # nothing left unacknowledged
    assert ticket_count(tmp_path) == 40  # the drain flushed the open batches
    lines = [json.loads(line) for line in err_bytes.decode().splitlines() if line.startswith("{")]
    assert any(line["event"] == "draining" for line in lines)


async def test_a_csv_file_is_processed_without_a_broker(tmp_path: Path) -> None:
    bookings = tmp_path / "bookings.csv"
    bookings.write_text("cinema,1\nmusical,2\nnonsense\ncinema,42\n\ncomedy,3\n")
    environment = env(tmp_path, INGEST_AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F")
    code, _, err = await ingest(
        "run", "--pipeline", "bookings", "--file", str(bookings), environment=environment
    )
    assert code == 0, err
    assert ticket_count(tmp_path) == 3
    with (tmp_path / "bookings.errors.csv").open() as file:
        assert list(csv.reader(file)) == [
            ["line", "row", "reason"],
            ["3", "nonsense", "expected 'event,user_id', got 1 fields"],
            ["4", "cinema,42", "unknown user 42"],
        ]
    notifications = [
        json.loads(line)
        for line in (tmp_path / "bookings.notifications.jsonl").read_text().splitlines()
    ]
    assert sorted(n["message_id"] for n in notifications) == [
        "bookings.csv:1/notification",
        "bookings.csv:2/notification",
        "bookings.csv:6/notification",
    ]
    # The same file again creates no second ticket.
    code, _, err = await ingest(
        "run", "--pipeline", "bookings", "--file", str(bookings), environment=environment
    )
    assert code == 0, err
    assert ticket_count(tmp_path) == 3


async def test_topology_prints_every_pipeline(tmp_path: Path) -> None:
    code, out, _ = await ingest("topology", environment=env(tmp_path))
    assert code == 0
    assert "bookings\n├─ producer RabbitMQProducer (concurrency=1)" in out
    # The notifications' durable windows: two flushers claiming ten windows each.
    email = "(concurrency=2, batch_size=75, batch_timeout=10.0, windows=stored, claim_limit=10)"
    assert f"└─ batcher 'email' {email}" in out


@pytest.mark.parametrize(
    ("arguments", "extra", "toml", "message"),
    [
        (
            (),
            {"INGEST_PIPELINES__BOOKINGS__PREFETCH_COUNT": "10"},
            None,
            "raise prefetch_count to at least 300",
        ),
        (
            (),
            {"INGEST_PIPELINES__BOOKINGS__BATCHERS__OPERA__BATCH_SIZE": "5"},
            None,
            "unknown batcher opera",
        ),
        (
            (),
            {"INGEST_PIPELINES__CONCERTS__QUEUE": "q"},
            None,
            "settings name unknown pipeline concerts",
        ),
        ((), {"INGEST_HTTP_PORT": "http"}, None, "invalid settings: http_port"),
        (
            (),
            {"INGEST_PIPELINES__BOOKINGS__CLOSED_EVENTS": "musical"},
            None,
            'error parsing value for field "pipelines"',
        ),
        ((), {}, "[pipelines.bookings\n", "none.toml is not valid TOML"),
        (("--file", "pyproject.toml"), {}, None, "--file feeds one pipeline"),
        (
            (),
            {"INGEST_DATABASE_URL": "mysql+aiomysql://tickets@localhost/tickets"},
            None,
            "unsupported database 'mysql'",
        ),
    ],
    ids=[
        "prefetch-too-small",
        "unknown-batcher",
        "unknown-pipeline",
        "bad-port",
        "env-not-json",
        "bad-toml",
        "file-for-every-pipeline",
        "unsupported-database",
    ],
)
async def test_a_configuration_error_exits_2_with_one_clear_line(
    tmp_path: Path,
    arguments: tuple[str, ...],
    extra: dict[str, str],
    toml: str | None,
    message: str,
) -> None:
    if toml is not None:
        (tmp_path / "none.toml").write_text(toml)
    code, _, err = await ingest("run", *arguments, environment=env(tmp_path, **extra))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ingest: error: ")
    assert message in lines[0]


async def test_an_unreachable_database_exits_1_with_one_clear_line(tmp_path: Path) -> None:
    environment = env(
        tmp_path, INGEST_DATABASE_URL="postgresql+asyncpg://nobody:secret@127.0.0.1:1/none"
    )
    code, _, err = await ingest("run", environment=environment, timeout=60)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "ingest: error: database unreachable at postgresql+asyncpg://nobody:***@127.0.0.1:1/none"
    )
    assert "secret" not in err


async def _depth(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> bool:
    return await queue_depth(channel, queue) == count


async def test_publish_a_file_or_one_payload_with_confirms_and_message_ids(
    broker: Broker, queues: dict[str, str], tmp_path: Path, amqp: aiormq.abc.AbstractChannel
) -> None:
    environment = env(tmp_path, INGEST_AMQP_URL=broker.amqp_url, **queues)
    lines = tmp_path / "bookings.csv"
    # As `ingest run --file` reads it: a byte order mark, CRLF, a blank line, a line break
    # inside quotes, a JSON line.
    lines.write_bytes(
        b'\xef\xbb\xbfcinema,1\r\n\r\n"opera\ngala",2\nmusical,2\n{"event": "x", "user_id": 3}\n'
    )
    code, out, err = await ingest(
        "publish", "bookings", "--file", str(lines), environment=environment
    )
    assert (code, out.strip()) == (
        0,
        f"published 4 message(s) to {queues['INGEST_PIPELINES__BOOKINGS__QUEUE']}, all confirmed",
    ), err
    code, _, err = await ingest(
        "publish", "bookings", "--payload", "comedy,3", environment=environment
    )
    assert code == 0, err
    from .conftest import drain_queue

    taken = await drain_queue(amqp, queues["INGEST_PIPELINES__BOOKINGS__QUEUE"])
    assert [m.body for m in taken] == [
        b"cinema,1",
        b'"opera\ngala",2',
        b"musical,2",
        b'{"event": "x", "user_id": 3}',
        b"comedy,3",
    ]
    ids = {m.header.properties.message_id for m in taken}
    assert len(ids) == 5
    assert None not in ids
    assert {m.header.properties.delivery_mode for m in taken} == {2}


async def test_publish_to_an_unreachable_broker_exits_1(tmp_path: Path) -> None:
    environment = env(tmp_path, INGEST_AMQP_URL="amqp://guest:secret@127.0.0.1:1/%2F")
    code, _, err = await ingest(
        "publish", "bookings", "--payload", "x,1", environment=environment, timeout=90
    )
    assert code == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("ingest: error: publishing to amqp://guest:***@127.0.0.1:1/%2F failed")
    )


async def test_workers_compete_for_the_queue_and_stop_together(
    broker: Broker, queues: dict[str, str], tmp_path: Path, amqp: aiormq.abc.AbstractChannel
) -> None:
    import urllib.request

    from .service import metric

    port = free_port()  # the service's one address; the workers serve on private ports
    environment = env(
        tmp_path, INGEST_AMQP_URL=broker.amqp_url, INGEST_HTTP_PORT=str(port), **queues
    )
    process = await spawn(
        "run", "--workers", "2", "--pipeline", "bookings", environment=environment
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except OSError:
            return 0, ""

    async def ready() -> bool:  # both workers are (the supervisor's /readyz)
        return (await asyncio.to_thread(get, "/readyz"))[0] == 200

    # Both consume before anything is published, so the broker deals messages to both.
    await eventually(ready, timeout=40)
    code, _, err = await ingest("publish", "bookings", "--count", "1000", environment=environment)
    assert code == 0, err

    async def both_received() -> bool:
        text = (await asyncio.to_thread(get, "/metrics"))[1]
        counts = [
            metric(text, "ingest_messages_received_total", pipeline="bookings", worker=worker)
            for worker in ("0", "1")
        ]
        return all(count > 0 for count in counts)

    await eventually(both_received, timeout=30)
    await eventually(lambda: _true(ticket_count(tmp_path) == 1000), timeout=30)
    process.send_signal(signal.SIGTERM)
    _, err_bytes = await asyncio.wait_for(process.communicate(), 40)
    assert process.returncode == 0, err_bytes.decode()[-2000:]
    assert await queue_depth(amqp, queues["INGEST_PIPELINES__BOOKINGS__QUEUE"]) == 0
    assert ticket_count(tmp_path) == 1000


async def _true(value: bool) -> bool:
    return value
