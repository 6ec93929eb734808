"""The HTTP server against hostile clients and pages, on the real service: security
headers on every answer, the page without inline script or style, the Host check (DNS
rebinding), the admin token (its length, throttled failures, their log lines), slow
clients (headers, bodies), bounded connections and event streams, and what compose sets."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from pydantic import ValidationError
from structlog.testing import capture_logs

from ingest.service.protection import AdminFailures
from ingest.service.settings import Settings
from tests.integration.service import RunningService, local_service, run_cli
from tests.support import Broker

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "security-admin-token"
CSP = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
}

Serve = Callable[..., AbstractAsyncContextManager[RunningService]]


@pytest.fixture
def serve(broker: Broker, queue_name: str, tmp_path: Path) -> Serve:
    """The tickets service with the admin token and uploads, `settings` on top."""

    def start(**settings: Any) -> AbstractAsyncContextManager[RunningService]:
        given: dict[str, Any] = {"admin_token": TOKEN, "upload_dir": tmp_path / "uploads"}
        return local_service(broker, queue_name, tmp_path, **{**given, **settings})

    return start


@pytest.fixture
async def service(serve: Serve) -> AsyncIterator[RunningService]:
    async with serve() as running:
        yield running


@asynccontextmanager
async def client(peer: str = "127.0.0.1") -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose connections come from `peer` (any 127.0.0.0/8 address)."""
    connector = aiohttp.TCPConnector(local_addr=(peer, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def call(
    service: RunningService,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    peer: str = "127.0.0.1",
) -> tuple[int, Mapping[str, str], bytes]:
    """One request: its status, headers (any case) and body (an event stream's first)."""
    async with (
        client(peer) as session,
        session.request(method, service.http + path, headers=headers or {}) as response,
    ):
        if response.content_type == "text/event-stream":
            body = await response.content.readuntil(b"\n\n")
        else:
            body = await response.read()
        return response.status, response.headers, body


def admin(token: str = TOKEN, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


def assert_secure(headers: Mapping[str, str]) -> None:
    """The security headers every answer carries."""
    policy = headers.get("Content-Security-Policy", "")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if d.strip())
    assert directives == CSP
    assert "unsafe" not in policy
    assert headers.get("X-Content-Type-Options") == "nosniff"
    assert headers.get("Referrer-Policy") == "no-referrer"
    server = headers.get("Server", "")
    assert "aiohttp" not in server.lower()
    assert "python" not in server.lower()


async def raw_connection(
    service: RunningService,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", service.settings.http_port)


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after `within`)."""
    received = b""
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(4096)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):  # the server cut it first
        await writer.wait_closed()


# -- security headers and the page ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/static/app.js", 200),
        ("GET", "/static/app.css", 200),
        ("GET", "/api/snapshot", 200),
        ("GET", "/events", 200),
        ("GET", "/metrics", 200),
        ("GET", "/healthz", 200),
        ("GET", "/no/such/page", 404),
        ("POST", "/pipelines/bookings/pause", 401),
        ("POST", "/pipelines/nope/pause", 401),
        ("DELETE", "/healthz", 405),
    ],
    ids=lambda v: str(v).strip("/").replace("/", "-") or "page",
)
async def test_every_answer_carries_the_security_headers(
    service: RunningService, method: str, path: str, status: int
) -> None:
    got, headers, _ = await call(service, path, method)
    assert got == status
    assert_secure(headers)


class _Markup(HTMLParser):
    """What of a page a Content-Security-Policy without 'unsafe-inline' would block."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            if named.get("src") is None:
                self.inline.append("<script> without src")
            else:
                self.scripts.append(str(named["src"]))
        if tag == "style":
            self.inline.append("<style>")
        if tag == "link" and named.get("rel") == "stylesheet":
            self.styles.append(str(named.get("href")))
        self.inline += [f"{tag} {name}=" for name, _ in attrs if name == "style"]
        self.inline += [f"{tag} {name}=" for name, _ in attrs if name.startswith("on")]


async def test_the_page_has_no_inline_script_or_style(service: RunningService) -> None:
    _, _, body = await call(service, "/")
    markup = _Markup()
    markup.feed(body.decode())
    assert markup.inline == []
    assert markup.scripts == ["/static/app.js"]
    assert markup.styles == ["/static/app.css"]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/app.css", "text/css; charset=utf-8"),
    ],
    ids=["page", "script", "style"],
)
async def test_the_page_and_its_files_have_their_types_and_are_revalidated(
    service: RunningService, path: str, content_type: str
) -> None:
    status, headers, body = await call(service, path)
    assert (status, headers["Content-Type"]) == (200, content_type)
    assert headers["Cache-Control"] == "no-cache"  # an upgrade is seen at the next load
    assert body
    etag = headers["ETag"]
    status, headers, body = await call(service, path, headers={"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert_secure(headers)


async def test_only_the_page_files_are_served_from_static(service: RunningService) -> None:
    for path in ("/static/", "/static/index.html", "/static/../http.py", "/static/%2e%2e/http.py"):
        status, headers, _ = await call(service, path)
        assert status == 404, path
        assert_secure(headers)


# -- the Host check ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8000", "[::1]:8000"],
)
async def test_loopback_hosts_are_served_on_any_port(service: RunningService, host: str) -> None:
    status, _, _ = await call(service, "/healthz", headers={"Host": host})
    assert status == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "[::2]"],
)
async def test_a_host_not_allowed_is_answered_421_saying_why(
    service: RunningService, host: str
) -> None:
    status, headers, body = await call(service, "/api/snapshot", headers={"Host": host})
    assert status == 421
    assert_secure(headers)
    assert "INGEST_HTTP_ALLOWED_HOSTS" in body.decode()
    assert b"pipelines" not in body  # nothing of the snapshot


