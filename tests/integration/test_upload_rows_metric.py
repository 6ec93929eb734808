"""`ingest_upload_rows_total{pipeline,outcome}`: an upload's rows counted on /metrics as
they settle, by outcome, against the real service (broker, SQLite, outbox)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.service import RunningService, local_service, metric
from tests.integration.uploads import BAD_ROWS, TOKEN, bookings_csv, finished, upload
from tests.support import Broker

ROWS = 3000


@pytest.fixture
async def service(broker: Broker, queue_name: str, tmp_path: Path) -> AsyncIterator[RunningService]:
    async with local_service(
        broker, queue_name, tmp_path, admin_token=TOKEN, upload_dir=tmp_path / "uploads"
    ) as running:
        yield running


def rows(text: str) -> tuple[float, float]:
    return (
        metric(text, "ingest_upload_rows_total", pipeline="bookings", outcome="successful"),
        metric(text, "ingest_upload_rows_total", pipeline="bookings", outcome="failed"),
    )


async def test_upload_rows_are_counted_by_outcome_as_they_settle(
    service: RunningService,
) -> None:
    status, text = await service.get_async("/metrics")
    assert status == 200
    assert "# TYPE ingest_upload_rows_total counter" in text
    assert rows(text) == (0.0, 0.0)  # there before the first upload
    assert 'ingest_upload_rows_total{outcome="successful",pipeline="notifications"}' not in text

    code, answer = await upload(service, bookings_csv(ROWS))
    assert code == 202, answer
    seen: list[tuple[float, float]] = []
    done = asyncio.create_task(finished(service, answer["id"]))
    while not done.done():  # read while the file is processed
        seen.append(rows((await service.get_async("/metrics"))[1]))
        await asyncio.sleep(0.02)
    result = await done
    assert (result["successful"], result["failed"]) == (ROWS - len(BAD_ROWS), len(BAD_ROWS))
    final = rows((await service.get_async("/metrics"))[1])
    assert final == (ROWS - len(BAD_ROWS), len(BAD_ROWS))
    # A counter: never down, whatever moment it was read at.
    readings = [*seen, final]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(readings))
