"""Helpers to run the tickets service in-process against the real broker, a real
database and a real SMTP server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from ingest.service.hosting import HostedPipeline, build, serve
from ingest.service.settings import Settings
from tests.support import Broker, free_port


@dataclass
class Inbox:
    """What the in-process SMTP server received."""

    messages: list[EmailMessage] = field(default_factory=list)
    delay: float = 0.0  # seconds each message takes, for a slow mail server
    delay_after_first: float | None = None  # the same, for every message but the first
    _arrived: int = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._arrived += 1
        delay = self.delay
        if self.delay_after_first is not None and self._arrived > 1:
            delay = self.delay_after_first
        if delay:
            await asyncio.sleep(delay)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def to(self, recipient: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == recipient]


class SmtpServer:
    """A real SMTP server (aiosmtpd) on a fixed port, which a test can stop and start."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.port = free_port()
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@asynccontextmanager
async def smtp_server() -> AsyncIterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RunningService:
    settings: Settings
    hosted: dict[str, HostedPipeline]
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    async def get_async(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(self.get, path)


@asynccontextmanager
async def running_service(**settings: Any) -> AsyncIterator[RunningService]:
    """Run `serve()` in a task with these settings; stopped (drained) on exit."""
    config = Settings(http_port=free_port(), http_host="127.0.0.1", **settings)
    hosted = build(config)
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(config, hosted, stop=stop, started=started))
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait([task, waiter], timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    for item in hosted.values():
        producer = item.pipeline.producer
        if hasattr(producer, "wait_ready"):
            await producer.wait_ready(timeout=20)
    service = RunningService(config, hosted, stop, task)
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@asynccontextmanager
async def tickets_service(
    broker: Broker, queues: dict[str, str], database_url: str
) -> AsyncIterator[tuple[RunningService, Inbox]]:
    """The tickets service on `database_url` and a real SMTP server, its two pipelines on
    `queues` (`bookings`, `notifications`), spectaculars closed and digests every 0.5 s."""
    async with (
        smtp_server() as smtp,
        running_service(
            amqp_url=broker.amqp_url,
            database_url=database_url,
            smtp_url=f"smtp://127.0.0.1:{smtp.port}",
            shutdown_timeout=15,
            pipelines={
                "bookings": {"queue": queues["bookings"], "closed_events": ["spectaculars"]},
                "notifications": {
                    "queue": queues["notifications"],
                    "batchers": {"email": {"batch_timeout": 0.5}},
                },
            },
        ) as running,
    ):
        yield running, smtp.inbox


def local_service(
    broker: Broker, queue_name: str, directory: Any, **settings: Any
) -> AbstractAsyncContextManager[RunningService]:
    """The tickets service on SQLite and an .eml outbox in `directory`, its two queues
    named after `queue_name`, with `settings` on top (`pipelines`: each pipeline's on top
    of its queue)."""
    given = settings.pop("pipelines", {})
    pipelines = {
        name: {"queue": f"{queue_name}-{name}", **given.get(name, {})}
        for name in ("bookings", "notifications")
    }
    return running_service(
        amqp_url=broker.amqp_url,
        database_url=f"sqlite+aiosqlite:///{directory}/tickets.db",
        mail_outbox=Path(directory) / "outbox",
        pipelines=pipelines,
        **settings,
    )


def call(url: str, token: str | None, method: str = "POST") -> tuple[int, Any]:
    """An HTTP call with the admin token (if any): the status and the JSON answer."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def publish_from_ui(
    broker: Broker, queue: str, payload: str, message_id: str | None = None
) -> bool:
    """Publish the way a person does in the management UI's "Publish message" form."""
    body = {
        "properties": {"message_id": message_id} if message_id else {},
        "routing_key": queue,
        "payload": payload,
        "payload_encoding": "string",
    }
    return bool(broker.api("POST", "exchanges/%2F/amq.default/publish", body)["routed"])


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric_name, _, rest = series.partition("{")
        if metric_name == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0


async def run_cli(*args: str, **environment: str) -> tuple[int, str]:
    """`python -m ingest <args>` with these INGEST_* variables (no others, no config file):
    its exit code, and its standard output and error together."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_CONFIG": os.devnull + ".toml", **environment})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode()


def headers_json(headers: dict[str, Any]) -> str:
    return json.dumps(headers, default=str)
