"""The supervisor's HTTP server of `ingest run --workers N` (ingest.service.fleet_http)
in front of stand-in workers (small aiohttp servers answering as a worker does): readiness
that names the worker down, `ingest_worker_up` 0 for it, pause passed on to every worker,
the dead letters and uploads passed on to worker 0 with the token and the body streamed,
and the protections of every server of the service. No broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ingest.service.fleet_http import FRESH_S, Fleet, FleetServer, Member
from ingest.service.protection import CONTENT_SECURITY_POLICY, Protections

TOKEN = "fleet-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class StandIn:
    """A worker's HTTP answers, and what it was asked."""

    index: int
    ready: bool = True
    calls: list[tuple[str, str, str | None, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/snapshot", self.snapshot)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/pipelines/{name}/{action:.*}", self.record)
        app.router.add_route("*", "/uploads/{rest:.*}", self.record)
        return app

    async def snapshot(self, request: web.Request) -> web.Response:
        view = {
            "state": "running",
            "ready": self.ready,
            "not_ready": None if self.ready else "paused",
            "paused": not self.ready,
            "holds": [] if self.ready else ["paused"],
            "circuit": "closed",
            "restarts": 0,
            "in_flight": 0,
            "prefetch": 10,
            "close_early_at": None,
            "consumers_ready": [True],
            "topology": {},
            "busy": {"processors": 0.0, "batchers": {}},
            "rates_until": 1000,
            "rates": {"received": [self.index + 1], "successful": [0], "failed": [0]},
            "batches_by_trigger": {},
            "open_batches": {},
            "failures": [],
            "latency_ms": None,
            "queues": {},
        }
        return web.json_response({"time": 0, "history_s": 1, "pipelines": {"bookings": view}})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (
            "# HELP ingest_messages_received_total Messages\n"
            "# TYPE ingest_messages_received_total counter\n"
            f'ingest_messages_received_total{{pipeline="bookings"}} {self.index + 1}.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def record(self, request: web.Request) -> web.Response:
        body = await request.read()
        auth = request.headers.get("Authorization")
        self.calls.append((request.method, request.path_qs, auth, body))
        if request.path.endswith("errors.csv"):
            return web.Response(text="line,row,reason\n", content_type="text/csv")
        paused = request.path.endswith("/pause")
        answer = {"pipeline": "bookings", "paused": paused, "holds": ["paused"] if paused else []}
        return web.json_response({**answer, "bytes": len(body)}, status=202 if body else 200)


@dataclass
class Process:
    pid: int
    returncode: int | None = None


@dataclass
class Setup:
    base: str
    workers: list[StandIn]
    processes: list[Process]
    runners: list[web.AppRunner]
    session: aiohttp.ClientSession

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.typedefs.LooseHeaders]:
        async with self.session.get(self.base + path, **kwargs) as response:
            return response.status, await response.text(), response.headers


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[[int], Awaitable[Setup]]]:
    """Start `n` stand-in workers and a supervisor's server in front; all stopped after."""
    runners: list[web.AppRunner] = []
    servers: list[FleetServer] = []
    fleets: list[Fleet] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(n: int) -> Setup:
        the_fleet = Fleet()
        await the_fleet.start()
        fleets.append(the_fleet)
        workers, processes = [StandIn(i) for i in range(n)], [Process(100 + i) for i in range(n)]
        for worker, process in zip(workers, processes, strict=True):
            runner = web.AppRunner(worker.app())
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            the_fleet.members.append(Member(worker.index, port, process))
        protections = Protections(frozenset({"127.0.0.1"}), 15.0, 300.0, 64, 4)
        server = FleetServer("127.0.0.1", 0, the_fleet, TOKEN, protections=protections)
        await server.start()
        servers.append(server)
        session = aiohttp.ClientSession()
        sessions.append(session)
        base = f"http://127.0.0.1:{server.port}"
        return Setup(base, workers, processes, runners[-n:], session)

    yield make
    for session in sessions:
        await session.close()
    for server in servers:
        await server.stop()
    for the_fleet in fleets:
        await the_fleet.close()
    for runner in runners:
        await runner.cleanup()


async def test_readyz_is_200_while_every_worker_is_ready(fleet: Any) -> None:
    setup = await fleet(2)
    status, text, _ = await setup.get("/readyz")
    assert status == 200, text


async def test_a_worker_that_exited_makes_readyz_503_naming_it_and_its_up_gauge_0(
    fleet: Any,
) -> None:
    setup = await fleet(2)
    assert (await setup.get("/readyz"))[0] == 200
    setup.processes[1].returncode = -9  # read at once, whatever was read just before
    status, text, _ = await setup.get("/readyz")
    assert status == 503
    assert '"1": "exited with code -9"' in text
    _, metrics, _ = await setup.get("/metrics")
    assert 'ingest_worker_up{worker="0"} 1.0' in metrics
    assert 'ingest_worker_up{worker="1"} 0.0' in metrics
    assert 'ingest_messages_received_total{pipeline="bookings",worker="0"} 1.0' in metrics
    assert 'worker="1"} 2.0' not in metrics


