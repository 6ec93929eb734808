"""The service's one small HTTP server: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = structlog.get_logger("ingest.service.http")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """`GET /metrics` (Prometheus text format), `GET /healthz` (the process answers) and
    `GET /readyz` (200 only while every pipeline is ready; the body says which is not and
    why). `readiness` maps each pipeline to a function returning why it is not ready, or
    None."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Mapping[str, Callable[[], str | None]],
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        # Port 0 picks a free one: report the real port.
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("http server listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            parts = request.decode("latin-1").split()
            status, content_type, body = (
                self._respond(*parts[:2])
                if len(parts) >= 2
                else (
                    405,
                    "text/plain",
                    b"bad request\n",
                )
            )
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            reasons = {name: not_ready() for name, not_ready in self.readiness.items()}
            body: dict[str, object] = {"ready": {n: r is None for n, r in reasons.items()}}
            problems = {name: reason for name, reason in reasons.items() if reason is not None}
            if problems:
                body["not_ready"] = problems
            status = 200 if reasons and not problems else 503
            return status, "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"not found\n"
