"""A backlog behind a slow handler: the mail server answers slowly, so notifications pile
up in their queue while bookings keep coming. Memory stays bounded by the prefetch."""

from __future__ import annotations

import time
import uuid

from tests.integration.service import SmtpServer
from tests.reliability.harness import (
    CLEAN,
    Result,
    ServiceProcess,
    duplicate_emails,
    publish_bookings,
    record,
    scaled,
    settle,
)
from tests.support import Broker

# Far above what the prefetch lets the service hold; a leak would pass it with the backlog.
RSS_BOUND_MB = 300


async def test_a_large_backlog_behind_a_slow_mail_server_keeps_memory_bounded(
    broker: Broker, service: ServiceProcess, smtp: SmtpServer
) -> None:
    ids = [f"{uuid.uuid4().hex[:8]}-{i}" for i in range(scaled(20_000))]
    smtp.inbox.delay = 0.05  # each digest takes the mail server 50 ms
    await publish_bookings(broker, service.bookings_queue, ids)
    started = time.monotonic()
    await service.start()
    outcome = await settle(service, broker, ids, timeout=max(300, len(ids) / 50))
    elapsed = time.monotonic() - started
    assert outcome == CLEAN
    assert service.peak_rss_mb < RSS_BOUND_MB
    record(
        Result(
            "backlog behind a slow mail server",
            len(ids),
            "SMTP 50 ms per digest; whole backlog queued before start",
            outcome.lost,
            outcome.duplicate_tickets,
            duplicate_emails(smtp.inbox),
            round(elapsed, 1),
            round(service.peak_rss_mb, 1),
        )
    )
