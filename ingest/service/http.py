"""The service's HTTP server (aiohttp): metrics, health and readiness for everyone, and
the actions that change something for whoever holds the admin token.

aiohttp's server rather than a hand-written one: it runs in the event loop the pipelines
already run in, and request limits (header sizes, slow headers) are its settings, not our
code; what it cannot bound (slow bodies, open connections) is in ingest.service.protection.
Starlette would need uvicorn's server beside it for the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiormq
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingest.exceptions import ConfigurationError, PublishError, UploadRejected
from ingest.pipeline import Pipeline
from ingest.rabbitmq.dead_letters import DeadLetters
from ingest.service import dlq
from ingest.service.activity import delta
from ingest.service.protection import (
    AdminFailures,
    BoundedSite,
    Protections,
    body_deadline,
    error_response,
    host_check,
    secure,
)
from ingest.service.uploads import Uploads

logger = structlog.get_logger("ingest.service.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATIC = Path(__file__).with_name("static")
EVENT_INTERVAL_S = 1.0
EVENT_STREAMS_RETRY_AFTER_S = 5
MULTIPART_OVERHEAD = 64 * 1024  # the form's other fields and boundaries, beside the file


class Served:
    """An aiohttp application on `host:port` behind the protections, with its event
    streams and its admin gate: `app` takes the routes, `start()` listens (port 0 picks
    one), `stop()` ends the event streams, closes the server and logs the admin
    throttle's last refusals. The service's and the workers' supervisor's servers."""

    def __init__(
        self, host: str, port: int, admin_token: str | None, protections: Protections
    ) -> None:
        self.host, self.port, self.protections = host, port, protections
        self._streams = EventStreams(protections.max_event_streams)
        self._admin = AdminGate(admin_token)
        self.app = application(protections)
        self._runner = runner(self.app, protections)

    async def start(self) -> None:
        self.port = await listen(self._runner, self.host, self.port, self.protections)

    async def stop(self) -> None:
        self._streams.close()
        await self._runner.cleanup()
        self._admin.flush()


class HttpServer(Served):
    """For everyone: `GET /metrics` (Prometheus text format), `GET /healthz` (the process
    answers), `GET /readyz` (200 only while every pipeline is ready; the body says which is
    not and why), `GET /` (the live page), `GET /api/snapshot` and `GET /events` (its
    figures, once and as server-sent events). Under `Authorization: Bearer <admin token>`:
    `POST /pipelines/{name}/pause|resume`, `GET /pipelines/{name}/dlq`,
    `POST /pipelines/{name}/dlq/replay|purge`, `POST /uploads/{pipeline}` (multipart: `email`
    and `file`), `GET /uploads`, `GET /uploads/{id}` and `GET /uploads/{id}/errors.csv`.
    Without an admin token configured, those answer 403 and say so; a peer that sent wrong
    tokens too often is answered 429 for a while.

    Every answer carries a Content-Security-Policy without inline script or style; a Host
    not allowed is answered 421; slow clients and too many connections or event streams are
    cut off (`protections`: ingest.service.protection).

    `readiness` maps each pipeline to a function returning why it is not ready, or None;
    `dead_letters` to how to reach its dead-letter queue; `snapshot` makes the figures."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Mapping[str, Callable[[], str | None]],
        pipelines: Mapping[str, Pipeline],
        admin_token: str | None = None,
        dead_letters: Mapping[str, Callable[[], DeadLetters]] | None = None,
        snapshot: Callable[[], dict[str, Any]] | None = None,
        uploads: Uploads | None = None,
        *,
        protections: Protections,
    ) -> None:
        super().__init__(host, port, admin_token, protections)
        self.registry = registry
        self.readiness = readiness
        self.pipelines = pipelines
        self.dead_letters = dead_letters or {}
        self.snapshot = snapshot
        self.uploads = uploads
        app = self.app
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", self._readyz)
        add_page(app)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/events", self._events)
        app.router.add_post("/pipelines/{name}/pause", self._admin(self._pause))
        app.router.add_post("/pipelines/{name}/resume", self._admin(self._resume))
        app.router.add_get("/pipelines/{name}/dlq", self._admin(self._dlq_show))
        app.router.add_post("/pipelines/{name}/dlq/replay", self._admin(self._dlq_replay))
        app.router.add_post("/pipelines/{name}/dlq/purge", self._admin(self._dlq_purge))
        app.router.add_post("/uploads/{name}", self._admin(self._upload))
        app.router.add_get("/uploads", self._admin(self._uploads))
        app.router.add_get("/uploads/{id}", self._admin(self._upload_status))
        app.router.add_get("/uploads/{id}/errors.csv", self._admin(self._upload_errors))

    # -- read-only ------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = {name: not_ready() for name, not_ready in self.readiness.items()}
        body: dict[str, object] = {"ready": {n: r is None for n, r in reasons.items()}}
        problems = {name: reason for name, reason in reasons.items() if reason is not None}
        if problems:
            body["not_ready"] = problems
        return web.json_response(body, status=200 if reasons and not problems else 503)

    async def _snapshot(self, request: web.Request) -> web.Response:
        if self.snapshot is None:
            return _error(404, "no live figures in this service")
        return web.json_response(self.snapshot())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        snapshot = self.snapshot
        if snapshot is None:
            return _error(404, "no live figures in this service")

        async def current() -> dict[str, Any]:
            return snapshot()

        return await self._streams.stream(request, current)

    # -- admin ----------------------------------------------------------------------------

    async def _pause(self, request: web.Request) -> web.Response:
        return await self._hold(request, pause=True)

    async def _resume(self, request: web.Request) -> web.Response:
        return await self._hold(request, pause=False)

    async def _hold(self, request: web.Request, *, pause: bool) -> web.Response:
        name = request.match_info["name"]
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            return _error(404, f"no pipeline {name!r}; running: {', '.join(self.pipelines)}")
        try:
            await (pipeline.pause() if pause else pipeline.resume())
        except ConfigurationError as error:
            return _error(409, str(error))
        logger.info("paused" if pause else "resumed", pipeline=name, by="http")
        return web.json_response(
            {"pipeline": name, "paused": pipeline.paused, "holds": sorted(pipeline.holds)}
        )

    # -- dead letters ---------------------------------------------------------------------

    async def _dlq_show(self, request: web.Request) -> web.Response:
        """`?limit=N&reason=TEXT`: the dead letters, left in their queue."""

        async def show(dead: DeadLetters, limit: int | None, reason: str | None) -> Any:
            return {
                "total": await dead.count(),
                "dead_letters": [dlq.row(d) for d in await dead.show(limit or 20, reason)],
            }

        return await self._on_dead_letters(request, show)

    async def _dlq_replay(self, request: web.Request) -> web.Response:
        """`?limit=N&reason=TEXT`: moved back to the work queue, confirmed."""

        async def replay(dead: DeadLetters, limit: int | None, reason: str | None) -> Any:
            result = await dead.replay(limit, reason)
            return {"replayed": result.replayed, "skipped": result.skipped}

        return await self._on_dead_letters(request, replay)

    async def _dlq_purge(self, request: web.Request) -> web.Response:
        async def purge(dead: DeadLetters, limit: int | None, reason: str | None) -> Any:
            return {"purged": await dead.purge()}

        return await self._on_dead_letters(request, purge)

    async def _on_dead_letters(
        self,
        request: web.Request,
        action: Callable[[DeadLetters, int | None, str | None], Awaitable[Any]],
    ) -> web.Response:
        name = request.match_info["name"]
        make = self.dead_letters.get(name)
        if make is None:
            return _error(
                404, f"no pipeline {name!r} with a queue; running: {', '.join(self.pipelines)}"
            )
        limit_text = request.query.get("limit")
        if limit_text is not None and (not limit_text.isdigit() or int(limit_text) < 1):
            return _error(400, f"limit must be an integer >= 1, got {limit_text!r}")
        limit = int(limit_text) if limit_text else None
        try:
            async with make() as dead:
                answer = await action(dead, limit, request.query.get("reason") or None)
        except (OSError, aiormq.exceptions.AMQPError, PublishError) as error:
            return _error(502, f"the broker: {error!r}")
        logger.info("dead letters", pipeline=name, action=request.path.rsplit("/", 1)[-1])
        return web.json_response(answer)

    # -- uploads --------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        """A CSV file and an email address, as multipart/form-data (in either order): the
        file is spooled to disk and checked, then answered at once (202) with its id. A
        body that is not such a form, or an address that is not one, is a 400 that says
        why (`Spool.receive_form`), never a 500."""
        name = request.match_info["name"]
        uploads = self.uploads
        if uploads is None or name not in uploads.processing:
            takers = ", ".join(uploads.processing) if uploads else ""
            return _error(404, f"pipeline {name!r} takes no uploads; these do: {takers or 'none'}")
        spool = uploads.spool
        if not uploads.owner:
            return _error(
                409,
                f"another ingest process (another worker) takes the uploads of "
                f"{spool.directory}: upload to that one",
            )
        if (request.content_length or 0) > spool.max_bytes + MULTIPART_OVERHEAD:
            return _too_large(spool.max_bytes)
        if request.content_type != "multipart/form-data":
            return _error(400, "send multipart/form-data with the fields email and file")
        try:
            form = await request.multipart()
        except ValueError as error:  # no boundary, or one too long
            return _error(400, f"not a valid multipart/form-data body: {error}")
        try:
            upload = await spool.receive_form(name, form, shape=uploads.processing[name].form)
        except UploadRejected as rejected:
            if rejected.too_large:
                return _too_large(spool.max_bytes)
            return _error(422, str(rejected))
        except ValueError as error:  # a malformed form, no file or two, a bad address
            return _error(400, str(error))
        spool.save(upload)
        uploads.wake()
        logger.info("upload received", upload=upload.id, pipeline=name, rows=upload.rows)
        return web.json_response(uploads.describe(upload, private=True), status=202)

    async def _uploads(self, request: web.Request) -> web.Response:
        if self.uploads is None:
            return web.json_response({"uploads": []})
        return web.json_response({"uploads": self.uploads.view(private=True)})

    async def _upload_status(self, request: web.Request) -> web.Response:
        upload = self.uploads.spool.get(request.match_info["id"]) if self.uploads else None
        if upload is None or self.uploads is None:
            return _error(404, f"no upload {request.match_info['id']!r}")
        return web.json_response(self.uploads.describe(upload, private=True))

    async def _upload_errors(self, request: web.Request) -> web.StreamResponse:
        upload = self.uploads.spool.get(request.match_info["id"]) if self.uploads else None
        if upload is None or self.uploads is None:
            return _error(404, f"no upload {request.match_info['id']!r}")
        path = self.uploads.spool.errors_file(upload)
        if not path.is_file():
            return _error(404, f"upload {upload.id} has no failed rows (yet)")
        return web.FileResponse(path, headers={"Content-Type": "text/csv; charset=utf-8"})


# -- the pieces every server of the service shares (this one, and the supervisor's of
# `ingest run --workers N`: ingest.service.fleet_http) -----------------------------------


def application(protections: Protections) -> web.Application:
    """An aiohttp application with the service's protections: the Host check (421), the
    deadline for request bodies (408) and the security headers on every answer."""
    app = web.Application(
        middlewares=[
            host_check(protections.allowed_hosts),
            body_deadline(protections.body_timeout),
        ]
    )
    app.on_response_prepare.append(secure)
    return app


def add_page(app: web.Application) -> None:
    """The live page: `GET /` and its script and style."""
    app.router.add_get("/", _static("index.html", "text/html; charset=utf-8"))
    app.router.add_get("/static/app.js", _static("app.js", "text/javascript; charset=utf-8"))
    app.router.add_get("/static/app.css", _static("app.css", "text/css; charset=utf-8"))


def runner(app: web.Application, protections: Protections) -> web.AppRunner:
    """`app`'s runner. A stopping server waits 5 s for open requests (event streams end at
    once). keepalive_timeout runs from a connection's start or its previous answer until a
    request's headers are whole: a slow sender (slowloris) is cut off, and an idle
    connection closed."""
    return web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=protections.header_timeout,
    )


async def listen(runner: web.AppRunner, host: str, port: int, protections: Protections) -> int:
    """Serve `runner` on `host:port`, at most `max_connections` at once; the port served
    (port 0 picks a free one)."""
    await runner.setup()
    site = BoundedSite(runner, host, port, protections.max_connections)
    await site.start()
    served: int = runner.addresses[0][1]
    logger.info("http server listening", host=host, port=served)
    return served


async def healthz(request: web.Request) -> web.Response:
    """The process answers."""
    return web.Response(text="ok\n")


class AdminGate:
    """Wraps a handler behind the admin token (`Authorization: Bearer ...`), compared in
    constant time; a peer that sent wrong ones too often waits (429) before its token is
    compared again. Without a token, the wrapped handlers answer 403 and say so."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._failures = AdminFailures()

    def __call__(self, handler: Handler) -> Handler:
        async def authorized(request: web.Request) -> web.StreamResponse:
            refused = self.refusal(request)
            return refused if refused is not None else await handler(request)

        return authorized

    def refusal(self, request: web.Request) -> web.Response | None:
        """The answer refusing `request` (403, 429, 401), or None when it may go on."""
        if self._token is None:
            return _error(403, "admin endpoints are off: set INGEST_ADMIN_TOKEN to use them")
        peer = request.remote or "unknown"
        wait = self._failures.throttle(peer)
        if wait is not None:
            response = _error(429, f"too many wrong admin tokens: try again in {wait} s")
            response.headers["Retry-After"] = str(wait)
            return response
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self._token
        ):
            self._failures.failed(peer)
            response = _error(401, "a valid admin token is needed: Authorization: Bearer ...")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    def flush(self) -> None:
        """Log the refusals not logged yet (the server stops)."""
        self._failures.flush()


