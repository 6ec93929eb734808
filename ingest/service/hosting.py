"""Hosting: how the service finds its pipelines and runs them until told to stop."""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Awaitable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingest.exceptions import ConfigurationError, PipelineFailed, StartupError
from ingest.pipeline import Pipeline
from ingest.service import dlq, garbage, tracing
from ingest.service.activity import Activity, snapshot
from ingest.service.hosted import DeclaresSettings, HostedPipeline, PipelineFactory
from ingest.service.logging import FAILURE_EVENTS, log_failures
from ingest.service.metrics import Metrics, UploadRows
from ingest.service.queue_depth import QueueDepths
from ingest.service.settings import PipelineSettings, Settings
from ingest.service.spool import Spool
from ingest.service.uploads import Uploads
from ingest.waiting import CLOSE_TIMEOUT_S, close_within, first_of

if TYPE_CHECKING:
    from ingest.service.http import HttpServer

logger = structlog.get_logger("ingest.service")

ENTRY_POINT_GROUP = "ingest.pipelines"


def discover() -> dict[str, PipelineFactory]:
    """The pipelines installed under the `ingest.pipelines` entry point group."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def settings_models() -> dict[str, type[PipelineSettings]]:
    """Each installed pipeline's settings model: the one its factory declares, else the
    common PipelineSettings."""
    return {
        name: factory.settings_model if isinstance(factory, DeclaresSettings) else PipelineSettings
        for name, factory in discover().items()
    }


def build(
    settings: Settings, names: list[str] | None = None, source: Path | None = None
) -> dict[str, HostedPipeline]:
    """Build the named (else every enabled) pipeline; ConfigurationError if one cannot."""
    factories = discover()
    unknown = sorted(set(names or []) - set(factories))
    if unknown:
        raise ConfigurationError(
            f"unknown pipeline {', '.join(unknown)}; installed: {', '.join(sorted(factories))}"
        )
    configured = sorted(set(settings.pipelines) - set(factories))
    if configured:
        raise ConfigurationError(
            f"settings name unknown pipeline {', '.join(configured)} "
            f"(INGEST_PIPELINES__<NAME>__...); installed: {', '.join(sorted(factories))}"
        )
    chosen = names or [name for name in sorted(factories) if settings.pipeline(name).enabled]
    hosted: dict[str, HostedPipeline] = {}
    for name in chosen:
        try:
            hosted[name] = factories[name](settings, source=source)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"pipeline {name}: {exc}") from exc
    return hosted


async def serve(
    settings: Settings,
    hosted: Mapping[str, HostedPipeline],
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Start everything, run until SIGTERM/SIGINT, `stop` or every file is done, then
    drain. `started` is set once the HTTP server listens and the pipelines run. A pipeline
    that crashes is restarted by its supervisor; one that fails past its restart limit
    stops the others (drained) and raises PipelineFailed."""
    await _start_up(hosted)
    metrics = Metrics()
    traced = tracing.active()
    for item in hosted.values():
        metrics.watch(item.pipeline, item.ready, item.stats, item.prefetch)
        item.pipeline.events.subscribe(log_failures, kinds=FAILURE_EVENTS)
        if traced is not None:
            traced.watch(item.pipeline, item.queue)
    depths = QueueDepths(
        settings.amqp_url.get_secret_value(),
        {name: item.queues for name, item in hosted.items() if item.queues},
        settings.queue_depth_interval,
    )
    metrics.registry.register(depths)
    uploads = Uploads(
        Spool(settings.upload_dir, settings.upload_max_bytes),
        {name: item.uploads for name, item in hosted.items() if item.uploads is not None},
    )
    if uploads.processing:
        metrics.registry.register(UploadRows(uploads.rows))
    http = _http_server(settings, hosted, metrics, depths, uploads)
    try:
        await http.start()
    except OSError as exc:
        raise StartupError(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc.strerror or exc}"
        ) from exc
    reading = asyncio.create_task(depths.run(), name="queue depths") if depths.queues else None
    uploading = asyncio.create_task(uploads.run(), name="uploads") if uploads.claim() else None
    stop = stop or asyncio.Event()
    failed: list[Pipeline] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for item in hosted.values():
            await item.pipeline.start()
        waiters = _ends(hosted, stop, uploading)
        garbage.settle()
        logger.info("running", pipelines=list(hosted))
        if started is not None:
            started.set()
        async with garbage.kept_settled():
            await first_of(*waiters)
        failed = [item.pipeline for item in hosted.values() if item.pipeline.state == "failed"]
        logger.info("stopping", signal=stop.is_set(), failed=[p.name for p in failed])
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await _shut_down(hosted, uploads, uploading, depths, reading, http)
    if failed:
        # The others were drained; a process manager (compose, Kubernetes) restarts us.
        raise PipelineFailed("; ".join(str(pipeline.failure) for pipeline in failed))