async def test_dns_rebinding_cannot_drive_the_admin_endpoints_even_with_the_token(
    service: RunningService,
) -> None:
    headers = admin(Host="attacker.example:8000")
    status, _, _ = await call(service, "/pipelines/bookings/pause", "POST", headers)
    assert status == 421
    assert not service.hosted["bookings"].pipeline.paused


async def test_the_allowed_hosts_setting_replaces_the_loopback_names(serve: Serve) -> None:
    async with serve(http_allowed_hosts=["ingest", "tickets.example.com"]) as service:
        for host, status in [
            ("ingest:8000", 200),
            ("tickets.example.com", 200),
            ("localhost:8000", 421),
            ("example.com", 421),
        ]:
            got, _, _ = await call(service, "/healthz", headers={"Host": host})
            assert got == status, host


async def test_a_star_allows_every_host(serve: Serve) -> None:
    async with serve(http_allowed_hosts=["*"]) as service:
        status, _, _ = await call(service, "/healthz", headers={"Host": "anything.example"})
        assert status == 200


@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        ("ingest,localhost", ["ingest", "localhost"]),
        (" Ingest , [::1] ", ["ingest", "[::1]"]),
        ('["ingest", "localhost"]', ["ingest", "localhost"]),
        ("*", ["*"]),
    ],
    ids=["commas", "spaces-and-case", "json", "star"],
)
def test_allowed_hosts_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, hosts: list[str]
) -> None:
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("INGEST_HTTP_ALLOWED_HOSTS", value)
    assert Settings().http_allowed_hosts == hosts


@pytest.mark.parametrize(
    "value",
    ["localhost:8000", "http://localhost", "", "[::1", "local host"],
    ids=["port", "scheme", "empty", "bracket", "space"],
)
def test_allowed_hosts_that_cannot_match_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("INGEST_HTTP_ALLOWED_HOSTS", value)
    with pytest.raises(ValidationError, match="INGEST_HTTP_ALLOWED_HOSTS"):
        Settings()


# -- the admin token --------------------------------------------------------------------


async def test_a_short_admin_token_stops_the_service_at_start_with_one_line() -> None:
    code, out = await run_cli("run", INGEST_ADMIN_TOKEN="fifteen-chars!!")
    assert code == 2
    assert out.count("\n") == 1
    assert out.startswith("ingest: error: invalid settings: admin_token: ")
    assert "16 characters" in out
    assert "fifteen-chars!!" not in out


def test_an_admin_token_of_16_characters_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("INGEST_ADMIN_TOKEN", "x" * 16)
    token = Settings().admin_token
    assert token is not None
    assert token.get_secret_value() == "x" * 16