class EventStreams:
    """`GET /events`: server-sent events of a snapshot, at most `limit` streams open at
    once (the next is answered 503 with Retry-After); `close()` ends them all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._closing = asyncio.Event()

    def close(self) -> None:
        self._closing.set()

    async def stream(
        self, request: web.Request, snapshot: Callable[[], Awaitable[dict[str, Any]]]
    ) -> web.StreamResponse:
        """The snapshot, then once a second what changed in it (`activity.delta`), until
        the client goes away or the server stops."""
        if self.open >= self.limit:
            refused = _error(
                503,
                f"{self.open} live streams are open, the most this service serves "
                f"(INGEST_HTTP_MAX_EVENT_STREAMS): try again shortly",
            )
            refused.headers["Retry-After"] = str(EVENT_STREAMS_RETRY_AFTER_S)
            return refused
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self.open += 1
        try:
            await response.prepare(request)
            previous: dict[str, Any] | None = None
            while not self._closing.is_set():
                # The history once, then what changed (activity.delta).
                current = await snapshot()
                sent = current if previous is None else delta(previous, current)
                previous = current
                await response.write(f"data: {json.dumps(sent)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(EVENT_INTERVAL_S):
                        await self._closing.wait()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self.open -= 1
        return response


def _too_large(limit: int) -> web.Response:
    return _error(
        413, f"the file is larger than the limit of {limit:,} bytes (INGEST_UPLOAD_MAX_BYTES)"
    )


def _static(name: str, content_type: str) -> Handler:
    """A file of the page (static/), with its type; `no-cache`: the browser asks again at
    each load and gets 304 while the file is the same (aiohttp's ETag and Last-Modified), so
    the page and its script never come from two versions of the service."""
    path = STATIC / name

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(
            path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )

    return serve


def _error(status: int, message: str) -> web.Response:
    return error_response(status, message)
