"""Helpers shared by the integration and reliability tests: the broker under test and
its management API, and small waits and queue inspections."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import pytest
from aiormq.abc import DeliveredMessage
from sqlalchemy.engine import make_url

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Broker:
    amqp_url: str
    management_url: str

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the management HTTP API (as the management UI does)."""
        url = urllib.parse.urlsplit(self.amqp_url)
        request = urllib.request.Request(
            f"{self.management_url}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "content-type": "application/json",
                "authorization": "Basic "
                + base64.b64encode(
                    f"{urllib.parse.unquote(url.username or 'guest')}:"
                    f"{urllib.parse.unquote(url.password or 'guest')}".encode()
                ).decode(),
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    async def api_async(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.api, method, path, body)

    async def answers(self) -> bool:
        """Whether the management API answers."""
        try:
            await self.api_async("GET", "overview")
        except OSError:
            return False
        return True


async def publish(
    channel: aiormq.abc.AbstractChannel, queue: str, *bodies: bytes, **props: Any
) -> None:
    for body in bodies:
        await channel.basic_publish(
            body,
            routing_key=queue,
            properties=aiormq.spec.Basic.Properties(delivery_mode=2, **props),
        )


async def queue_depth(channel: aiormq.abc.AbstractChannel, queue: str) -> int:
    """Ready messages in a queue (not counting unacknowledged ones)."""
    ok = await channel.queue_declare(queue, passive=True)
    return int(ok.message_count or 0)


async def drain_queue(channel: aiormq.abc.AbstractChannel, queue: str) -> list[DeliveredMessage]:
    """Take every ready message of a queue (basic.get, acked)."""
    taken = []
    while True:
        message = await channel.basic_get(queue, no_ack=True)
        if message.delivery_tag is None:
            return taken
        taken.append(message)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until `check()` is true; fail with a clear message when it never is."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


class TcpProxy:
    """Forwards a local port to `host:port`. `cut()` closes every connection through it
    and stops listening (clients get "connection refused") until `resume()`: a server
    going away, as its clients see it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.target_port = host, port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def resume(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.host, self.target_port
            )
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer),
            self._pipe(upstream_reader, writer),
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


async def postgres_through_a_proxy(database_url: str) -> tuple[TcpProxy, str]:
    """A listening TcpProxy in front of the PostgreSQL server of `database_url`, and the
    URL through it; the test is skipped on another database (no server to cut off)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a database server to cut off: PostgreSQL")
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.resume()
    return proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)


def promtool() -> str:
    """Debian's `promtool`: skipped without it, failed in CI (`.ci/run` installs it)."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    return found


async def on_the_server(database_url: str, sql: str) -> list[Any]:
    """`sql`'s rows, run on the PostgreSQL server of `database_url` over a connection of
    its own (beside the pool under test)."""
    import asyncpg

    url = make_url(database_url)
    admin = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        return list(await admin.fetch(sql))
    finally:
        await admin.close()
