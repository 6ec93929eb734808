"""Opening an AMQP connection the same way for consumers, publishers and the service's
tools: the brokers of a URL in turn, a client name, the URL redacted for logs, and what
counts as a connection error."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import ssl
from typing import Any

import aiormq
from yarl import URL

from ingest.rabbitmq._aiormq.reader import open_fast_connection


def client_name(role: str) -> str:
    """A connection name saying what and which process: `ingest-orders (host pid 42)`,
    so the management UI tells the workers of `ingest run --workers N` apart."""
    return f"{role} ({socket.gethostname()} pid {os.getpid()})"


# What counts as "the broker is unreachable or went away" rather than a bug.
CONNECTION_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError)
CONNECT_TIMEOUT_S = 15.0  # a node that accepts TCP but never answers: try the next
# Which address a process tries first, turning with each connection: the connections of
# one process, and the processes, spread over a cluster's nodes.
_turn = itertools.count(random.randrange(1 << 16))


def addresses(url: str) -> list[str]:
    """The brokers `url` names: one AMQP URL, or several separated by commas (the nodes of
    a cluster: `amqp://u:p@node1:5672/%2F,amqp://u:p@node2:5672/%2F`)."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def open_connection(
    url: str,
    *,
    name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    heartbeat: int | None = None,
) -> aiormq.abc.AbstractConnection:
    """Connect to the broker, or to the first of `url`'s brokers that answers (starting
    with a different one each time); `name` shows in the management UI's connection list;
    `heartbeat` applies unless the URL sets one. Its frames are read by the fast path's
    reader when it fits the installed aiormq (this connection only). Raises what the last
    broker tried raised."""
    urls = addresses(url)
    first = next(_turn) % len(urls)
    failure: BaseException | None = None
    for candidate in urls[first:] + urls[:first]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await _open(candidate, name, ssl_context, heartbeat)
        except CONNECTION_ERRORS as error:  # TimeoutError is an OSError
            failure = error
    assert failure is not None
    raise failure


async def _open(
    url: str, name: str | None, ssl_context: ssl.SSLContext | None, heartbeat: int | None
) -> aiormq.abc.AbstractConnection:
    properties: dict[str, Any] = {}
    if name:
        properties["connection_name"] = name
    parsed = URL(url)
    if heartbeat is not None and "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=heartbeat)
    return await open_fast_connection(parsed, context=ssl_context, client_properties=properties)


def redact(url: str) -> str:
    """The URL (or each of several, separated by commas) with its password hidden, for
    logs."""
    if "," in url:
        return ",".join(redact(part) for part in addresses(url))
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url