async def test_a_worker_not_ready_is_named_with_its_pipeline_and_why(fleet: Any) -> None:
    setup = await fleet(2)
    setup.workers[0].ready = False
    status, text, _ = await setup.get("/readyz")
    assert status == 503
    assert '"0": "bookings: paused"' in text


async def test_the_snapshot_lists_every_worker_with_its_figures(fleet: Any) -> None:
    setup = await fleet(2)
    async with setup.session.get(setup.base + "/api/snapshot") as response:
        body = await response.json()
    assert [(w["index"], w["pid"], w["health"]) for w in body["workers"]] == [
        (0, 100, "ready"),
        (1, 101, "ready"),
    ]
    assert [w["figures"]["bookings"]["received"] for w in body["workers"]] == [1, 2]


async def test_pause_is_passed_on_to_every_worker_with_the_token(fleet: Any) -> None:
    setup = await fleet(2)
    async with setup.session.post(setup.base + "/pipelines/bookings/pause", headers=AUTH) as r:
        assert r.status == 200
        body = await r.json()
    assert (body["paused"], body["holds"], sorted(body["workers"])) == (
        True,
        ["paused"],
        ["0", "1"],
    )
    for worker in setup.workers:
        assert worker.calls == [("POST", "/pipelines/bookings/pause", f"Bearer {TOKEN}", b"")]


async def test_a_worker_that_does_not_answer_is_named_down_and_its_pause_refused(
    fleet: Any,
) -> None:
    setup = await fleet(2)
    assert (await setup.get("/readyz"))[0] == 200  # it answered once
    await setup.runners[1].cleanup()  # its process lives, its server is gone
    await asyncio.sleep(FRESH_S)
    status, text, _ = await setup.get("/readyz")
    assert status == 503
    assert '"1": "not answering: ' in text
    async with setup.session.post(setup.base + "/pipelines/bookings/pause", headers=AUTH) as r:
        assert r.status == 502
        assert (await r.json())["error"].startswith("worker 1: no answer")
    async with setup.session.get(setup.base + "/api/snapshot") as response:
        workers = (await response.json())["workers"]
    assert [w["health"] for w in workers] == ["ready", "down"]


async def test_uploads_and_dead_letters_go_to_worker_zero_with_the_body(fleet: Any) -> None:
    setup = await fleet(2)
    form = aiohttp.FormData()
    form.add_field("email", "me@example.com")
    form.add_field("file", b"event,user_id\ncinema,1\n" * 1000, filename="b.csv")
    async with setup.session.post(setup.base + "/uploads/bookings", data=form, headers=AUTH) as r:
        assert r.status == 202
        sent = (await r.json())["bytes"]
    async with setup.session.get(setup.base + "/uploads/u1/errors.csv", headers=AUTH) as r:
        assert (r.status, r.headers["Content-Type"]) == (200, "text/csv; charset=utf-8")
        assert await r.text() == "line,row,reason\n"
    async with setup.session.get(setup.base + "/pipelines/bookings/dlq?limit=5", headers=AUTH):
        pass
    calls = setup.workers[0].calls
    assert [(method, path) for method, path, _, _ in calls] == [
        ("POST", "/uploads/bookings"),
        ("GET", "/uploads/u1/errors.csv"),
        ("GET", "/pipelines/bookings/dlq?limit=5"),
    ]
    assert sent > 22_000
    assert b"cinema,1" in calls[0][3]
    assert {auth for _, _, auth, _ in calls} == {f"Bearer {TOKEN}"}
    assert setup.workers[1].calls == []


async def test_worker_zero_down_answers_502_for_what_only_it_does(fleet: Any) -> None:
    setup = await fleet(2)
    setup.processes[0].returncode = 1
    async with setup.session.get(setup.base + "/uploads", headers=AUTH) as r:
        assert r.status == 502
        assert "worker 0" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-token"),
        pytest.param({"Authorization": "Bearer wrong-token-wrong-token"}, 401, id="wrong-token"),
        pytest.param({**AUTH, "Host": "evil.example"}, 421, id="host-not-allowed"),
    ],
)
async def test_the_admin_endpoints_are_guarded_as_a_workers_are(
    fleet: Any, headers: dict[str, str], status: int
) -> None:
    setup = await fleet(2)
    async with setup.session.post(
        setup.base + "/pipelines/bookings/pause", headers=headers
    ) as response:
        assert response.status == status
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert all(worker.calls == [] for worker in setup.workers)


async def test_the_page_and_health_are_served_with_the_security_headers(fleet: Any) -> None:
    setup = await fleet(1)
    for path in ("/", "/static/app.js", "/healthz", "/api/snapshot", "/metrics"):
        status, _, headers = await setup.get(path)
        assert status == 200, path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
