"""Opening an AMQP connection the same way for consumers and publishers."""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

import aiormq
from yarl import URL

from ingest.rabbitmq import _fastpath as fastpath


def client_name(role: str) -> str:
    """A connection name saying what and which process: `ingest-bookings (host pid 42)`,
    so the management UI tells the workers of `ingest run --workers N` apart."""
    return f"{role} ({socket.gethostname()} pid {os.getpid()})"


# What counts as "the broker is unreachable or went away" rather than a bug.
CONNECTION_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError)


async def open_connection(
    url: str,
    *,
    name: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    heartbeat: int | None = None,
) -> aiormq.abc.AbstractConnection:
    """Connect; `name` shows in the management UI's connection list; `heartbeat` applies
    unless the URL sets one. Its frames are read by the fast path's reader when it fits
    the installed aiormq (this connection only)."""
    properties: dict[str, Any] = {}
    if name:
        properties["connection_name"] = name
    parsed = URL(url)
    if heartbeat is not None and "heartbeat" not in parsed.query:
        parsed = parsed.update_query(heartbeat=heartbeat)
    return await fastpath.open_fast_connection(
        parsed, context=ssl_context, client_properties=properties
    )
