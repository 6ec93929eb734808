"""`ingest run --workers 2` as one service, as a real process on the real broker: its one
address sums both workers' figures on the page's snapshot and lists each worker's health,
serves one /metrics where every sample names its worker, is ready only while both are,
pauses both, and stops both when one is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Broker, eventually

from .test_tickets_cli import env, ingest, spawn

TOKEN = "workers-page-admin-token"
BOOKINGS = 600


@dataclass
class Workers:
    process: asyncio.subprocess.Process
    base: str
    environment: dict[str, str]

    def get(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(self.base + path, method=method)
        if method == "POST":
            request.add_header("Authorization", f"Bearer {TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    async def call(self, path: str, method: str = "GET") -> tuple[int, str]:
        return await asyncio.to_thread(self.get, path, method)

    async def snapshot(self) -> dict[str, Any]:
        status, text = await self.call("/api/snapshot")
        assert status == 200, text
        answer: dict[str, Any] = json.loads(text)
        return answer


async def start_workers(environment: dict[str, str]) -> Workers:
    process = await spawn(
        "run", "--workers", "2", "--pipeline", "bookings", environment=environment
    )
    workers = Workers(process, f"http://127.0.0.1:{environment['INGEST_HTTP_PORT']}", environment)

    async def ready() -> bool:
        return (await workers.call("/readyz"))[0] == 200

    await eventually(ready, timeout=40)
    return workers


@asynccontextmanager
async def workers_running(
    broker: Broker, queue_name: str, tmp_path: Path
) -> AsyncIterator[Workers]:
    """`ingest run --workers 2` on the test's queues, with the admin token and an upload
    spool; stopped with SIGTERM (unless it stopped already) and awaited on the way out."""
    environment = env(
        tmp_path,
        INGEST_AMQP_URL=broker.amqp_url,
        INGEST_ADMIN_TOKEN=TOKEN,
        INGEST_UPLOAD_DIR=str(tmp_path / "uploads"),
        INGEST_PIPELINES__BOOKINGS__QUEUE=f"{queue_name}-bookings",
        INGEST_PIPELINES__NOTIFICATIONS__QUEUE=f"{queue_name}-notifications",
    )
    running = await start_workers(environment)
    try:
        yield running
    finally:
        if running.process.returncode is None:
            running.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(running.process.communicate(), 60)


@pytest.fixture
async def workers(broker: Broker, queue_name: str, tmp_path: Path) -> AsyncIterator[Workers]:
    async with workers_running(broker, queue_name, tmp_path) as running:
        yield running


def received(snapshot: dict[str, Any]) -> int:
    return sum(snapshot["pipelines"]["bookings"]["rates"]["received"])


async def test_one_address_sums_both_workers_and_lists_their_health(workers: Workers) -> None:
    code, _, err = await ingest(
        "publish", "bookings", "--count", str(BOOKINGS), environment=workers.environment
    )
    assert code == 0, err

    async def all_counted() -> bool:
        # The history leaves out the second still counting: a second after the last.
        return received(await workers.snapshot()) == BOOKINGS

    await eventually(all_counted, timeout=40)
    snapshot = await workers.snapshot()
    listed = snapshot["workers"]
    assert [(w["index"], w["health"], w["ready"]) for w in listed] == [
        (0, "ready", True),
        (1, "ready", True),
    ]
    each = [w["figures"]["bookings"]["received"] for w in listed]
    assert sum(each) == BOOKINGS
    assert all(count > 0 for count in each), each  # the broker dealt to both
    assert len({w["pid"] for w in listed}) == 2
    assert snapshot["pipelines"]["bookings"]["consumers_ready"] == [True, True]

    status, text = await workers.call("/metrics")
    assert status == 200
    for line in (line for line in text.splitlines() if line.startswith("# TYPE ")):
        assert text.count(line + "\n") == 1, line  # each family once
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = [
        s
        for s in families["ingest_messages_received"].samples
        if s.name == "ingest_messages_received_total" and s.labels["pipeline"] == "bookings"
    ]
    per_worker = {s.labels["worker"]: s.value for s in samples}
    assert sorted(per_worker) == ["0", "1"]
    assert sum(per_worker.values()) == BOOKINGS
    up = {s.labels["worker"]: s.value for s in families["ingest_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0}
    assert (await workers.call("/readyz"))[0] == 200


async def test_pause_on_the_one_address_pauses_both_workers(workers: Workers) -> None:
    status, text = await workers.call("/pipelines/bookings/pause", "POST")
    assert status == 200, text
    answer = json.loads(text)
    assert answer["paused"] is True
    assert [answer["workers"][i]["paused"] for i in ("0", "1")] == [True, True]

    async def both_paused() -> bool:
        figures = [w["figures"]["bookings"] for w in (await workers.snapshot())["workers"]]
        return [f["paused"] for f in figures] == [True, True]

    await eventually(both_paused, timeout=10)
    status, text = await workers.call("/readyz")
    assert status == 503
    body = json.loads(text)
    assert body["not_ready"] == {"0": "bookings: paused", "1": "bookings: paused"}

    status, _ = await workers.call("/pipelines/bookings/resume", "POST")
    assert status == 200

    async def ready() -> bool:
        return (await workers.call("/readyz"))[0] == 200

    await eventually(ready, timeout=20)


async def test_a_killed_worker_stops_the_service_with_its_exit_code(workers: Workers) -> None:
    listed = (await workers.snapshot())["workers"]
    killed, other = listed[1]["pid"], listed[0]["pid"]
    os.kill(killed, signal.SIGKILL)
    # As before the supervisor served the page: one worker gone stops the others (drained),
    # and the service exits with the killed one's code, for compose or Kubernetes to restart.
    out, err = await asyncio.wait_for(workers.process.communicate(), 60)
    assert workers.process.returncode not in (0, None)
    logs = (out + err).decode()
    assert "a worker exited; stopping the others" in logs
    assert '"exit_codes": [0, -9]' in logs
    with pytest.raises(ProcessLookupError):
        os.kill(other, 0)  # drained and gone
