"""The supervisor's HTTP server of `ingest run --workers N`: the service's one address
(`INGEST_HTTP_HOST:INGEST_HTTP_PORT`), in front of the workers that serve on private
loopback ports. It answers the page, its figures and readiness from the workers' snapshots
merged (ingest.service.fleet), one `/metrics` for all of them with a `worker` label, and
passes the admin actions on: pause and resume to every worker, the dead letters and the
uploads to worker 0 (which takes the uploads). The protections are the workers' own
(ingest.service.http): the same headers, Host check, bounds and admin token."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ingest.service.fleet import WorkerView, exposition, merge_metrics, merge_snapshots, readiness
from ingest.service.http import Served, add_page, healthz
from ingest.service.protection import Protections, error_response

logger = structlog.get_logger("ingest.service.fleet")

FRESH_S = 0.5  # a merged snapshot serves every reader within this long (pages, /readyz)
# A worker that does not answer within this long is down for this reading: /readyz and
# the page must answer a probe or a person in time.
SNAPSHOT_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=5.0)  # within Prometheus's 10 s scrape timeout
# An admin action passed on may take long (a replay, an upload's body): no total.
PASS_ON_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0)
CHUNK = 64 * 1024
REQUEST_HEADERS = ("Authorization", "Content-Type", "Content-Length")
ANSWER_HEADERS = ("Content-Type", "Content-Disposition", "Retry-After", "WWW-Authenticate")


class Process(Protocol):
    """What the fleet reads of a worker's process (asyncio.subprocess.Process)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


