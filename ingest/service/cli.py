"""The `ingest` command line: run, publish, topology, pause, resume, dlq."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import aiormq
import structlog
from pydantic import ValidationError
from pydantic_settings import SettingsError

from ingest.exceptions import ConfigurationError, PipelineFailed, PublishError, StartupError
from ingest.producers.csv_file import rows_of
from ingest.rabbitmq.connection import redact
from ingest.rabbitmq.publisher import OutgoingMessage, Publisher
from ingest.service import control, dlq, tracing
from ingest.service.hosting import build, serve
from ingest.service.logging import configure_logging
from ingest.service.progress import ProgressBar
from ingest.service.settings import Settings
from ingest.service.workers import supervise, worker_index

logger = structlog.get_logger("ingest.service.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest", description="Broadway-style RabbitMQ pipelines: run and operate them."
    )
    parser.add_argument("--version", action="version", version=f"ingest {version('ingest')}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands.add_parser)
    publish = commands.add_parser("publish", help="publish messages to a pipeline's queue")
    publish.add_argument("pipeline")
    source = publish.add_mutually_exclusive_group(required=True)
    source.add_argument("--count", type=int, metavar="N", help="N random sample messages")
    source.add_argument("--file", type=Path, metavar="F.csv", help="one message per line")
    source.add_argument("--payload", metavar="TEXT", help="one message with this body")
    commands.add_parser("topology", help="print every pipeline's stages and concurrency")
    _add_control(commands.add_parser)
    _add_dlq(commands.add_parser)
    return parser


# Each `_add_...` adds its command(s) through the subparsers' `add_parser`.
AddParser = Callable[..., argparse.ArgumentParser]


def _add_run(add_parser: AddParser) -> None:
    run = add_parser("run", help="run the pipelines until SIGTERM/SIGINT, then drain")
    run.add_argument(
        "--pipeline", action="append", metavar="NAME", help="run only this one (repeatable)"
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processes consuming the same queues, behind one HTTP address "
        "(INGEST_HTTP_HOST:PORT: one page, one /metrics with a worker label)",
    )
    run.add_argument(
        "--file",
        type=Path,
        metavar="F.csv",
        help="process this CSV file instead of the queue (no broker), then stop; "
        "failed rows go to F.errors.csv",
    )


def _add_control(add_parser: AddParser) -> None:
    for action, what in (("pause", "stop"), ("resume", "restart")):
        control = add_parser(
            action,
            help=f"{what} consuming in a running service (needs INGEST_ADMIN_TOKEN)",
        )
        control.add_argument("pipeline")
        control.add_argument(
            "--url",
            action="append",
            metavar="URL",
            help="the service's HTTP address (repeatable; default: INGEST_HTTP_HOST:PORT)",
        )
        control.add_argument(
            "--workers",
            type=int,
            default=1,
            metavar="N",
            help="ignored (kept for old scripts): the address of `ingest run --workers N` "
            "passes a pause or resume on to every worker",
        )


def _add_dlq(add_parser: AddParser) -> None:
    dead = add_parser("dlq", help="a pipeline's dead letters: show, replay, purge")
    actions = dead.add_subparsers(dest="dlq_command", required=True)
    show = actions.add_parser("show", help="list dead letters (they stay in the queue)")
    replay = actions.add_parser(
        "replay", help="move dead letters back to the work queue, confirmed, attempts reset"
    )
    purge = actions.add_parser("purge", help="delete every dead letter")
    for command in (show, replay, purge):
        command.add_argument("pipeline")
    for command in (show, replay):
        command.add_argument("--reason", metavar="TEXT", help="only those whose reason has TEXT")
    show.add_argument("--limit", type=int, default=20, metavar="N", help="at most N (20)")
    replay.add_argument("--limit", type=int, metavar="N", help="at most N (all)")
    purge.add_argument("--yes", action="store_true", help="yes, delete them")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        return _fail(f"invalid settings: {_first_error(error)}", 2)
    except SettingsError as error:
        return _fail(f"invalid settings: {error}", 2)
    configure_logging(settings.log_format, settings.log_level)
    if (worker := worker_index()) is not None:
        structlog.contextvars.bind_contextvars(worker=worker)
    try:
        if args.command == "run" and args.workers != 1:
            return _run_workers(settings, args)
        # What publishes or consumes traces, as the OTEL_* variables say.
        if args.command in ("run", "publish", "dlq"):
            tracing.start()
        if args.command == "run":
            return _run(settings, args.pipeline, args.file)
        # The other commands consume nothing: which replica this is does not matter.
        settings = settings.model_copy(update={"replica_index": None, "replicas": None})
        if args.command == "publish":
            return asyncio.run(_publish(settings, args))
        if args.command == "dlq":
            return asyncio.run(_dlq(settings, args))
        if args.command in ("pause", "resume"):
            # One address pauses every worker of `ingest run --workers N`: one URL.
            urls = control.service_urls(settings, args.url)
            return control.hold(settings, args.pipeline, args.command == "pause", urls)
        return _topology(settings)
    except ConfigurationError as error:
        return _fail(str(error), 2)
    except (StartupError, PipelineFailed) as error:
        return _fail(str(error), 1)
    finally:
        tracing.uninstall()  # the spans still held are exported


def _run(settings: Settings, names: list[str] | None, file: Path | None) -> int:
    if file is not None and not file.is_file():
        raise ConfigurationError(f"no such file: {file}")
    if file is not None and len(names or ()) != 1:
        raise ConfigurationError("--file feeds one pipeline: name it with --pipeline")
    hosted = build(settings, names, source=file)
    logger.info("starting", version=version("ingest"), settings=settings.public())
    _run_loop(serve(settings, hosted))
    return 0


def _run_workers(settings: Settings, args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigurationError("--workers needs N >= 1")
    if args.file is not None:
        raise ConfigurationError("--file is read by one process: drop --workers")
    build(settings, args.pipeline)  # a configuration error shows once, here
    arguments = [f"--pipeline={name}" for name in args.pipeline or []]
    return supervise(args.workers, arguments, settings)


def _run_loop(coroutine: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)  # type: ignore[arg-type]
    else:
        uvloop.run(coroutine)  # type: ignore[arg-type]


async def _publish(settings: Settings, args: argparse.Namespace) -> int:
    [hosted] = build(settings, [args.pipeline]).values()
    if hosted.queue is None:
        raise ConfigurationError(f"pipeline {args.pipeline} has no queue to publish to")
    if args.count is not None:
        if args.count < 1 or hosted.samples is None:
            raise ConfigurationError("--count needs N >= 1 and a pipeline with sample messages")
        bodies = hosted.samples(args.count)
    elif args.file is not None:
        if not args.file.is_file():
            raise ConfigurationError(f"no such file: {args.file}")
        # One message per row, as `ingest run --file` reads the file: a quoted field may
        # hold a line break.
        bodies = [row.text.encode("utf-8", "surrogateescape") for row in rows_of(args.file)]
    else:
        bodies = [args.payload.encode()]
    url = settings.amqp_url.get_secret_value()
    config = settings.pipeline(args.pipeline)
    queue, route = hosted.queue, hosted.route
    progress = ProgressBar(len(bodies))
    try:
        async with Publisher(
            url,
            connection_name="ingest-publish",
            declare_queues={} if route else {queue: config.queue_declare(queue)},
            after_connect=route.after_connect if route else None,
            connect_timeout=10,
            tracer=tracing.publish_tracer(),
        ) as publisher:
            window = 500
            for start in range(0, len(bodies), window):
                chunk = bodies[start : start + window]
                await publisher.publish_many(
                    [
                        route.message(body)
                        if route
                        else OutgoingMessage(body, queue, message_id=uuid.uuid4().hex)
                        for body in chunk
                    ]
                )
                progress.advance(len(chunk))
    except PublishError as error:
        progress.done()
        raise StartupError(f"publishing to {redact(url)} failed: {error}") from error
    progress.done()
    print(
        f"published {len(bodies)} message(s) to {route.target if route else queue}, all confirmed"
    )
    return 0


async def _dlq(settings: Settings, args: argparse.Namespace) -> int:
    [hosted] = build(settings, [args.pipeline]).values()
    dead = dlq.dead_letters(settings, args.pipeline, hosted.work_queues)
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit needs N >= 1")
    try:
        if args.dlq_command == "show":
            return await dlq.show(dead, args.limit, args.reason)
        if args.dlq_command == "replay":
            return await dlq.replay(dead, limit, args.reason)
        return await dlq.purge(dead, args.yes)
    except (OSError, aiormq.exceptions.AMQPError, PublishError) as error:
        raise StartupError(f"{redact(dead.url)}: {error!r}") from error


def _topology(settings: Settings) -> int:
    for hosted in build(settings).values():
        print(hosted.pipeline.topology().render())
    return 0


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}"


def _fail(message: str, code: int) -> int:
    print(f"ingest: error: {message}", file=sys.stderr)
    return code
