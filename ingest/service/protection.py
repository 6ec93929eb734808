"""What the HTTP server does against hostile pages and clients: security headers on every
answer, the Host check, throttled admin-token failures, a deadline for request bodies and
a bound on open connections.

aiohttp's own settings come first: `keepalive_timeout` bounds how long a connection may
take to send a request's headers (it runs from the connection's start, or the previous
answer, until the headers are whole, and closes an idle connection too), `max_line_size`,
`max_field_size` and `max_headers` bound their size, `lingering_time` how long an unread
body is drained. It has no deadline for a body a handler reads, and takes every connection
the kernel hands it (`backlog` bounds only those not yet accepted): those two are here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

if TYPE_CHECKING:
    from ingest.service.settings import Settings

logger = structlog.get_logger("ingest.service.http")

# The page's script and style are files of the service (/static/...), so nothing inline
# runs: a field that smuggled markup into the page could not execute. data: is the page's
# empty icon.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Server": "ingest",  # not aiohttp's and Python's versions
}
CONNECTIONS_RETRY_AFTER_S = 1
REFUSAL_LINGER_S = 1.0  # how long a refused connection may take to send its request


@dataclass(frozen=True)
class Protections:
    """The HTTP server's bounds, from the settings (`Protections.of(settings)`) or given::

    Protections(allowed_hosts=frozenset({"localhost"}), header_timeout=15.0,
                body_timeout=300.0, max_connections=256, max_event_streams=32)
    """

    allowed_hosts: frozenset[str]
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_event_streams: int

    def __post_init__(self) -> None:
        if not self.allowed_hosts:
            raise ValueError("no host allowed: the server would answer nothing")
        bounds = (self.header_timeout, self.body_timeout, self.max_connections)
        if min(*bounds, self.max_event_streams) <= 0:
            raise ValueError(f"the HTTP bounds must be positive: {self}")

    @classmethod
    def of(cls, settings: Settings) -> Protections:
        return cls(
            allowed_hosts=frozenset(settings.http_allowed_hosts),
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            max_connections=settings.http_max_connections,
            max_event_streams=settings.http_max_event_streams,
        )


def error_response(status: int, message: str) -> web.Response:
    """The service's error answer: `{"error": message}`."""
    return web.json_response({"error": message}, status=status)


# -- every answer ---------------------------------------------------------------------


async def secure(request: web.Request, response: web.StreamResponse) -> None:
    """The security headers, on every answer the application makes, errors and 404s
    included (`app.on_response_prepare`). Answers aiohttp makes before the application
    sees a request (a request it cannot parse: 400) go without them."""
    response.headers.update(SECURITY_HEADERS)


def host_check(allowed: frozenset[str]) -> Middleware:
    """421 Misdirected Request for a Host header not in `allowed` (any port; `*`: every
    host). A page on a DNS name the attacker rebinds to 127.0.0.1 reaches the port with its
    own name as the Host: it is answered nothing, even with a token it guessed or stole."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get(hdrs.HOST)
        if "*" in allowed or (given is not None and host_name(given) in allowed):
            return await handler(request)
        shown = repr(given[:100]) if given is not None else "none"
        return error_response(
            421, f"this service does not answer for host {shown} (INGEST_HTTP_ALLOWED_HOSTS)"
        )

    return check


def host_name(header: str) -> str:
    """The host of a Host header, without its port, lower case: `[::1]:8000` -> `[::1]`,
    `Localhost.:80` -> `localhost`."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] or host
    return host.partition(":")[0].rstrip(".")


# -- slow clients ---------------------------------------------------------------------


def body_deadline(seconds: float) -> Middleware:
    """A request's body must have arrived `seconds` after its headers; else the handler
    is cancelled and the answer is 408, the connection closed. A handler still at work
    once the body is whole is not cut short."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(None) as timeout:
                check = loop.call_later(seconds, _expire_unless_received, request, timeout)
                try:
                    return await handler(request)
                finally:
                    check.cancel()
        except TimeoutError:
            if not timeout.expired():
                raise  # the handler's own
        logger.info("request body too slow", peer=request.remote, path=request.path)
        response = error_response(408, f"the request body did not arrive within {seconds:g} s")
        response.force_close()
        return response

    return deadline


def _expire_unless_received(request: web.Request, timeout: asyncio.Timeout) -> None:
    if not request.content.is_eof():
        timeout.reschedule(asyncio.get_running_loop().time())


class BoundedSite(web.BaseSite):
    """aiohttp's TCP site with at most `limit` connections open at once: the next one is
    answered 503 with Retry-After and closed, before it costs a request handler.

    It starts as web.TCPSite does (the runner's server is the protocol factory; `_server`
    is what BaseSite.stop closes and the runner's `addresses` read), with the factory
    wrapped: aiohttp has no such limit of its own."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limit: int) -> None:
        super().__init__(runner)
        self._host, self._port, self._limit = host, port, limit

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # set up by AppRunner.setup()

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= self._limit:
                return _Refusal()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog
        )