@dataclass
class Member:
    """Worker `index`: its process and the loopback port it serves on."""

    index: int
    port: int
    process: Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Fleet:
    """The workers as the supervisor reaches them over HTTP, read on demand: a snapshot
    serves every reader for FRESH_S (one read of each worker, however many pages are open).
    `start()` and `close()` own the HTTP client."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._views: list[WorkerView] | None = None
        self._read_at = 0.0
        self._answered: set[int] = set()

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("Fleet.start() first")
        return self.session

    async def views(self) -> list[WorkerView]:
        """Each worker's state and snapshot, at most FRESH_S old."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._views is None or loop.time() - self._read_at > FRESH_S:
                async with asyncio.TaskGroup() as group:
                    reads = [group.create_task(self._view(m)) for m in self.members]
                self._views = [read.result() for read in reads]
                self._read_at = loop.time()
            # A worker that exited since the read shows at once.
            for member, view in zip(self.members, self._views, strict=False):
                if view.exit_code is None and member.process.returncode is not None:
                    view.exit_code, view.snapshot = member.process.returncode, None
            return self._views

    async def snapshot(self) -> dict[str, Any]:
        return merge_snapshots(await self.views())

    async def _view(self, member: Member) -> WorkerView:
        process = member.process
        view = WorkerView(member.index, process.pid, member.port, process.returncode)
        if view.exit_code is None:
            try:
                async with self.client().get(
                    member.url + "/api/snapshot", timeout=SNAPSHOT_TIMEOUT
                ) as answer:
                    answer.raise_for_status()
                    view.snapshot = await answer.json()
                self._answered.add(member.index)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                view.error = _why(error)
        view.answered = member.index in self._answered
        return view

    async def metrics(self) -> bytes:
        """Every worker's metrics in one scrape (`fleet.merge_metrics`)."""
        async with asyncio.TaskGroup() as group:
            reads = {m.index: group.create_task(self._metrics(m)) for m in self.members}
        return exposition(merge_metrics({index: read.result() for index, read in reads.items()}))

    async def _metrics(self, member: Member) -> str | None:
        if member.process.returncode is not None:
            return None
        try:
            url = member.url + "/metrics"
            async with self.client().get(url, timeout=METRICS_TIMEOUT) as answer:
                answer.raise_for_status()
                return await answer.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            logger.warning("a worker's metrics are missing", worker=member.index, error=_why(error))
            return None

    async def post(
        self, member: Member, path: str, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """POST `path` to `member`: its status and JSON answer; 502 when it does not answer."""
        try:
            async with self.client().post(
                member.url + path, headers=headers, timeout=PASS_ON_TIMEOUT
            ) as answer:
                body: dict[str, Any] = await answer.json()
                return answer.status, body
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            return 502, {"error": f"no answer: {_why(error)}"}


class FleetServer(Served):
    """The supervisor's HTTP server. For everyone: `GET /healthz` (the supervisor
    answers), `GET /readyz` (200 only while every worker is ready; 503 naming each one
    that is not and why), `GET /metrics` (every worker's samples with `worker="i"`, and
    `ingest_worker_up{worker}`), `GET /`, `GET /api/snapshot` and `GET /events` (the
    workers' figures merged, with `workers`). Under the admin token, checked here as a
    worker checks it: `POST /pipelines/{name}/pause|resume` to every worker, the dead
    letters' and uploads' endpoints to worker 0 (bodies streamed through)."""

    def __init__(
        self,
        host: str,
        port: int,
        fleet: Fleet,
        admin_token: str | None,
        *,
        protections: Protections,
    ) -> None:
        super().__init__(host, port, admin_token, protections)
        self.fleet = fleet
        app = self.app
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        add_page(app)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/events", self._events)
        for action in ("pause", "resume"):
            app.router.add_post(f"/pipelines/{{name}}/{action}", self._admin(self._hold))
        first = self._admin(self._to_first)
        app.router.add_get("/pipelines/{name}/dlq", first)
        app.router.add_post("/pipelines/{name}/dlq/replay", first)
        app.router.add_post("/pipelines/{name}/dlq/purge", first)
        app.router.add_post("/uploads/{name}", first)
        app.router.add_get("/uploads", first)
        app.router.add_get("/uploads/{id}", first)
        app.router.add_get("/uploads/{id}/errors.csv", first)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, body = readiness(await self.fleet.views())
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=await self.fleet.metrics())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.json_response(await self.fleet.snapshot())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        return await self._streams.stream(request, self.fleet.snapshot)

    async def _hold(self, request: web.Request) -> web.Response:
        """Pause or resume on every worker: 200 when each did (`paused` only when all
        are), else the first refusal's status naming its worker; every answer in
        `workers`."""
        members = self.fleet.members
        headers = _passed_on(request)
        async with asyncio.TaskGroup() as group:
            calls = [group.create_task(self.fleet.post(m, request.path, headers)) for m in members]
        answers = {m.index: call.result() for m, call in zip(members, calls, strict=True)}
        by_worker = {str(index): body for index, (_, body) in answers.items()}
        refused = [(i, status, body) for i, (status, body) in answers.items() if status != 200]
        if refused:
            index, status, body = refused[0]
            error = f"worker {index}: {body.get('error', status)}"
            return web.json_response({"error": error, "workers": by_worker}, status=status)
        bodies = list(by_worker.values())
        name = request.match_info["name"]
        logger.info("passed on to every worker", path=request.path, workers=len(bodies))
        return web.json_response(
            {
                "pipeline": name,
                "paused": all(body.get("paused") for body in bodies),
                "holds": sorted({hold for body in bodies for hold in body.get("holds", [])}),
                "workers": by_worker,
            }
        )

    async def _to_first(self, request: web.Request) -> web.StreamResponse:
        """The request passed on to worker 0 as it came (its body streamed, the token
        with it), and its answer streamed back."""
        member = self.fleet.members[0] if self.fleet.members else None
        if member is None or member.process.returncode is not None:
            return error_response(
                502, "worker 0, which keeps the dead letters and uploads, is down"
            )
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        try:
            answer = await self.fleet.client().request(
                request.method,
                member.url + request.path_qs,
                headers=_passed_on(request),
                data=body,
                timeout=PASS_ON_TIMEOUT,
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            return error_response(
                502, f"worker 0, which keeps the dead letters and uploads: {_why(error)}"
            )
        async with answer:
            headers = {k: answer.headers[k] for k in ANSWER_HEADERS if k in answer.headers}
            response = web.StreamResponse(status=answer.status, headers=headers)
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
        return response


def _passed_on(request: web.Request) -> dict[str, str]:
    """The headers a worker needs of `request`: the token, the body's type and length."""
    return {name: request.headers[name] for name in REQUEST_HEADERS if name in request.headers}


def _why(error: BaseException) -> str:
    return str(error) or type(error).__name__