def _ends(
    hosted: Mapping[str, HostedPipeline], stop: asyncio.Event, uploading: asyncio.Task[None] | None
) -> list[Awaitable[Any]]:
    """What ends the service, whichever comes first: the stop, every file done, a
    pipeline failed for good (its supervision ends before the stop only then), the
    uploads ended (early only on a bug)."""
    waiters: list[Awaitable[Any]] = [stop.wait()]
    files = [item.finished for item in hosted.values() if item.finished is not None]
    if files:
        waiters.append(asyncio.gather(*(f.wait() for f in files)))
    waiters.extend(item.pipeline.wait() for item in hosted.values())
    if uploading is not None:
        waiters.append(asyncio.shield(uploading))
    return waiters


async def _start_up(hosted: Mapping[str, HostedPipeline]) -> None:
    """Each pipeline's start-up hook: StartupError, naming the pipeline, if one fails."""
    for name, item in hosted.items():
        if item.startup is not None:
            try:
                await item.startup()
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(f"pipeline {name} cannot start: {exc}") from exc


def _http_server(
    settings: Settings,
    hosted: Mapping[str, HostedPipeline],
    metrics: Metrics,
    depths: QueueDepths,
    uploads: Uploads,
) -> HttpServer:
    # Imported here: aiohttp's server costs ~9 MB of RSS, which the commands that only
    # build pipelines (publish, topology, dlq) and the benchmarks do not need.
    from ingest.service.http import HttpServer
    from ingest.service.protection import Protections

    activities = {name: Activity(item.pipeline) for name, item in hosted.items()}
    prefetch = {name: item.prefetch for name, item in hosted.items()}
    not_ready = {name: item.not_ready for name, item in hosted.items()}
    return HttpServer(
        settings.http_host,
        settings.http_port,
        metrics.registry,
        not_ready,
        {name: item.pipeline for name, item in hosted.items()},
        settings.admin_token.get_secret_value() if settings.admin_token else None,
        {
            name: functools.partial(dlq.dead_letters, settings, name, item.work_queues)
            for name, item in hosted.items()
            if item.work_queues  # consumed from a broker's queues
        },
        lambda: {
            **snapshot(activities, not_ready, prefetch, depths.ready),
            "uploads": uploads.view(),
            "upload_forms": uploads.forms(),
        },
        uploads,
        protections=Protections.of(settings),
    )


async def _shut_down(
    hosted: Mapping[str, HostedPipeline],
    uploads: Uploads,
    uploading: asyncio.Task[None] | None,
    depths: QueueDepths,
    reading: asyncio.Task[None] | None,
    http: HttpServer,
) -> None:
    """In order: the upload at work (its pipeline shares the hosted ones' resources), the
    pipelines (drained), their shutdown hooks, the queue depths, the HTTP server. A bug
    that ended the uploads is raised once all that is done."""
    crashed: BaseException | None = None
    if uploading is not None:
        await uploads.stop()
        try:
            await uploading
        except Exception as error:
            logger.exception("uploads failed")
            crashed = error
        finally:
            uploads.spool.release()
    await asyncio.gather(*(item.pipeline.stop() for item in hosted.values()))
    for name, item in hosted.items():
        if item.shutdown is not None:
            await close_within(
                item.shutdown(), logger.bind(pipeline=name), "pipeline shutdown hook"
            )
    if reading is not None:
        depths.stop()  # a reading under way ends first; a broker that does not answer: bounded
        _, stuck = await asyncio.wait({reading}, timeout=CLOSE_TIMEOUT_S)
        if stuck:
            logger.warning(
                "the queue depth reader did not stop; cancelled", timeout=CLOSE_TIMEOUT_S
            )
            reading.cancel()
            await asyncio.wait({reading}, timeout=CLOSE_TIMEOUT_S)
        elif reading.exception() is not None:
            logger.error("the queue depth reader failed", error=repr(reading.exception()))
    await http.stop()
    if crashed is not None:
        raise crashed