async def test_repeated_wrong_tokens_are_answered_429_even_with_the_right_one_then(
    service: RunningService,
) -> None:
    for _ in range(5):
        status, _, _ = await call(service, "/pipelines/bookings/pause", "POST", admin("wrong"))
        assert status == 401
    status, headers, body = await call(service, "/pipelines/bookings/pause", "POST", admin())
    assert status == 429
    assert_secure(headers)
    assert 55 <= int(headers["Retry-After"]) <= 60
    assert "too many wrong admin tokens" in body.decode()
    assert not service.hosted["bookings"].pipeline.paused


async def test_a_throttled_peer_does_not_lock_out_another(service: RunningService) -> None:
    for _ in range(6):
        await call(service, "/pipelines/bookings/pause", "POST", admin("wrong"))
    status, _, _ = await call(service, "/pipelines/bookings/pause", "POST", admin())
    assert status == 429
    status, _, _ = await call(
        service, "/pipelines/bookings/pause", "POST", admin(), peer="127.0.0.2"
    )
    assert status == 200
    assert service.hosted["bookings"].pipeline.paused


async def test_failed_attempts_are_logged_once_a_minute_per_peer_with_a_count(
    service: RunningService,
) -> None:
    with capture_logs() as logs:
        for _ in range(8):
            await call(service, "/pipelines/bookings/resume", "POST", admin("wrong"))
        await call(service, "/pipelines/bookings/resume", "POST", admin("wrong"), peer="127.0.0.3")
    refused = [log for log in logs if log["event"] == "admin token refused"]
    assert [(log["peer"], log["failures"], log["throttled"]) for log in refused] == [
        ("127.0.0.1", 1, 0),
        ("127.0.0.3", 1, 0),
    ]
    assert all(TOKEN not in str(log) and "wrong" not in str(log) for log in logs)


def test_failures_are_forgotten_once_the_minute_passes_and_logged_with_their_count() -> None:
    now = [1000.0]
    failures = AdminFailures(limit=5, window=60.0, log_every=60.0, clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(5):
            assert failures.throttle("peer") is None
            failures.failed("peer")
            now[0] += 1
        assert failures.throttle("peer") == 55  # the first failure leaves the minute then
        now[0] += 54.5
        assert failures.throttle("peer") == 1
        now[0] += 0.5
        assert failures.throttle("peer") is None
        failures.failed("peer")  # a minute after the first line: a second one
    lines = [(log["failures"], log["throttled"]) for log in logs]
    assert lines == [(1, 0), (5, 2)]


def test_peers_that_went_quiet_are_forgotten_and_their_last_count_logged() -> None:
    now = [0.0]
    failures = AdminFailures(limit=5, window=60.0, log_every=60.0, clock=lambda: now[0])
    with capture_logs() as logs:
        failures.failed("a")
        failures.failed("a")  # counted, not logged yet
        now[0] += 61
        failures.failed("b")  # "a" is idle past both intervals: flushed, forgotten
    assert [(log["peer"], log["failures"]) for log in logs] == [("a", 1), ("a", 1), ("b", 1)]
    assert failures.peers == 1


# -- slow clients and bounds ------------------------------------------------------------


async def test_a_client_sending_its_headers_slowly_is_cut_off(serve: Serve) -> None:
    async with serve(http_header_timeout=1.0) as service:
        reader, writer = await raw_connection(service)
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")

        async def dribble() -> None:
            for n in range(100):
                writer.write(f"X-Slow-{n}: y\r\n".encode())
                await asyncio.sleep(0.1)

        dribbling = asyncio.create_task(dribble())
        try:
            assert await closed_by_server(reader, within=5) == b""
        finally:
            dribbling.cancel()
            await close(writer)
        assert 0.9 <= time.monotonic() - started < 4


async def test_a_body_sent_slowly_is_answered_408_and_nothing_is_kept(
    serve: Serve, tmp_path: Path
) -> None:
    async with serve(http_body_timeout=1.0) as service:
        reader, writer = await raw_connection(service)
        boundary = "b0undary"
        start = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=email\r\n\r\na@b.c\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name=file; filename="x.csv"\r\n'
            "Content-Type: text/csv\r\n\r\ncinema,1\n"
        ).encode()
        writer.write(
            b"POST /uploads/bookings HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + start
        )
        started = time.monotonic()

        async def dribble() -> None:
            for _ in range(100):
                writer.write(b"cinema,1\n")
                await asyncio.sleep(0.1)

        dribbling = asyncio.create_task(dribble())
        try:
            async with asyncio.timeout(5):
                answer = await reader.readuntil(b"\r\n\r\n")
            answered = time.monotonic() - started
            # aiohttp drains what the client still sends for lingering_time (10 s), then closes.
            await closed_by_server(reader, within=15)
        finally:
            dribbling.cancel()
            await close(writer)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"\r\nConnection: close\r\n" in answer
        assert 0.9 <= answered < 4
        kept = [path.name for path in (tmp_path / "uploads").iterdir() if path.name != ".lock"]
        assert kept == []  # not even the partial file