_REFUSAL_TEXT = b"too many connections open: try again\r\n"
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    + b"".join(f"{name}: {value}\r\n".encode() for name, value in SECURITY_HEADERS.items())
    + f"Retry-After: {CONNECTIONS_RETRY_AFTER_S}\r\n".encode()
    + b"Content-Type: text/plain; charset=utf-8\r\n"
    + f"Content-Length: {len(_REFUSAL_TEXT)}\r\nConnection: close\r\n\r\n".encode()
    + _REFUSAL_TEXT
)


class _Refusal(asyncio.Protocol):
    """A connection past the limit: answered at once, closed once its request is read (so
    the close is a FIN the client reads the answer before, not a reset) or soon after."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(_REFUSAL)
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


# -- the admin token ------------------------------------------------------------------


@dataclass
class _Peer:
    failures: deque[float]  # the times of the latest `limit` failures
    seen: float = 0.0
    logged: float = -math.inf
    unlogged: int = 0  # failures since the last line
    throttled: int = 0  # attempts answered 429 since the last line


@dataclass
class AdminFailures:
    """Wrong admin tokens, per peer: after `limit` within `window` seconds, the peer is
    answered 429 until the oldest of them is `window` old, whatever token it sends. A log
    line at most every `log_every` seconds per peer, with the counts since the previous::

        AdminFailures(limit=5, window=60.0, log_every=60.0)

    Peers are told apart by address: behind a proxy they are one (a peer that fails locks
    the others out for the window). At most `max_peers` are kept, the quietest forgotten."""

    limit: int = 5
    window: float = 60.0
    log_every: float = 60.0
    max_peers: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _peers: OrderedDict[str, _Peer] = field(default_factory=OrderedDict, repr=False)

    @property
    def peers(self) -> int:
        return len(self._peers)

    def throttle(self, peer: str) -> int | None:
        """Seconds `peer` must wait before its token is checked again (the attempt is
        counted as throttled), or None when it may try now."""
        state = self._peers.get(peer)
        if state is None:
            return None
        now = self.clock()
        while state.failures and state.failures[0] <= now - self.window:
            state.failures.popleft()
        if len(state.failures) < self.limit:
            return None
        state.throttled += 1
        self._touch(peer, state, now)
        return max(1, math.ceil(state.failures[0] + self.window - now))

    def failed(self, peer: str) -> None:
        """`peer` sent a wrong token (or none)."""
        now = self.clock()
        self._forget_quiet(now)
        state = self._peers.get(peer) or _Peer(deque(maxlen=self.limit))
        state.failures.append(now)
        state.unlogged += 1
        self._touch(peer, state, now)

    def flush(self) -> None:
        """Log the counts not logged yet (the server stops)."""
        for peer, state in self._peers.items():
            self._log(peer, state, self.clock())

    def _touch(self, peer: str, state: _Peer, now: float) -> None:
        state.seen = now
        self._peers[peer] = state
        self._peers.move_to_end(peer)  # the quietest first
        if now - state.logged >= self.log_every:
            self._log(peer, state, now)

    def _forget_quiet(self, now: float) -> None:
        quiet = max(self.window, self.log_every)
        while self._peers:
            peer, state = next(iter(self._peers.items()))
            if now - state.seen <= quiet and len(self._peers) <= self.max_peers:
                return
            self._log(peer, state, now)
            del self._peers[peer]

    @staticmethod
    def _log(peer: str, state: _Peer, now: float) -> None:
        if state.unlogged or state.throttled:
            logger.warning(
                "admin token refused",
                peer=peer,
                failures=state.unlogged,
                throttled=state.throttled,
            )
            state.unlogged = state.throttled = 0
            state.logged = now
