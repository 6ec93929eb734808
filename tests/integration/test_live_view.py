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
    assert view["prefetch"] == 4575
    assert view["close_early_at"] == 3431  # 3/4 of the prefetch
    assert set(view["open_batches"]) == {"cinema", "musical", "default"}
    assert view["consumers_ready"] == [True]
    assert [failure["message_id"] for failure in view["failures"]] == ["bad-1"]
    assert view["batches_by_trigger"]  # closed by size or by timeout
    assert view["queues"][f"{queue}.dlq"] == 1
    assert [g["name"] for g in view["topology"]["batchers"]] == ["cinema", "musical", "default"]


async def test_on_classic_queues_bookings_get_more_batch_processors_in_a_smaller_window(
    broker: Broker, queue_name: str, tmp_path: Any
) -> None:
    """On classic queues: eight batch processors per batcher within a prefetch of 3,225
    (what a setting gives still wins), and bookings still become tickets."""
    pipelines = {
        "bookings": {"queue_type": "classic", "batchers": {"cinema": {"concurrency": 3}}},
        "notifications": {"queue_type": "classic"},
    }
    async with local_service(broker, queue_name, tmp_path, pipelines=pipelines) as service:
        queue = f"{queue_name}-bookings"
        for n in range(6):
            publish_from_ui(broker, queue, f"musical,{n % 3 + 1}", f"classic-{n}")

        async def bookings() -> dict[str, Any]:
            _, body = await service.get_async("/api/snapshot")
            return dict(json.loads(body)["pipelines"]["bookings"])

        async def settled() -> bool:
            return sum((await bookings())["rates"]["successful"]) == 6

        await eventually(settled, timeout=15)
        view = await bookings()
    assert view["prefetch"] == 3225
    batchers = {g["name"]: g["concurrency"] for g in view["topology"]["batchers"]}
    assert batchers == {"cinema": 3, "musical": 8, "default": 8}


async def test_events_stream_the_history_once_then_what_changed(
    broker: Broker, queue_name: str, service: RunningService
) -> None:
    messages: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{service.http}/events") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        async with asyncio.timeout(15):
            async for line in response.content:
                if line.startswith(b"data: "):
                    messages.append(line[len(b"data: ") :])
                    if len(messages) == 1:  # failures arrive while the stream runs
                        publish_from_ui(broker, f"{queue_name}-bookings", "not a booking", "b1")
                if len(messages) == 6:
                    break
    first, *changes = [json.loads(message) for message in messages]
    assert set(first["pipelines"]) == {"bookings", "notifications"}
    assert "delta" not in first
    assert 4 < changes[-1]["time"] - first["time"] < 7  # one a second
    # The reader rebuilds each snapshot: the history once, then its newest seconds.
    view = first
    for change in changes:
        assert change["delta"] is True
        assert len(message := json.dumps(change)) < len(messages[0]) / 4, len(message)
        view = merged(view, change)
        bookings = view["pipelines"]["bookings"]
        assert all(len(series) == first["history_s"] for series in bookings["rates"].values())
    _, body = await service.get_async("/api/snapshot")
    now = json.loads(body)["pipelines"]["bookings"]
    assert [f["message_id"] for f in bookings["failures"]] == ["b1"]
    assert sum(bookings["rates"]["failed"]) == sum(now["rates"]["failed"]) == 1


def merged(view: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """What the page's merged() does (ingest/service/static/app.js)."""
    for name, now in change["pipelines"].items():
        before = view["pipelines"][name]
        if "rates_shift" in now:
            shift = now["rates_shift"]
            now["rates"] = {k: before["rates"][k][shift:] + v for k, v in now["rates"].items()}
        now.setdefault("failures", before["failures"])
    return change


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
