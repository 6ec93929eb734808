"""Pause and resume a running service: `ingest pause` / `ingest resume` and the HTTP
endpoints behind the admin token; the broker stops delivering (the consumer is cancelled),
messages wait in the queue, /readyz and the metrics say paused, and resuming consumes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiormq
import pytest

from .conftest import Broker, eventually, queue_depth
from .service import RunningService, call, local_service, metric, publish_from_ui, run_cli

TOKEN = "s3cret-admin-token"


@pytest.fixture
async def service(
    broker: Broker, queue_name: str, tmp_path: object
) -> AsyncIterator[RunningService]:
    async with local_service(broker, queue_name, tmp_path, admin_token=TOKEN) as running:
        yield running


async def ingest(running: RunningService, *args: str) -> tuple[int, str]:
    port = str(running.settings.http_port)
    return await run_cli(*args, INGEST_HTTP_PORT=port, INGEST_ADMIN_TOKEN=TOKEN)


async def consumers(broker: Broker, queue: str) -> int:
    info = await broker.api_async("GET", f"queues/%2F/{queue}")
    return int(info.get("consumers", 0))


async def test_paused_from_the_command_line_messages_wait_until_resumed(
    broker: Broker, queue_name: str, service: RunningService, amqp: aiormq.abc.AbstractChannel
) -> None:
    queue = f"{queue_name}-bookings"
    code, out = await ingest(service, "pause", "bookings")
    assert (code, out.strip()) == (0, f"bookings at {service.http}: paused (holds: paused)")
    await eventually(lambda: _equals(consumers(broker, queue), 0), timeout=15)
    status, body = await service.get_async("/readyz")
    assert status == 503
    assert json.loads(body)["not_ready"] == {"bookings": "paused"}
    _, text = await service.get_async("/metrics")
    assert metric(text, "ingest_pipeline_paused", pipeline="bookings") == 1.0

    for n in range(5):
        assert publish_from_ui(broker, queue, "cinema,1", f"paused-{n}")
    await asyncio.sleep(1.0)
    assert await queue_depth(amqp, queue) == 5  # nothing taken while paused

    code, out = await ingest(service, "resume", "bookings")
    assert code == 0, out
    assert "consuming (holds: none)" in out
    await eventually(lambda: _equals(queue_depth(amqp, queue), 0), timeout=15)
    status, _ = await service.get_async("/readyz")
    assert status == 200


async def test_the_admin_endpoints_need_the_token(service: RunningService) -> None:
    url = f"{service.http}/pipelines/bookings/pause"
    assert (await asyncio.to_thread(call, url, None))[0] == 401
    assert (await asyncio.to_thread(call, url, "wrong"))[0] == 401
    status, body = await asyncio.to_thread(call, f"{service.http}/pipelines/nope/pause", TOKEN)
    assert status == 404
    assert "no pipeline 'nope'" in str(body["error"])
    status, body = await asyncio.to_thread(call, url, TOKEN)
    assert (status, body["paused"]) == (200, True)
    status, body = await asyncio.to_thread(call, url.replace("pause", "resume"), TOKEN)
    assert (status, body["paused"]) == (200, False)
    # Read-only endpoints stay open.
    assert (await service.get_async("/metrics"))[0] == 200


async def test_without_an_admin_token_the_actions_are_refused_saying_why(
    broker: Broker, queue_name: str, tmp_path: object
) -> None:
    async with local_service(broker, queue_name, tmp_path) as running:
        status, body = await asyncio.to_thread(
            call, f"{running.http}/pipelines/bookings/pause", TOKEN
        )
        assert status == 403
        assert "set INGEST_ADMIN_TOKEN" in str(body["error"])
        code, out = await ingest(running, "pause", "bookings")
        assert code == 1
        assert "403 admin endpoints are off" in out


async def _equals(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]