async def test_a_body_that_arrives_in_time_is_not_cut_off_by_a_slow_handler(
    serve: Serve,
) -> None:
    async with serve(http_body_timeout=1.0) as service:
        status, _, _ = await call(service, "/healthz", "POST")
        assert status == 405  # answered, not 408: nothing was slow
        async with (
            client() as session,
            session.post(
                service.http + "/pipelines/bookings/pause", data=b"x" * 1000, headers=admin()
            ) as response,
        ):
            assert response.status == 200


async def test_connections_past_the_limit_are_answered_503(serve: Serve) -> None:
    async with serve(http_max_connections=3) as service:
        held = [await raw_connection(service) for _ in range(3)]
        await asyncio.sleep(0.2)
        reader, writer = await raw_connection(service)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await closed_by_server(reader, within=5)
        await close(writer)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"\r\nRetry-After: " in answer
        assert b"\r\nX-Content-Type-Options: nosniff\r\n" in answer
        for _, held_writer in held:
            await close(held_writer)
        await asyncio.sleep(0.2)
        status, _, _ = await call(service, "/healthz")
        assert status == 200


async def test_event_streams_past_the_limit_are_answered_503_with_retry_after(
    serve: Serve,
) -> None:
    async with serve(http_max_event_streams=2) as service, client() as session:
        streams = [await session.get(service.http + "/events") for _ in range(2)]
        for stream in streams:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
        status, headers, body = await call(service, "/events")
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert "INGEST_HTTP_MAX_EVENT_STREAMS" in body.decode()
        assert_secure(headers)
        streams[0].close()

        async def served() -> bool:
            status, _, _ = await call(service, "/events")
            return status == 200

        deadline = time.monotonic() + 10
        while not await served():
            assert time.monotonic() < deadline, "a closed stream never made room"
            await asyncio.sleep(0.2)
        streams[1].close()


# -- compose ----------------------------------------------------------------------------

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def test_compose_documents_no_admin_token() -> None:
    """No token written down: the actions are off until .env sets one of the user's own."""
    for name in ("ingest", "ingest-1", "ingest-2"):
        token = str(SERVICES[name]["environment"]["INGEST_ADMIN_TOKEN"])
        assert token == "${ADMIN_TOKEN:-}", (name, token)
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^ADMIN_TOKEN=$", example, re.MULTILINE)


def test_compose_allows_the_hosts_the_service_is_reached_by(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INGEST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv(
        "INGEST_HTTP_ALLOWED_HOSTS", SERVICES["ingest"]["environment"]["INGEST_HTTP_ALLOWED_HOSTS"]
    )
    allowed = Settings().http_allowed_hosts
    prometheus = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target.split(":")[0] in allowed  # Prometheus scrapes ingest:8000
    assert {"localhost", "127.0.0.1"} <= set(allowed)  # the published port; the healthcheck
    assert "*" not in allowed


def test_every_rabbitmq_node_has_the_first_nodes_healthcheck() -> None:
    first = SERVICES["rabbitmq"]["healthcheck"]
    assert "check_port_connectivity" in first["test"]
    for name in ("rabbitmq-2", "rabbitmq-3"):
        assert SERVICES[name].get("healthcheck") == first, name
