"""Fixtures shared by every test directory: the real RabbitMQ (`RABBITMQ_URL`, else the
broker on 127.0.0.1:5672, else a throw-away one from testcontainers), unique queue names
that are cleaned up, and databases (SQLite, and PostgreSQL where one answers)."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiormq
import pytest

from tests.support import LOCAL_URL, POSTGRES_URL, Broker, port_open

# pyproject's per-test timeout fits unit and integration tests; a reliability scenario
# drives thousands of messages through restarts, more at a larger scale.
CLUSTER_TIMEOUT_S = 300  # the first test starts the three nodes
RELIABILITY_TIMEOUT_S = 600 * max(1.0, float(os.environ.get("INGEST_RELIABILITY_SCALE", "1")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
        elif "tests/reliability/" in str(item.path):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.timeout(RELIABILITY_TIMEOUT_S))
        elif "tests/cluster/" in str(item.path):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.timeout(CLUSTER_TIMEOUT_S))


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    url = os.environ.get("RABBITMQ_URL")
    if url:
        host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
        yield Broker(url, os.environ.get("RABBITMQ_MANAGEMENT_URL", f"http://{host}:15672"))
        return
    if port_open("127.0.0.1", 5672):
        yield Broker(LOCAL_URL, os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672"))
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management").with_exposed_ports(5672, 15672)
        container.start()
    except Exception as exc:  # no Docker engine either
        pytest.fail(
            f"no RabbitMQ: set RABBITMQ_URL, run one on 127.0.0.1:5672, or provide Docker "
            f"for testcontainers ({exc!r})"
        )
    host = container.get_container_host_ip()
    amqp_port = container.get_exposed_port(5672)
    http_port = container.get_exposed_port(15672)
    try:
        yield Broker(f"amqp://guest:guest@{host}:{amqp_port}/%2F", f"http://{host}:{http_port}")
    finally:
        container.stop()


@pytest.fixture
async def amqp(broker: Broker) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain channel for the test's own declaring, publishing and inspecting."""
    connection = await aiormq.connect(broker.amqp_url)
    channel = await connection.channel()
    yield channel
    await connection.close()


@pytest.fixture
async def queue_name(broker: Broker) -> AsyncIterator[str]:
    """A unique name: every queue whose name starts with it is deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    connection = await aiormq.connect(broker.amqp_url)
    channel = await connection.channel()
    queues = await broker.api_async("GET", "queues/%2F?columns=name")
    for queue in queues:
        if queue["name"].startswith(name):
            await channel.queue_delete(queue["name"])
    await connection.close()


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[Any]:
    """The tickets service running in-process (`local_service`: SQLite and an outbox in
    `tmp_path`), its admin token `tests.integration.uploads.TOKEN`, uploads spooled in
    `tmp_path / "uploads"`; stopped (drained) after the test."""
    # Imported here: the unit tests need neither the service nor an SMTP server.
    from tests.integration.service import local_service
    from tests.integration.uploads import TOKEN

    async with local_service(
        broker, queue_name, tmp_path, admin_token=TOKEN, upload_dir=tmp_path / "uploads"
    ) as running:
        yield running


def _databases() -> list[str]:
    kinds = ["sqlite"]
    if os.environ.get("INGEST_DATABASE_URL", "").startswith("postgresql") or port_open(
        "127.0.0.1", 5432
    ):
        kinds.append("postgresql")
    return kinds


@pytest.fixture(params=_databases())
async def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[str]:
    """SQLite in a temporary file, and PostgreSQL (`INGEST_DATABASE_URL`, else the local
    server) in a database made for the test and dropped after it."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/tickets.db"
        return
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(os.environ.get("INGEST_DATABASE_URL") or POSTGRES_URL)
    name = f"ingest_test_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(
        host=base.host,
        port=base.port,
        user=base.username,
        password=base.password,
        database=base.database,
    )
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def span_exporter() -> Iterator[Any]:
    """Tracing on for the test, every span exported at once to the in-memory exporter
    yielded (`get_finished_spans()`); off again afterwards."""
    # Imported here: only the tracing tests need OpenTelemetry.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ingest.service import tracing
    from ingest.service.tracing.provider import Tracing

    spans = InMemorySpanExporter()
    tracing.install(Tracing(TracerProvider(), exporter=spans))
    yield spans
    tracing.uninstall()
