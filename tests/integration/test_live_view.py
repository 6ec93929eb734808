"""The live figures of a running service: `GET /api/snapshot` and the server-sent events of
`GET /events` (one snapshot a second) move as bookings go through."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from .conftest import Broker, eventually
from .service import RunningService, local_service, publish_from_ui


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Any) -> AsyncIterator[RunningService]:
    async with local_service(broker, queue_name, tmp_path, queue_depth_interval=0.2) as running:
        yield running


async def test_the_snapshot_follows_the_bookings(
    broker: Broker, queue_name: str, service: RunningService
) -> None:
    queue = f"{queue_name}-bookings"
    for n in range(10):
        publish_from_ui(broker, queue, f"cinema,{n % 3 + 1}", f"ok-{n}")
    publish_from_ui(broker, queue, "not a booking", "bad-1")

    async def bookings() -> dict[str, Any]:
        _, body = await service.get_async("/api/snapshot")
        return dict(json.loads(body)["pipelines"]["bookings"])

    async def settled() -> bool:
        rates = (await bookings())["rates"]
        return sum(rates["successful"]) == 10 and sum(rates["failed"]) == 1

    await eventually(settled, timeout=15)
    view = await bookings()
    assert sum(view["rates"]["received"]) == 11
    assert (view["state"], view["ready"], view["circuit"], view["paused"]) == (
        "running",
        True,
        "closed",
        False,
    )
    assert view["prefetch"] == 675
    assert view["close_early_at"] == 506  # 3/4 of the prefetch
    assert set(view["open_batches"]) == {"cinema", "musical", "default"}
    assert view["consumers_ready"] == [True]
    assert [failure["message_id"] for failure in view["failures"]] == ["bad-1"]
    assert view["batches_by_trigger"]  # closed by size or by timeout
    assert view["queues"][f"{queue}.dlq"] == 1
    assert [g["name"] for g in view["topology"]["batchers"]] == ["cinema", "musical", "default"]


async def test_events_stream_a_snapshot_every_second(service: RunningService) -> None:
    snapshots: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{service.http}/events") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(10):
            async for line in response.content:
                if line.startswith(b"data: "):
                    snapshots.append(json.loads(line[len(b"data: ") :]))
                if len(snapshots) == 3:
                    break
    assert set(snapshots[0]["pipelines"]) == {"bookings", "notifications"}
    assert 1.5 < snapshots[2]["time"] - snapshots[0]["time"] < 3.5


async def test_an_open_stream_does_not_hold_up_the_shutdown(
    broker: Broker, queue_name: str, tmp_path: Any
) -> None:
    async with aiohttp.ClientSession() as session:
        async with local_service(broker, queue_name, tmp_path) as running:
            response = await session.get(f"{running.http}/events")
            await response.content.readline()  # streaming
            stopping = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - stopping < 5  # the drain, not 60 s
        assert await response.content.read() is not None  # the stream ended
        response.release()
